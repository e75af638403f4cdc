#pragma once
// Exact-match accuracy of greedy generations on held-out prompt/answer records (alpaca or chat), the metric the
// demo prints before and after fine-tuning. The prompt is tokenized exactly as in training (the record's tokens
// before its first loss token); the generation stops at EOS / end-of-turn and is compared, whitespace-trimmed,
// with the expected answer, each without a reasoning block before it (what follows the last </think>: Qwen3's
// answers).
#include <string>
#include <vector>

#include "lib/data/data_config.h"
#include "lib/data/tokenizer.h"
#include "lib/model/llama.h"

namespace qt {

struct ExactMatchResult {
  int64_t correct = 0;
  int64_t total = 0;
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
  std::vector<std::string> samples;  // a few "prompt -> generated (expected)" lines for the log
};

// The ids that end a generated answer: the tokenizer's EOS; the end-of-turn tokens of the built-in formats where
// the vocabulary has them (Llama 3's <|eot_id|> and <|end_of_text|>, ChatML's <|im_end|>: Qwen's and SmolLM2's base
// models end text with <|endoftext|>, their chat answers with <|im_end|>); and a custom format's assistant suffix
// where it starts with a special token (its first id differs from the plain encoding's).
std::vector<int32_t> answer_stop_ids(const Tokenizer& tokenizer, const DataConfig& data);

// Reads up to `max_examples` records of `path` (alpaca: instruction/input/output; completion: the completion, or
// its last message; chat: the last assistant message is the answer). Throws qt::Error(Data) naming file:line for a
// record without an answer (every record is checked, whatever the share). shards > 1: generates for the records
// whose index is `shard` modulo `shards` only (a rank's share under data parallelism; the caller sums correct and
// total over the ranks). The share's prompts are generated together, with a key / value cache (generate_batch), at
// most `batch_tokens` cached tokens (rows x (longest prompt + max_new_tokens)) at a time.
ExactMatchResult exact_match(LlamaModel& model, const Tokenizer& tokenizer, const DataConfig& data,
                             const std::string& path, int64_t max_examples, int64_t max_new_tokens, int shard = 0,
                             int shards = 1, int64_t batch_tokens = 8192);

}  // namespace qt
