#pragma once
// jsonl records -> tokenized examples. One record per line, in one of seven shapes (data.format, or "auto":
// each record's keys decide):
//   text       {"text": "..."}                                    BOS (as the tokenizer says) + text + EOS (add_eos)
//   alpaca     {"instruction", "input" (optional), "output"}     Stanford Alpaca prompt; prompt masked
//   chat       {"messages": [{"role", "content"}, ...]}          the model's chat template; only answers in the loss
//              or ShareGPT's {"conversations": [{"from", "value"}, ...]} (from: human / user, gpt / assistant, system)
//   completion {"prompt", "completion"}                          TRL's prompt-completion: strings (BOS + prompt +
//              completion + EOS) or lists of messages (the chat template); the prompt out of the loss
//   preference {"prompt", "chosen", "rejected"}                  TRL's preference pairs (DPO, CPO, ORPO; KTO reads each
//              as two unpaired records, DataConfig::unpair)
//   unpaired   {"prompt", "completion", "label"}                 TRL's unpaired preference records (KTO): a completion
//              record with label true (desirable) or false (undesirable), Example::label
//   tokenized  {"input_ids": [...], "labels": [...] (optional)}  labels as transformers': -100 masks a token
// Extra keys in a record are ignored (datasets carry ids, sources, ...). Every error is qt::Error(Data) naming
// "file:line" and the key.
#include <string>
#include <vector>

#include "lib/data/data_config.h"
#include "lib/data/example.h"
#include "lib/data/tokenizer.h"

namespace qt {

// The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT) for one record; `input` empty
// selects "prompt_no_input". The answer follows the prompt directly, then EOS, as train.py concatenates them.
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

// A chat record's messages as [{"role", "content", ...}]: its "messages" as they are, or its ShareGPT
// "conversations" with each {"from", "value"} made {"role", "content"} (from human / user / input -> user, gpt /
// assistant / output -> assistant, system -> system, as Unsloth's standardize_sharegpt maps them; messages already
// {"role", "content"} are kept). A "from" of another value is qt::Error(Data) naming `where` and the key. A record
// with neither key: null.
Json chat_messages(const Json& value, const std::string& where);

// Reads and tokenizes every record of `path` (documents are not truncated here; see Dataset).
std::vector<Example> load_examples(const std::string& path, const DataConfig& config, const Tokenizer& tokenizer);

// Tokenizes one record that read_jsonl returned as `value` from `where` ("file:line").
Example tokenize_record(const Json& value, const std::string& where, const DataConfig& config,
                        const Tokenizer& tokenizer);

// The tokens of a tokenized record before its first loss token: its prompt as training renders and masks it.
std::vector<int32_t> prompt_tokens(const Example& example);

// A record of `format` (alpaca, completion or chat) asking `prompt` (alpaca: the instruction, with `input`;
// completion: the prompt text; chat: one user message, after a system message when `system` is not empty) with a
// placeholder answer: prompt_tokens() of it,
// tokenized, is what a model trained on such records is given before its answer (`qlora-train generate --format`).
Json prompt_record(RecordFormat format, const std::string& prompt, const std::string& input,
                   const std::string& system);

// What `qlora-train generate --format` gives the model: prompt_tokens() of prompt_record(config.format, ...), or
// for a chat template whose generation prompt is not the start of an answer's turn (generation_prompt_suffix:
// Mistral v0.3's, DeepSeek-R1-Distill-Llama's), the conversation ending with the user's message as the template
// renders it, and the template's suffix.
std::vector<int32_t> generation_prompt_tokens(const DataConfig& config, const std::string& prompt,
                                              const std::string& input, const std::string& system,
                                              const Tokenizer& tokenizer);

}  // namespace qt
