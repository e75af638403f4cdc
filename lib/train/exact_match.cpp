#include "lib/train/exact_match.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <ATen/core/grad_mode.h>

#include "lib/core/error.h"
#include "lib/data/jsonl.h"
#include "lib/data/records.h"
#include "lib/model/generate.h"

namespace qt {
namespace {

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  auto a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  auto b = s.find_last_not_of(ws);
  return s.substr(a, b - a + 1);
}

// The answer without a reasoning block before it: what follows the last </think> (Qwen3's template renders an answer
// as "<think>\n...\n</think>\n\n" + its content, and takes a content's own <think> block out the same way).
std::string answer_text(const std::string& s) {
  const size_t close = s.rfind("</think>");
  return trim(close == std::string::npos ? s : s.substr(close + 8));
}

}  // namespace

std::vector<int32_t> answer_stop_ids(const Tokenizer& tokenizer, const DataConfig& data) {
  std::vector<int32_t> ids;
  if (tokenizer.eos_id() >= 0) ids.push_back(tokenizer.eos_id());
  for (const char* t : {"<|eot_id|>", "<|end_of_text|>", "<|im_end|>"})
    if (tokenizer.token_to_id(t) >= 0) ids.push_back(tokenizer.token_to_id(t));
  if (data.chat_template == ChatTemplateChoice::Custom && !data.chat_format.assistant_suffix.empty()) {
    const std::string& suffix = data.chat_format.assistant_suffix;
    const std::vector<int32_t> special = tokenizer.encode_with_special(suffix), plain = tokenizer.encode(suffix);
    if (!special.empty() && (plain.empty() || special.front() != plain.front())) ids.push_back(special.front());
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

ExactMatchResult exact_match(LlamaModel& model, const Tokenizer& tokenizer, const DataConfig& data,
                             const std::string& path, int64_t max_examples, int64_t max_new_tokens, int shard,
                             int shards, int64_t batch_tokens) {
  at::NoGradGuard no_grad;
  model.set_training(false);
  ExactMatchResult r;
  GenerateOptions gen;
  gen.max_new_tokens = max_new_tokens;
  gen.stop_ids = answer_stop_ids(tokenizer, data);
  gen.cuda_graph = false;  // (GenerateOptions::cuda_graph: a few steps a batch, beside a training plan's budget)
  // A DPO run's records are pairs (a KTO run's unpaired records); its exact-match file may hold pairs (the chosen
  // completion is the answer) or records of any other format with an answer, each read by its keys.
  DataConfig records = data;
  if (records.format == RecordFormat::Preference || records.format == RecordFormat::Unpaired)
    records.format = RecordFormat::Auto;
  int64_t index = 0;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> answers;
  for (const auto& record : read_jsonl(path)) {
    if (index >= max_examples) break;
    const bool mine = index++ % shards == shard;
    const std::string where = path + ":" + std::to_string(record.line);
    std::string expected;
    if (record.value.contains("output")) {
      expected = record_string(record, path, "output");
    } else if (record.value.contains("completion") && record.value.at("completion").is_string()) {
      expected = record_string(record, path, "completion");
    } else if (record.value.contains("completion") && record.value.at("completion").is_array() &&
               !record.value.at("completion").empty() && record.value.at("completion").back().is_object() &&
               record.value.at("completion").back().value("content", Json()).is_string()) {
      expected = record.value.at("completion").back().at("content").get<std::string>();
    } else if (const Json& chosen = record.value.contains("chosen") ? record.value.at("chosen") : Json();
               chosen.is_string() || (chosen.is_array() && !chosen.empty() && chosen.back().is_object() &&
                                      chosen.back().value("content", Json()).is_string())) {
      expected = chosen.is_string() ? chosen.get<std::string>() : chosen.back().at("content").get<std::string>();
    } else if (const Json messages = chat_messages(record.value, where);
               messages.is_array() && !messages.empty() && messages.back().is_object() &&
               messages.back().value("role", "") == "assistant" &&
               messages.back().value("content", Json()).is_string()) {
      expected = messages.back().at("content").get<std::string>();
    } else {
      fail_at(ErrorKind::Data, where,
              "an exact-match record needs an answer (\"output\", \"completion\", a preference pair's \"chosen\", or a "
              "last assistant message)");
    }
    Example e = tokenize_record(record.value, where, records, tokenizer);
    std::vector<int32_t> prompt = prompt_tokens(e);
    if (prompt.empty()) fail_at(ErrorKind::Data, where, "the record has no prompt tokens");
    if (!mine) continue;
    prompts.push_back(std::move(prompt));
    answers.push_back(std::move(expected));
  }
  // The share's prompts generated together (generate_batch), at most batch_tokens cached tokens at a time.
  const std::vector<GenerateResult> generated = generate_batch(model, prompts, gen, batch_tokens);
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int32_t> answer = generated[i].tokens;
    if (generated[i].stopped && !answer.empty()) answer.pop_back();
    const std::string got = answer_text(tokenizer.decode(answer));
    const std::string expected = answer_text(answers[i]);
    const bool ok = got == expected;
    r.correct += ok;
    ++r.total;
    if (r.samples.size() < 3) r.samples.push_back("'" + got + "' (expected '" + expected + "')" + (ok ? " ok" : ""));
  }
  return r;
}

}  // namespace qt
