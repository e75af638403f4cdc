#include "lib/export/gguf_vocab.h"

#include <sentencepiece_processor.h>

#include <memory>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/data/bpe_tokenizer.h"

namespace qt {
namespace {

// llama.cpp's name for a tokenizer.json's pre-tokenizer (tokenizer.ggml.pre: how its vocab loader splits text before
// BPE). Llama 3's layout by its Split regex: Llama 3's -> llama-bpe, Qwen2's -> qwen2 (convert_hf_to_gguf.py tells
// them apart by hashing the ids of a test text; the regex is what differs). GPT-2's layout (ByteLevel with its own
// regex, no prefix space): after Digits(individual_digits) -> smollm (SmolLM / SmolLM2), alone -> gpt-2. Other
// layouts are refused naming the key (training's BpeTokenizer, lib/data/bpe_tokenizer.cpp, checks the rest of a
// tokenizer.json it reads; Qwen's is read here as it is).
std::string bpe_pre_tokenizer(const Json& doc, const std::string& json_path) {
  std::vector<const Json*> steps;
  if (doc.contains("pre_tokenizer") && doc.at("pre_tokenizer").is_object()) {
    const Json& pre = doc.at("pre_tokenizer");
    if (pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") && pre.at("pretokenizers").is_array())
      for (const auto& p : pre.at("pretokenizers")) steps.push_back(&p);
    else
      steps.push_back(&pre);
  }
  auto type_of = [](const Json* s) { return s->is_object() ? s->value("type", std::string()) : std::string(); };
  for (const Json* s : steps) {
    if (type_of(s) != "Split" || !s->contains("pattern") || !s->at("pattern").contains("Regex")) continue;
    const std::string regex = s->at("pattern").at("Regex").get<std::string>();
    if (regex == k_llama3_pattern) return "llama-bpe";
    if (regex == k_qwen2_pattern) return "qwen2";
    fail_key(ErrorKind::Model, json_path, "pre_tokenizer",
             "its Split regex is neither Llama 3's nor Qwen2's, the byte-level pre-tokenizers GGUF export names");
  }
  const Json* last = steps.empty() ? nullptr : steps.back();
  const bool byte_level_regex = last && type_of(last) == "ByteLevel" && last->value("use_regex", true) &&
                                !last->value("add_prefix_space", false);
  if (byte_level_regex && steps.size() == 1) return "gpt-2";
  if (byte_level_regex && steps.size() == 2 && type_of(steps[0]) == "Digits" &&
      steps[0]->value("individual_digits", false))
    return "smollm";
  fail_key(ErrorKind::Model, json_path, "pre_tokenizer",
           "expected a Split with Llama 3's or Qwen2's regex before ByteLevel, or ByteLevel with its own regex and no "
           "prefix space, alone (GPT-2's) or after Digits with individual_digits (SmolLM2's): the byte-level "
           "pre-tokenizers llama.cpp names");
}

// An added token as convert_hf_to_gguf.py types it (get_vocab_base, _create_vocab_sentencepiece): control when it
// is special or looks special (does_token_look_special: "<|...|>", "<｜...｜>", "<unused...>", "<pad>", "<mask>",
// "<2mass>", "[@BOS@]"; Qwen2.5 and Qwen3 leave <|fim_prefix|> and its kin non-special), else user-defined, its "▁"
// written as a space (the converter pre-normalizes user-defined tokens so).
void add_token(Vocab& v, std::string text, bool special) {
  auto wraps = [&](const std::string& open, const std::string& close) {
    return text.size() >= open.size() && text.size() >= close.size() && text.compare(0, open.size(), open) == 0 &&
           text.compare(text.size() - close.size(), close.size(), close) == 0;
  };
  const bool looks_special = text == "<pad>" || text == "<mask>" || text == "<2mass>" || text == "[@BOS@]" ||
                             wraps("<|", "|>") || wraps("<\xef\xbd\x9c", "\xef\xbd\x9c>") || wraps("<unused", ">");
  if (!special && !looks_special)
    for (size_t at = text.find("\xe2\x96\x81"); at != std::string::npos; at = text.find("\xe2\x96\x81", at + 1))
      text.replace(at, 3, " ");
  v.tokens.push_back(std::move(text));
  v.types.push_back(special || looks_special ? kControl : kUserDefined);
}

}  // namespace

// A token setting of tokenizer_config.json ("<pad>" or {"content": "<pad>", ...}); "" when absent or null.
std::string token_text(const Json& cfg, const std::string& key) {
  if (!cfg.contains(key)) return "";
  const Json& v = cfg.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
  return "";
}

// Pads `v` to `n` tokens as convert_hf_to_gguf.py does for ids the tokenizer lacks ("[PAD<id>]", unused); a
// tokenizer larger than the model's vocab_size cannot be written.
void pad_vocab(Vocab& v, int64_t n, const std::string& config_path) {
  if (static_cast<int64_t>(v.tokens.size()) > n)
    fail_key(ErrorKind::Model, config_path, "vocab_size",
             std::to_string(n) + " is smaller than the tokenizer's " + std::to_string(v.tokens.size()) + " tokens");
  for (int64_t i = static_cast<int64_t>(v.tokens.size()); i < n; ++i) {
    v.tokens.push_back("[PAD" + std::to_string(i) + "]");
    v.types.push_back(kUnused);
    if (v.model == "llama") v.scores.push_back(-1000.f);
  }
}

// Sentencepiece (Llama 2, Mistral): every piece with its score and type, as convert_hf_to_gguf.py's
// _create_vocab_sentencepiece reads them; tokenizer_config.json's added tokens past the model's pieces.
Vocab sentencepiece_vocab(const std::string& dir, const Json& tok_cfg) {
  const std::string path = files::join(dir, "tokenizer.model");
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(path).ok()) fail_at(ErrorKind::Model, path, "cannot be read as a sentencepiece model");
  Vocab v;
  v.model = "llama";
  v.pre = "default";
  const int n = sp.GetPieceSize();
  for (int i = 0; i < n; ++i) {
    v.tokens.push_back(sp.IdToPiece(i));
    v.scores.push_back(sp.GetScore(i));
    v.types.push_back(sp.IsUnknown(i)   ? kUnknown
                      : sp.IsControl(i) ? kControl
                      : sp.IsUnused(i)  ? kUnused
                      : sp.IsByte(i)    ? kByte
                                        : kNormal);
  }
  v.unk_id = sp.unk_id();
  if (tok_cfg.contains("added_tokens_decoder") && tok_cfg.at("added_tokens_decoder").is_object()) {
    std::map<int64_t, Json> added;
    for (const auto& [id, t] : tok_cfg.at("added_tokens_decoder").items()) added[std::stoll(id)] = t;
    for (const auto& [id, t] : added) {
      if (id < n || !t.contains("content")) continue;  // the model's own pieces keep their types
      while (static_cast<int64_t>(v.tokens.size()) < id) {
        v.tokens.push_back("[PAD" + std::to_string(v.tokens.size()) + "]");
        v.scores.push_back(-1000.f);
        v.types.push_back(kUnused);
      }
      add_token(v, t.at("content").get<std::string>(), t.value("special", false));
      v.scores.push_back(-1000.f);
    }
  }
  return v;
}

// Byte-level BPE (Llama 3's tokenizer.json): the vocab strings as they are (GPT-2's byte-to-unicode characters),
// added tokens as control (special) or user-defined, the merges as "left right" strings.
Vocab bpe_vocab(const std::string& json_path) {
  const Json doc = read_json_file(json_path, ErrorKind::Model);
  const Json& model = doc.at("model");
  Vocab v;
  v.model = "gpt2";
  v.pre = bpe_pre_tokenizer(doc, json_path);
  struct Entry {
    std::string text;
    bool added = false, special = false;
  };
  std::map<int64_t, Entry> by_id;
  for (const auto& [tok, id] : model.at("vocab").items()) by_id[id.get<int64_t>()] = {tok};
  if (doc.contains("added_tokens"))
    for (const auto& t : doc.at("added_tokens"))
      by_id[t.at("id").get<int64_t>()] = {t.at("content").get<std::string>(), true, t.value("special", false)};
  for (auto& [id, tok] : by_id) {
    while (static_cast<int64_t>(v.tokens.size()) < id) {
      v.tokens.push_back("[PAD" + std::to_string(v.tokens.size()) + "]");
      v.types.push_back(kUnused);
    }
    if (tok.added) {
      add_token(v, std::move(tok.text), tok.special);
    } else {
      v.tokens.push_back(std::move(tok.text));
      v.types.push_back(kNormal);
    }
  }
  if (model.contains("merges"))
    for (const auto& m : model.at("merges")) {
      if (m.is_string())
        v.merges.push_back(m.get<std::string>());
      else if (m.is_array() && m.size() == 2)
        v.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      else
        fail_key(ErrorKind::Model, json_path, "model.merges", "expected \"a b\" strings or [a, b] pairs");
    }
  if (model.contains("unk_token") && model.at("unk_token").is_string()) {
    const std::string unk = model.at("unk_token").get<std::string>();
    for (size_t i = 0; i < v.tokens.size(); ++i)
      if (v.tokens[i] == unk) v.unk_id = static_cast<int32_t>(i);
  }
  return v;
}

// Special ids from tokenizer_config.json (bos_token, eos_token as strings or {"content": ...}; config.json's
// eos_token_id when it names none), add_bos_token / add_eos_token (false when absent, as Qwen's files leave them),
// and the chat template (tokenizer_config.json's, else chat_template.jinja).
SpecialTokens special_tokens_from_files(const Vocab& v, const Json& cfg, const std::string& cfg_path,
                                        const std::string& dir, const LlamaConfig& config) {
  SpecialTokens s;
  auto id = [&](const char* key) {
    const std::string text = token_text(cfg, key);
    if (text.empty()) return int32_t{-1};
    const int32_t i = v.id_of(text);
    if (i < 0) fail_key(ErrorKind::Model, cfg_path, key, "'" + text + "' is not a token of tokenizer.json");
    return i;
  };
  s.bos = id("bos_token");
  s.eos = id("eos_token");
  if (s.eos < 0 && config.eos_token_id >= 0) s.eos = static_cast<int32_t>(config.eos_token_id);
  if (cfg.contains("add_bos_token") && cfg.at("add_bos_token").is_boolean())
    s.add_bos = cfg.at("add_bos_token").get<bool>();
  if (cfg.contains("add_eos_token") && cfg.at("add_eos_token").is_boolean())
    s.add_eos = cfg.at("add_eos_token").get<bool>();
  if (cfg.contains("chat_template") && cfg.at("chat_template").is_string())
    s.chat_template = cfg.at("chat_template").get<std::string>();
  else if (const std::string jinja = files::join(dir, "chat_template.jinja"); files::exists(jinja))
    s.chat_template = files::read_file(jinja);
  return s;
}

}  // namespace qt
