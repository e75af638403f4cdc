#include "lib/core/json.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lib/core/files.h"

namespace qt {

namespace {

// The parser's message with the bytes it quotes made printable: control bytes and bytes of invalid UTF-8 as \xNN
// (a terminal would otherwise get them raw); valid multi-byte characters are kept.
std::string printable(const std::string& s) {
  std::string out;
  const auto hex = [&](unsigned char c) {
    static const char* digits = "0123456789abcdef";
    out += "\\x";
    out += digits[c >> 4];
    out += digits[c & 15];
  };
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    const size_t n = c >= 0xc2 && c < 0xe0 ? 2 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xf0 && c < 0xf5 ? 4 : 0;
    bool valid = n > 0 && i + n <= s.size();
    for (size_t k = 1; valid && k < n; ++k) valid = (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80;
    if (valid) {
      out.append(s, i, n);
      i += n;
    } else {
      hex(c);
      ++i;
    }
  }
  return out;
}

// "line L, column C" of the byte at `offset` of `text`, for humans.
std::string line_column(const std::string& text, size_t offset) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

}  // namespace

Json parse_json(const std::string& text, const std::string& where, ErrorKind kind) {
  // nlohmann's lexer takes a NUL byte for the end of the input: what follows would be dropped without a word.
  if (const size_t nul = text.find('\0'); nul != std::string::npos)
    fail_at(kind, where, "a NUL byte at " + line_column(text, nul) + " (JSON text holds none)");
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    // nlohmann reports a byte offset (one past the byte it stopped at).
    std::string what = e.what();
    auto pos = what.find("parse error");
    fail_at(kind, where, "malformed JSON at " + line_column(text, e.byte - (e.byte > 0 ? 1 : 0)) + " (" +
                             printable(pos == std::string::npos ? what : what.substr(pos)) + ")");
  } catch (const Json::out_of_range& e) {  // a number beyond a double's range (1e400)
    const std::string what = e.what();
    const auto pos = what.find(']');
    fail_at(kind, where, "a number out of range: " + (pos == std::string::npos ? what : what.substr(pos + 2)));
  }
}

Json read_json_file(const std::string& path, ErrorKind kind) {
  if (files::is_dir(path)) fail_at(kind, path, "is a directory, not a JSON file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_at(kind, path, errno == ENOENT ? std::string("file not found") : std::string("cannot be read (") + std::strerror(errno) + ")");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_json(ss.str(), path, kind);
}

void write_json_file(const std::string& path, const Json& value) {
  files::write_file_atomically(path, value.dump(2) + "\n");
}

const char* json_type_name(const Json& value) {
  if (value.is_number_integer()) return "an integer";
  if (value.is_number()) return "a number";
  return value.type_name();
}

static size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::optional<std::string> nearest_key(const std::string& key, const std::vector<std::string>& known) {
  std::optional<std::string> best;
  size_t best_d = std::max<size_t>(2, key.size() / 3) + 1;
  for (const auto& k : known) {
    size_t d = edit_distance(key, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  return best;
}

namespace {

// Keys as Hugging Face's TrainingArguments, PEFT's LoraConfig and TRL's SFTConfig spell them, wherever they are put,
// and what this trainer calls them: an unknown key found here is answered with the key to use.
const std::vector<std::pair<std::string, std::string>>& peer_spellings() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"lora_alpha", "lora.alpha"},
      {"target_modules", "lora.targets"},
      {"lora_dropout", "lora.dropout"},
      {"max_steps", "train.steps"},
      {"num_train_epochs", "train.epochs"},
      {"gradient_accumulation_steps",
       "train.batch_size (the global batch of one optimizer step, in rows) with train.micro_batch_size: the "
       "accumulation steps follow from them and the world size"},
      {"per_device_train_batch_size", "train.micro_batch_size (train.batch_size is the global batch)"},
      {"gradient_checkpointing", "train.grad_checkpointing"},
      {"logging_steps", "train.log_every"},
      {"eval_steps", "train.eval_every"},
      {"neftune_noise_alpha", "train.neftune_alpha"},
      {"learning_rate", "optim.lr"},
      {"lr_scheduler_type", "optim.schedule"},
      {"adam_beta1", "optim.beta1"},
      {"adam_beta2", "optim.beta2"},
      {"adam_epsilon", "optim.eps"},
      {"max_length", "data.max_seq_len"},
      {"max_seq_length", "data.max_seq_len"},
      {"save_steps", "checkpoint.every"},
      {"save_total_limit", "checkpoint.keep_last"},
      {"load_best_model_at_end", "checkpoint.save_best"},
      {"early_stopping_patience", "train.early_stopping_patience"},
      {"loraplus_lr_ratio", "optim.loraplus_lr_ratio"},
      {"optim", "optim.name (\"adamw\" or \"adamw_8bit\")"},
      {"dataset_text_field", "data.text_field"},
  };
  return table;
}

}  // namespace

