#include "lib/data/data_config.h"

#include <vector>

#include "lib/core/error.h"

namespace qt {

namespace {

const std::vector<std::string> kKeys = {"train_file",    "eval_file",   "eval_fraction",   "format",
                                        "chat_template", "chat_format", "max_seq_len",     "packing",
                                        "shuffle",       "seed",        "train_on_prompt", "add_eos",
                                        "truncation",    "text_field",  "packing_strategy"};

// data.chat_format's string keys, in the order config --print writes them.
std::vector<std::pair<std::string, std::string CustomChatFormat::*>> custom_format_strings() {
  using F = CustomChatFormat;
  return {{"system_prefix", &F::system_prefix},       {"system_suffix", &F::system_suffix},
          {"user_prefix", &F::user_prefix},           {"user_suffix", &F::user_suffix},
          {"assistant_prefix", &F::assistant_prefix}, {"assistant_suffix", &F::assistant_suffix},
          {"default_system", &F::default_system},     {"generation_prompt", &F::generation_prompt}};
}

const std::vector<std::pair<std::string, RecordFormat>>& record_formats() {
  static const std::vector<std::pair<std::string, RecordFormat>> table = {
      {"auto", RecordFormat::Auto}, {"text", RecordFormat::Text},             {"alpaca", RecordFormat::Alpaca},
      {"chat", RecordFormat::Chat}, {"completion", RecordFormat::Completion},
      {"preference", RecordFormat::Preference}, {"unpaired", RecordFormat::Unpaired},
      {"tokenized", RecordFormat::Tokenized}};
  return table;
}

const std::vector<std::pair<std::string, ChatTemplateChoice>>& chat_templates() {
  static const std::vector<std::pair<std::string, ChatTemplateChoice>> table = {
      {"auto", ChatTemplateChoice::Auto},         {"llama3", ChatTemplateChoice::Llama3},
      {"llama3.1", ChatTemplateChoice::Llama31},  {"llama2", ChatTemplateChoice::Llama2},
      {"mistral", ChatTemplateChoice::Mistral},   {"mistral-v0.3", ChatTemplateChoice::MistralV03},
      {"zephyr", ChatTemplateChoice::Zephyr},     {"deepseek-r1", ChatTemplateChoice::DeepSeekR1},
      {"chatml", ChatTemplateChoice::ChatML},
      {"qwen2", ChatTemplateChoice::Qwen2},       {"qwen3", ChatTemplateChoice::Qwen3},
      {"qwen3-instruct", ChatTemplateChoice::Qwen3Instruct}, {"smollm2", ChatTemplateChoice::SmolLM2},
      {"custom", ChatTemplateChoice::Custom}};
  return table;
}

template <typename E>
E pick(const JsonReader& r, const std::string& key, E fallback, const std::vector<std::pair<std::string, E>>& names) {
  if (!r.has(key)) return fallback;
  const std::string value = r.get_string(key);
  std::vector<std::string> known;
  for (const auto& [name, e] : names) {
    if (name == value) return e;
    known.push_back(name);
  }
  std::string list;
  for (const auto& k : known) list += (list.empty() ? "" : ", ") + ("\"" + k + "\"");
  std::string msg = "unknown value \"" + value + "\" (expected one of " + list + ")";
  if (auto near = nearest_key(value, known)) msg += "; did you mean \"" + *near + "\"?";
  fail_key(r.kind, r.file, r.path(key), msg);
}

}  // namespace

const char* record_format_name(RecordFormat format) {
  for (const auto& [name, f] : record_formats())
    if (f == format) return name.c_str();
  return "?";
}

const char* chat_template_name(ChatTemplateChoice choice) {
  for (const auto& [name, c] : chat_templates())
    if (c == choice) return name.c_str();
  return "?";
}

std::vector<std::string> chat_template_names() {
  std::vector<std::string> out;
  for (const auto& entry : chat_templates()) out.push_back(entry.first);
  return out;
}

const char* truncation_name(Truncation truncation) {
  switch (truncation) {
    case Truncation::Truncate:
      return "truncate";
    case Truncation::Drop:
      return "drop";
    case Truncation::Error:
      return "error";
  }
  return "?";
}

const char* packing_strategy_name(PackingStrategy strategy) {
  switch (strategy) {
    case PackingStrategy::Auto:
      return "auto";
    case PackingStrategy::BestFit:
      return "best_fit";
    case PackingStrategy::InOrder:
      return "in_order";
  }
  return "?";
}

bool packs_best_fit(const DataConfig& config, bool preference) {
  if (!config.packing || config.packing_strategy == PackingStrategy::InOrder) return false;
  return config.packing_strategy == PackingStrategy::BestFit || (config.shuffle && !preference);
}

CustomChatFormat CustomChatFormat::from_json(const Json& object, const std::string& file) {
  std::vector<std::string> keys = {"bos", "strip"};
  for (const auto& [key, member] : custom_format_strings()) keys.push_back(key);
  reject_unknown_keys(object, keys, file, "data.chat_format.", ErrorKind::Config);
  const JsonReader r{object, file, ErrorKind::Config, "data.chat_format."};
  CustomChatFormat f;
  f.bos = r.get_bool("bos", f.bos);
  f.strip = r.get_bool("strip", f.strip);
  for (const auto& [key, member] : custom_format_strings()) f.*member = r.get_string(key, f.*member);
  return f;
}

Json CustomChatFormat::to_json() const {
  Json j = {{"bos", bos}};
  for (const auto& [key, member] : custom_format_strings()) j[key] = this->*member;
  j["strip"] = strip;
  return j;
}

Json DataConfig::to_json() const {
  return Json{{"train_file", train_files.empty()       ? Json(nullptr)
                             : train_files.size() == 1 ? Json(train_files[0])
                                                       : Json(train_files)},
              {"eval_file", eval_file},
              {"eval_fraction", eval_fraction},
              {"format", record_format_name(format)},
              {"chat_template", chat_template_name(chat_template)},
              {"chat_format", chat_format.to_json()},
              {"max_seq_len", max_seq_len},
              {"truncation", truncation_name(truncation)},
              {"packing", packing},
              {"packing_strategy", packing_strategy_name(packing_strategy)},
              {"shuffle", shuffle},
              {"seed", seed},
              {"train_on_prompt", train_on_prompt},
              {"add_eos", add_eos},
              {"text_field", text_field}};
}

DataConfig DataConfig::from_json(const Json& section, const std::string& file, bool complete) {
  reject_unknown_keys(section, kKeys, file, "data.", ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "data."};
  DataConfig c;
  c.file = file;
  if (section.is_object() && section.contains("train_file") && section["train_file"].is_array()) {
    c.train_files = r.get_strings("train_file");
    if (c.train_files.empty())
      fail_key(ErrorKind::Config, file, "data.train_file", "is an empty list: name a jsonl file, or several");
    for (size_t i = 0; i < c.train_files.size(); ++i) {
      if (c.train_files[i].empty())
        fail_key(ErrorKind::Config, file, "data.train_file[" + std::to_string(i) + "]", "is empty: name a jsonl file");
    }
  } else if (complete || r.has("train_file")) {
    const std::string one = r.get_string("train_file");
    if (!one.empty()) c.train_files = {one};
  }
  for (const auto& f : c.train_files) c.train_file += (c.train_file.empty() ? "" : ", ") + f;
  c.eval_file = r.get_string("eval_file", c.eval_file);
  c.eval_fraction = r.get_double("eval_fraction", c.eval_fraction);
  c.format = pick<RecordFormat>(r, "format", c.format, record_formats());
  c.chat_template = pick<ChatTemplateChoice>(r, "chat_template", c.chat_template, chat_templates());
  if (r.has("chat_format")) c.chat_format = CustomChatFormat::from_json(section.at("chat_format"), file);
  if (c.chat_template == ChatTemplateChoice::Custom && c.chat_format.assistant_suffix.empty())
    fail_key(ErrorKind::Config, file, "data.chat_format.assistant_suffix",
             "is empty: data.chat_template \"custom\" needs the text that ends an answer (its end of turn, which the "
             "model learns to write and generation stops at, e.g. \"<|im_end|>\\n\")");
  if (!c.chat_format.default_system.empty() && c.chat_format.system_prefix.empty() &&
      c.chat_format.system_suffix.empty())
    fail_key(ErrorKind::Config, file, "data.chat_format.default_system",
             "is set, but the format has no system turn to render it in (system_prefix and system_suffix are empty)");
  if (c.chat_template != ChatTemplateChoice::Custom && !(c.chat_format == CustomChatFormat()))
    fail_key(ErrorKind::Config, file, "data.chat_format",
             "is set, but data.chat_template is \"" + std::string(chat_template_name(c.chat_template)) +
                 "\": the format is read with data.chat_template \"custom\" only");
  c.max_seq_len = r.get_int("max_seq_len", c.max_seq_len);
  c.truncation = pick<Truncation>(r, "truncation", c.truncation,
                                  {{"truncate", Truncation::Truncate}, {"drop", Truncation::Drop}, {"error", Truncation::Error}});
  c.packing = r.get_bool("packing", c.packing);
  c.packing_strategy = pick<PackingStrategy>(
      r, "packing_strategy", c.packing_strategy,
      {{"auto", PackingStrategy::Auto}, {"best_fit", PackingStrategy::BestFit}, {"in_order", PackingStrategy::InOrder}});
  if (c.packing_strategy == PackingStrategy::BestFit && !c.packing)
    fail_key(ErrorKind::Config, file, "data.packing_strategy",
             "\"best_fit\" fills packed rows, and data.packing is false (one document a row)");
  c.shuffle = r.get_bool("shuffle", c.shuffle);
  const int64_t seed = r.get_int("seed", static_cast<int64_t>(c.seed));
  c.train_on_prompt = r.get_bool("train_on_prompt", c.train_on_prompt);
  c.add_eos = r.get_bool("add_eos", c.add_eos);
  c.text_field = r.get_string("text_field", c.text_field);
  if (c.text_field.empty()) fail_key(ErrorKind::Config, file, "data.text_field", "must name a key of the records");

  if (complete && c.train_file.empty()) fail_key(ErrorKind::Config, file, "data.train_file", "must name a jsonl file");
  if (!(c.eval_fraction >= 0.0 && c.eval_fraction < 1.0))
    fail_key(ErrorKind::Config, file, "data.eval_fraction",
             "must be in [0, 1), got " + section.at("eval_fraction").dump());
  if (!c.eval_file.empty() && c.eval_fraction > 0.0)
    fail_key(ErrorKind::Config, file, "data.eval_fraction",
             "is set together with data.eval_file; held-out data comes from one or the other");
  // Two tokens is the least that holds one next-token target.
  if (c.max_seq_len < 2)
    fail_key(ErrorKind::Config, file, "data.max_seq_len", "must be at least 2, got " + std::to_string(c.max_seq_len));
  if (c.max_seq_len > kMaxSeqLen)
    fail_key(ErrorKind::Config, file, "data.max_seq_len",
             "is " + std::to_string(c.max_seq_len) + " tokens a row: at most " + std::to_string(kMaxSeqLen));
  if (seed < 0) fail_key(ErrorKind::Config, file, "data.seed", "must be >= 0, got " + std::to_string(seed));
  c.seed = static_cast<uint64_t>(seed);
  return c;
}

}  // namespace qt
