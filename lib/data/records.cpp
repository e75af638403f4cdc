#include "lib/data/records.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#include "lib/core/error.h"
#include "lib/core/log.h"
#include "lib/data/chat_template.h"
#include "lib/data/jsonl.h"
#include "lib/data/rendered_text.h"

namespace qt {

namespace {

std::string string_field(const Json& value, const std::string& where, const std::string& key) {
  if (!value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
  const Json& v = value.at(key);
  if (!v.is_string()) fail_key(ErrorKind::Data, where, key, std::string("expected a string, got ") + json_type_name(v));
  return v.get<std::string>();
}

// A value as a chat template's `{% if %}` tests it: null, false, 0, "" and empty lists and objects are false.
bool jinja_truthy(const Json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0;
  if (v.is_string()) return !v.get_ref<const std::string&>().empty();
  return !v.empty();  // arrays, objects
}

RecordFormat detect_format(const Json& value, const std::string& where, const std::string& text_field) {
  if (value.contains("messages") || value.contains("conversations")) return RecordFormat::Chat;
  if (value.contains("input_ids")) return RecordFormat::Tokenized;
  if (value.contains("prompt") && value.contains("completion"))
    return value.contains("label") ? RecordFormat::Unpaired : RecordFormat::Completion;
  if (value.contains("chosen") && value.contains("rejected")) return RecordFormat::Preference;
  if (value.contains("instruction") || value.contains("output")) return RecordFormat::Alpaca;
  if (value.contains(text_field)) return RecordFormat::Text;
  std::string keys;
  for (const auto& item : value.items()) keys += (keys.empty() ? "" : ", ") + item.key();
  fail_at(ErrorKind::Data, where,
          "cannot tell the record's format from its keys (" + (keys.empty() ? std::string("none") : keys) +
              "): expected \"" + text_field + "\" (text; data.text_field names another key), \"instruction\"/\"output\" "
              "(alpaca), \"messages\" or \"conversations\" (chat), "
              "\"prompt\"/\"completion\", \"prompt\"/\"chosen\"/\"rejected\" (preference), "
              "\"prompt\"/\"completion\"/\"label\" (unpaired) or \"input_ids\"");
}

Example text_example(const Json& value, const std::string& where, const DataConfig& config, const Tokenizer& tok) {
  Example e;
  if (tok.add_bos() && tok.bos_id() >= 0) e.ids.push_back(tok.bos_id());
  const std::vector<int32_t> body = tok.encode(string_field(value, where, config.text_field));
  e.ids.insert(e.ids.end(), body.begin(), body.end());
  if (config.add_eos && tok.eos_id() >= 0) e.ids.push_back(tok.eos_id());
  e.loss.assign(e.ids.size(), 1);
  return e;
}

Example alpaca_example(const Json& value, const std::string& where, const DataConfig& config, const Tokenizer& tok) {
  const std::string instruction = string_field(value, where, "instruction");
  const std::string input =
      value.contains("input") && !value.at("input").is_null() ? string_field(value, where, "input") : "";
  const std::string output = string_field(value, where, "output");
  if (tok.eos_id() < 0) fail_at(ErrorKind::Data, where, "alpaca records end with EOS, but the tokenizer has none");
  std::vector<RenderPiece> pieces;
  if (tok.add_bos() && tok.bos_id() >= 0) pieces.push_back({"", tok.bos_id(), config.train_on_prompt, true});
  pieces.push_back({alpaca_prompt(instruction, input), -1, config.train_on_prompt});
  pieces.push_back({output, -1, true});
  pieces.push_back({"", tok.eos_id(), true});
  return tokenize_rendered(pieces, tok);
}

// `list`'s messages (a record's `key`), appended to `out`; `target` false: none of their answers is in the loss.
void read_messages(const Json& list, const std::string& where, const std::string& key, bool target,
                   std::vector<ChatMessage>& out) {
  for (size_t i = 0; i < list.size(); ++i) {
    const Json& m = list[i];
    const std::string at = key + "[" + std::to_string(i) + "]";
    if (!m.is_object())
      fail_key(ErrorKind::Data, where, at, std::string("expected an object, got ") + json_type_name(m));
    out.push_back({string_field(m, where + ": " + at, "role"), string_field(m, where + ": " + at, "content"),
                   m.contains("tool_calls") && jinja_truthy(m.at("tool_calls")), std::nullopt, target});
    // Qwen3's template takes reasoning_content where it is a string (`is string`), else the content's <think> block.
    if (m.contains("reasoning_content") && m.at("reasoning_content").is_string())
      out.back().reasoning_content = m.at("reasoning_content").get<std::string>();
  }
}

Example render_messages(const std::vector<ChatMessage>& messages, const Json& value, const std::string& where,
                        const DataConfig& config, const Tokenizer& tok, std::optional<ChatFormat>& format) {
  if (!format) format = resolve_chat_format(config.chat_template, tok.chat_template(), config.file);
  const bool tools = value.contains("tools") && jinja_truthy(value.at("tools"));
  if (*format == ChatFormat::Custom)
    return tokenize_rendered(
        render_custom(config.chat_format, messages, tok, config.train_on_prompt, where, tools), tok);
  return tokenize_rendered(render_chat(*format, messages, tok, config.train_on_prompt, where, tools), tok);
}

Example chat_example(const Json& value, const std::string& where, const DataConfig& config, const Tokenizer& tok,
                     std::optional<ChatFormat>& format) {
  std::vector<ChatMessage> messages;
  read_messages(chat_messages(value, where), where, value.contains("messages") ? "messages" : "conversations", true,
                messages);
  return render_messages(messages, value, where, config, tok, format);
}

// TRL's prompt-completion records. Strings: BOS (as the tokenizer says) + prompt + completion + EOS (unless the
// completion ends with the EOS token's text), the prompt out of the loss (unless train_on_prompt). Lists of messages:
// the conversation prompt + completion through the chat template, the completion's answers in the loss.
// `key`: the completion's key ("completion"; a preference pair's "chosen" or "rejected").
Example completion_example(const Json& value, const std::string& where, const DataConfig& config,
                           const Tokenizer& tok, std::optional<ChatFormat>& format, const char* key = "completion") {
  const Json &prompt = value.at("prompt"), &completion = value.at(key);
  if (prompt.is_array() && completion.is_array()) {
    std::vector<ChatMessage> messages;
    read_messages(prompt, where, "prompt", false, messages);
    read_messages(completion, where, key, true, messages);
    return render_messages(messages, value, where, config, tok, format);
  }
  if (!prompt.is_string() || !completion.is_string())
    fail_key(ErrorKind::Data, where, prompt.is_string() ? key : "prompt",
             std::string("expected a string (or prompt and ") + key + " both lists of messages), got " +
                 json_type_name(prompt.is_string() ? completion : prompt));
  if (tok.eos_id() < 0)
    fail_at(ErrorKind::Data, where, std::string(key) + " records end with EOS, but the tokenizer has none");
  const std::string& text = completion.get_ref<const std::string&>();
  const std::string eos = tok.id_to_token(tok.eos_id());
  const bool ends_with_eos = text.size() >= eos.size() && text.compare(text.size() - eos.size(), eos.size(), eos) == 0;
  std::vector<RenderPiece> pieces;
  if (tok.add_bos() && tok.bos_id() >= 0) pieces.push_back({"", tok.bos_id(), config.train_on_prompt, true});
  pieces.push_back({prompt.get<std::string>(), -1, config.train_on_prompt});
  pieces.push_back({text, -1, true});
  if (!ends_with_eos) pieces.push_back({"", tok.eos_id(), true});
  return tokenize_rendered(pieces, tok);
}

// A preference pair {prompt, chosen, rejected} (TRL's preference records, strings or lists of messages): prompt +
// chosen and prompt + rejected each rendered as a completion record is, the prompt never in the loss; one Example
// holding both (Example::second).
Example preference_example(const Json& value, const std::string& where, const DataConfig& config,
                           const Tokenizer& tok, std::optional<ChatFormat>& format) {
  DataConfig masked = config;
  masked.train_on_prompt = false;
  Example e = completion_example(value, where, masked, tok, format, "chosen");
  Example r = completion_example(value, where, masked, tok, format, "rejected");
  // TRL's split: one prompt length for both, the lesser of the two (where each tokenization leaves the prompt), and
  // every token after it in the loss (a token that merges across the prompt's end belongs to the completion).
  const auto first = [](const Example& x) {
    return static_cast<size_t>(std::find(x.loss.begin(), x.loss.end(), uint8_t{1}) - x.loss.begin());
  };
  const size_t prompt = std::min(first(e), first(r));
  for (Example* x : {&e, &r})
    for (size_t k = 0; k < x->loss.size(); ++k) x->loss[k] = k >= prompt;
  e.second = static_cast<int64_t>(e.ids.size());
  e.ids.insert(e.ids.end(), r.ids.begin(), r.ids.end());
  e.loss.insert(e.loss.end(), r.loss.begin(), r.loss.end());
  return e;
}

// TRL's unpaired preference record {prompt, completion, label} (KTO): a completion record, the prompt never in the
// loss, label true (desirable) or false (undesirable).
Example unpaired_example(const Json& value, const std::string& where, const DataConfig& config, const Tokenizer& tok,
                         std::optional<ChatFormat>& format) {
  const Json& label = value.at("label");
  if (!label.is_boolean())
    fail_key(ErrorKind::Data, where, "label",
             std::string("expected true (a desirable completion) or false (an undesirable one), got ") +
                 (label.is_string() ? "\"" + label.get<std::string>() + "\"" : label.dump()));
  DataConfig masked = config;
  masked.train_on_prompt = false;
  Example e = completion_example(value, where, masked, tok, format);
  e.label = label.get<bool>() ? 1 : 0;
  return e;
}

Example tokenized_example(const Json& value, const std::string& where, const Tokenizer& tok) {
  auto int_list = [&](const std::string& key) {
    const Json& v = value.at(key);
    if (!v.is_array())
      fail_key(ErrorKind::Data, where, key, std::string("expected a list of integers, got ") + json_type_name(v));
    std::vector<int64_t> out;
    out.reserve(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_number_integer())
        fail_key(ErrorKind::Data, where, key, "element " + std::to_string(i) + " is not an integer: " + v[i].dump());
      if (v[i].is_number_unsigned() && v[i].get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        fail_key(ErrorKind::Data, where, key, "element " + std::to_string(i) + " is " + v[i].dump() + ": out of range");
      out.push_back(v[i].get<int64_t>());
    }
    return out;
  };
  const std::vector<int64_t> ids = int_list("input_ids");
  if (ids.empty()) fail_key(ErrorKind::Data, where, "input_ids", "is empty");
  Example e;
  e.ids.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= tok.vocab_size())
      fail_key(ErrorKind::Data, where, "input_ids",
               "id " + std::to_string(ids[i]) + " at index " + std::to_string(i) + " is outside the vocabulary [0, " +
                   std::to_string(tok.vocab_size()) + ")");
    e.ids.push_back(static_cast<int32_t>(ids[i]));
  }
  // An attention mask that leaves tokens out is not supported (the rows are causal, packed or padded by the
  // trainer): such a token would be trained on without a word.
  if (value.contains("attention_mask") && !value.at("attention_mask").is_null()) {
    const std::vector<int64_t> mask = int_list("attention_mask");
    if (mask.size() != ids.size())
      fail_key(ErrorKind::Data, where, "attention_mask",
               "has " + std::to_string(mask.size()) + " entries, input_ids " + std::to_string(ids.size()));
    for (size_t i = 0; i < mask.size(); ++i)
      if (mask[i] != 1)
        fail_key(ErrorKind::Data, where, "attention_mask",
                 "entry " + std::to_string(i) + " is " + std::to_string(mask[i]) +
                     ": only all-ones masks are read; leave such tokens out of input_ids (labels -100 keeps a token "
                     "out of the loss)");
  }
  e.loss.assign(ids.size(), 1);
  if (value.contains("labels") && !value.at("labels").is_null()) {
    // transformers' convention: labels align with input_ids (the model shifts them); -100 = not in the loss.
    const std::vector<int64_t> labels = int_list("labels");
    if (labels.size() != ids.size())
      fail_key(ErrorKind::Data, where, "labels",
               "has " + std::to_string(labels.size()) + " entries, input_ids " + std::to_string(ids.size()));
    for (size_t i = 0; i < labels.size(); ++i) {
      if (labels[i] != -100 && labels[i] != ids[i])
        fail_key(ErrorKind::Data, where, "labels",
                 "entry " + std::to_string(i) + " is " + std::to_string(labels[i]) +
                     ": expected -100 (masked) or the input id " + std::to_string(ids[i]));
      e.loss[i] = labels[i] != -100;
    }
  }
  return e;
}

}  // namespace

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  // tatsu-lab/stanford_alpaca train.py, PROMPT_DICT["prompt_input"] / ["prompt_no_input"].
  if (!input.empty())
    return "Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
           instruction + "\n\n### Input:\n" + input + "\n\n### Response:";
  return "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\n" +
         instruction + "\n\n### Response:";
}