void reject_unknown_keys(const Json& object, const std::vector<std::string>& known, const std::string& file,
                         const std::string& prefix, ErrorKind kind) {
  if (!object.is_object()) {
    if (prefix.empty()) fail_at(kind, file, "top level must be a JSON object");
    fail_key(kind, file, prefix.substr(0, prefix.size() - 1),
             std::string("expected a JSON object (a section of keys), got ") + json_type_name(object) + " " + object.dump());
  }
  for (const auto& item : object.items()) {
    if (std::find(known.begin(), known.end(), item.key()) != known.end()) continue;
    std::string msg = "unknown key '" + prefix + item.key() + "'";
    const auto& peers = peer_spellings();
    auto peer = std::find_if(peers.begin(), peers.end(), [&](const auto& p) { return p.first == item.key(); });
    if (peer != peers.end()) msg += " (did you mean " + peer->second + "?)";
    else if (auto near = nearest_key(item.key(), known)) msg += " (did you mean '" + prefix + *near + "'?)";
    fail_at(kind, file, msg);
  }
}

const Json& JsonReader::require(const std::string& key) const {
  if (!object.is_object()) fail_at(kind, file, (prefix.empty() ? "top level" : prefix) + " must be a JSON object");
  if (!has(key)) fail_key(kind, file, path(key), "missing");
  return object.at(key);
}

int64_t JsonReader::get_int(const std::string& key) const {
  const Json& v = require(key);
  // nlohmann keeps integers above 2^63 - 1 unsigned: read as int64 they would wrap to negative ones (-1 for 2^64 - 1).
  constexpr double kInt64Bound = 9223372036854775808.0;  // 2^63
  const bool too_large = v.is_number_unsigned() ? v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                                                : v.is_number_float() && std::abs(v.get<double>()) >= kInt64Bound;
  if (too_large)
    fail_key(kind, file, path(key), "expected an integer, got " + v.dump() + ", beyond a 64-bit integer's range");
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (d == static_cast<double>(static_cast<int64_t>(d))) return static_cast<int64_t>(d);
  }
  fail_key(kind, file, path(key), std::string("expected an integer, got ") + json_type_name(v) + " " + v.dump());
}

double JsonReader::get_double(const std::string& key) const {
  const Json& v = require(key);
  if (v.is_number()) return v.get<double>();
  fail_key(kind, file, path(key), std::string("expected a number, got ") + json_type_name(v) + " " + v.dump());
}

bool JsonReader::get_bool(const std::string& key) const {
  const Json& v = require(key);
  if (v.is_boolean()) return v.get<bool>();
  fail_key(kind, file, path(key), std::string("expected true or false, got ") + json_type_name(v) + " " + v.dump());
}

std::string JsonReader::get_string(const std::string& key) const {
  const Json& v = require(key);
  if (v.is_string()) return v.get<std::string>();
  fail_key(kind, file, path(key), std::string("expected a string, got ") + json_type_name(v) + " " + v.dump());
}

std::vector<std::string> JsonReader::get_strings(const std::string& key) const {
  const Json& v = require(key);
  if (v.is_string()) return {v.get<std::string>()};
  if (!v.is_array()) fail_key(kind, file, path(key), std::string("expected a list of strings, got ") + json_type_name(v));
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string()) fail_key(kind, file, path(key), "expected a list of strings, found " + e.dump());
    out.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace qt