namespace {

Example tokenize_one(const Json& value, const std::string& where, const DataConfig& config, const Tokenizer& tok,
                     std::optional<ChatFormat>& chat) {
  RecordFormat format = config.format == RecordFormat::Auto ? detect_format(value, where, config.text_field) : config.format;
  switch (format) {
    case RecordFormat::Text:
      return text_example(value, where, config, tok);
    case RecordFormat::Alpaca:
      return alpaca_example(value, where, config, tok);
    case RecordFormat::Chat:
      if (!value.contains("messages") && !value.contains("conversations"))
        fail_key(ErrorKind::Data, where, "messages", "missing (or ShareGPT's \"conversations\")");
      return chat_example(value, where, config, tok, chat);
    case RecordFormat::Completion:
      for (const char* key : {"prompt", "completion"})
        if (!value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
      return completion_example(value, where, config, tok, chat);
    case RecordFormat::Preference:
      for (const char* key : {"prompt", "chosen", "rejected"})
        if (!value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
      return preference_example(value, where, config, tok, chat);
    case RecordFormat::Unpaired:
      for (const char* key : {"prompt", "completion", "label"})
        if (!value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
      return unpaired_example(value, where, config, tok, chat);
    case RecordFormat::Tokenized:
      if (!value.contains("input_ids")) fail_key(ErrorKind::Data, where, "input_ids", "missing");
      return tokenized_example(value, where, tok);
    case RecordFormat::Auto:
      break;
  }
  fail(ErrorKind::Internal, "tokenize_record: unresolved format");
}

}  // namespace

Json chat_messages(const Json& value, const std::string& where) {
  if (value.contains("messages")) {
    const Json& list = value.at("messages");
    if (!list.is_array())
      fail_key(ErrorKind::Data, where, "messages", std::string("expected a list, got ") + json_type_name(list));
    return list;
  }
  if (!value.contains("conversations")) return Json();
  const Json& list = value.at("conversations");
  if (!list.is_array())
    fail_key(ErrorKind::Data, where, "conversations", std::string("expected a list, got ") + json_type_name(list));
  Json out = Json::array();
  for (size_t i = 0; i < list.size(); ++i) {
    const Json& m = list[i];
    const std::string key = "conversations[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("from")) {
      out.push_back(m);  // {"role", "content"} (or a bad message, named as such by the chat reader)
      continue;
    }
    const std::string from = string_field(m, where + ": " + key, "from");
    std::string role;
    if (from == "human" || from == "user" || from == "input") role = "user";
    if (from == "gpt" || from == "assistant" || from == "output") role = "assistant";
    if (from == "system") role = "system";
    if (role.empty())
      fail_key(ErrorKind::Data, where, key + ".from",
               "is \"" + from + "\" (expected \"human\" / \"user\", \"gpt\" / \"assistant\" or \"system\")");
    Json msg = m;
    msg.erase("from");
    msg["role"] = role;
    if (m.contains("value")) {
      msg["content"] = m.at("value");
      msg.erase("value");
    }
    out.push_back(std::move(msg));
  }
  return out;
}

Example tokenize_record(const Json& value, const std::string& where, const DataConfig& config,
                        const Tokenizer& tokenizer) {
  std::optional<ChatFormat> chat;
  return tokenize_one(value, where, config, tokenizer, chat);
}

std::vector<int32_t> prompt_tokens(const Example& example) {
  std::vector<int32_t> prompt;
  for (size_t i = 0; i < example.ids.size() && !example.loss[i]; ++i) prompt.push_back(example.ids[i]);
  return prompt;
}

Json prompt_record(RecordFormat format, const std::string& prompt, const std::string& input,
                   const std::string& system) {
  // The answer's first token is where the prompt ends: a word, as most answers start (a token that straddles the
  // prompt's end and the answer goes to the answer, lib/data/rendered_text.h).
  const std::string answer = "Answer";
  if (format == RecordFormat::Alpaca) return Json{{"instruction", prompt}, {"input", input}, {"output", answer}};
  if (format == RecordFormat::Completion) return Json{{"prompt", prompt}, {"completion", answer}};
  QT_CHECK(format == RecordFormat::Chat, ErrorKind::Internal, "prompt_record: alpaca, completion or chat only");
  Json messages = Json::array();
  if (!system.empty()) messages.push_back(Json{{"role", "system"}, {"content", system}});
  messages.push_back(Json{{"role", "user"}, {"content", prompt}});
  messages.push_back(Json{{"role", "assistant"}, {"content", answer}});
  return Json{{"messages", messages}};
}

std::vector<int32_t> generation_prompt_tokens(const DataConfig& config, const std::string& prompt,
                                              const std::string& input, const std::string& system,
                                              const Tokenizer& tokenizer) {
  const Json record = prompt_record(config.format, prompt, input, system);
  if (config.format == RecordFormat::Chat) {
    const ChatFormat format = resolve_chat_format(config.chat_template, tokenizer.chat_template(), config.file);
    const std::optional<std::string> suffix = generation_prompt_suffix(format);
    if (suffix || format == ChatFormat::Custom) {
      std::vector<ChatMessage> messages(system.empty() ? 1 : 2);
      if (!system.empty()) messages[0].role = "system", messages[0].content = system;
      messages.back().role = "user", messages.back().content = prompt;
      if (format == ChatFormat::Custom)
        return tokenize_rendered(render_custom(config.chat_format, messages, tokenizer, false, "--prompt", false, true),
                                 tokenizer)
            .ids;
      std::vector<RenderPiece> pieces = render_chat(format, messages, tokenizer, false, "--prompt", false);
      pieces.push_back({*suffix, -1, false});
      return tokenize_rendered(pieces, tokenizer).ids;
    }
  }
  return prompt_tokens(tokenize_record(record, "--prompt", config, tokenizer));
}

namespace {

// A chat record with a non-empty string reasoning_content in a message: only Qwen3's template renders it.
bool chat_with_reasoning(const Json& messages) {
  if (!messages.is_array()) return false;
  for (const auto& m : messages)
    if (m.is_object() && m.contains("reasoning_content") && m.at("reasoning_content").is_string() &&
        !m.at("reasoning_content").get<std::string>().empty())
      return true;
  return false;
}

// A chat record with an answer whose content holds a </think>: DeepSeek-R1-Distill-Llama's template keeps what
// follows the last one.
bool chat_with_think_block(const Json& messages) {
  if (!messages.is_array()) return false;
  for (const auto& m : messages)
    if (m.is_object() && m.value("role", "") == "assistant" && m.contains("content") && m.at("content").is_string() &&
        m.at("content").get<std::string>().find("</think>") != std::string::npos)
      return true;
  return false;
}

// A chat record whose system message the template leaves out (Mistral v0.3's, where an answer ends the record).
bool chat_drops_system(ChatFormat format, const Json& messages) {
  if (!messages.is_array()) return false;
  std::vector<ChatMessage> roles(messages.size());
  for (size_t i = 0; i < messages.size(); ++i)
    if (messages[i].is_object() && messages[i].contains("role") && messages[i].at("role").is_string())
      roles[i].role = messages[i].at("role").get<std::string>();
  return !roles.empty() && roles[0].role == "system" && !renders_system_message(format, roles);
}

// A chat record without an assistant message: nothing of it is in the loss (unless train_on_prompt).
bool chat_without_answer(const Json& messages) {
  if (!messages.is_array()) return false;
  for (const auto& m : messages)
    if (m.is_object() && m.contains("role") && m.at("role") == "assistant") return false;
  return true;
}

}  // namespace

std::vector<Example> load_examples(const std::string& path, const DataConfig& config, const Tokenizer& tokenizer) {
  const std::vector<JsonlRecord> records = read_jsonl(path);
  std::vector<Example> out;
  out.reserve(records.size());
  std::optional<ChatFormat> chat;  // resolved once, at the first chat record
  std::vector<int64_t> unanswered;  // lines of chat records with no assistant message
  std::vector<int64_t> reasoning;   // lines of chat records whose reasoning_content the template leaves out
  std::vector<int64_t> no_system;   // lines of chat records whose system message the template leaves out
  std::vector<int64_t> thinking;    // lines of chat records whose answers' reasoning the template leaves out
  // config.unpair (KTO): a preference pair is two unpaired records, its chosen completion desirable and its rejected
  // one not; as TRL's unpair_preference_dataset (a batched map of 1,000 records), each 1,000 records' chosen come
  // first (in the place of each record's first example), then their rejected.
  std::vector<Example> unpaired_rejected;
  size_t index = 0;
  for (const auto& r : records) {
    if (config.unpair && index++ % 1000 == 0) {
      for (Example& x : unpaired_rejected) out.push_back(std::move(x));
      unpaired_rejected.clear();
    }
    const std::string where = path + ":" + std::to_string(r.line);
    Example e;
    const RecordFormat format = config.format == RecordFormat::Auto ? detect_format(r.value, where, config.text_field) : config.format;
    if (config.unpair && format == RecordFormat::Preference) {
      for (const char* key : {"prompt", "chosen", "rejected"})
        if (!r.value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
      DataConfig masked = config;
      masked.train_on_prompt = false;
      e = completion_example(r.value, where, masked, tokenizer, chat, "chosen");
      e.label = 1;
      Example rejected = completion_example(r.value, where, masked, tokenizer, chat, "rejected");
      rejected.label = 0;
      rejected.line = r.line;
      unpaired_rejected.push_back(std::move(rejected));
    } else {
      e = tokenize_one(r.value, where, config, tokenizer, chat);
    }
    e.line = r.line;
    const Json messages = chat ? chat_messages(r.value, path) : Json();  // (read once already: no error here)
    if (!config.train_on_prompt && chat_without_answer(messages)) unanswered.push_back(r.line);
    if (chat && *chat != ChatFormat::Qwen3 && chat_with_reasoning(messages)) reasoning.push_back(r.line);
    if (chat && chat_drops_system(*chat, messages)) no_system.push_back(r.line);
    if (chat && *chat == ChatFormat::DeepSeekR1 && chat_with_think_block(messages)) thinking.push_back(r.line);
    out.push_back(std::move(e));
  }
  for (Example& x : unpaired_rejected) out.push_back(std::move(x));
  const auto line_list = [](const std::vector<int64_t>& lines) {
    std::string out = lines.size() == 1 ? "line " : "lines ";
    for (size_t i = 0; i < std::min<size_t>(lines.size(), 10); ++i) out += (i ? ", " : "") + std::to_string(lines[i]);
    if (lines.size() > 10) out += " and " + std::to_string(lines.size() - 10) + " more";
    return out;
  };
  if (!unanswered.empty())
    log::warn_rank0(path + ": " + std::to_string(unanswered.size()) + " chat record(s) with no assistant message (" +
                    line_list(unanswered) +
                    "): nothing of them is in the loss (only assistant turns are, unless data.train_on_prompt)");
  if (!reasoning.empty())
    log::warn_rank0(path + ": " + std::to_string(reasoning.size()) + " chat record(s) with a reasoning_content (" +
                    line_list(reasoning) + ") that the " + chat_format_name(*chat) +
                    " template leaves out, as transformers renders it (only the qwen3 template renders it)");
  if (!thinking.empty())
    log::warn_rank0(path + ": " + std::to_string(thinking.size()) +
                    " chat record(s) with an answer holding </think> (" + line_list(thinking) + "): the " +
                    chat_format_name(*chat) +
                    " template keeps what follows an answer's last </think>, as transformers renders it, so the "
                    "reasoning before it is not trained");
  if (!no_system.empty())
    log::warn_rank0(path + ": " + std::to_string(no_system.size()) + " chat record(s) with a system message (" +
                    line_list(no_system) + ") that the " + chat_format_name(*chat) +
                    " template leaves out, as transformers renders it: it puts the system message in the last user "
                    "message only where that message ends the conversation, never where an answer does");
  return out;
}

}  // namespace qt
