#include "lib/data/tokenizer.h"

#include "lib/core/files.h"

#include <fstream>
#include <optional>
#include <sstream>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/data/bpe_tokenizer.h"
#include "lib/data/sentencepiece_tokenizer.h"

namespace qt {

std::vector<int32_t> Tokenizer::encode_document(std::string_view text) const {
  std::vector<int32_t> ids;
  if (add_bos_ && bos_id_ >= 0) ids.push_back(bos_id_);
  std::vector<int32_t> body = encode(text);
  ids.insert(ids.end(), body.begin(), body.end());
  if (add_eos_ && eos_id_ >= 0) ids.push_back(eos_id_);
  return ids;
}

namespace {

// A special token as transformers writes it in tokenizer_config.json / special_tokens_map.json: a string,
// an AddedToken object {"content": ...}, or null (the model has none).
struct TokenSetting {
  bool present = false;             // the key is there
  std::optional<std::string> name;  // nullopt: explicitly null
  std::string file;
};

TokenSetting token_setting(const Json& doc, const std::string& file, const std::string& key) {
  TokenSetting s;
  if (!doc.is_object() || !doc.contains(key)) return s;
  s.present = true;
  s.file = file;
  const Json& v = doc.at(key);
  if (v.is_null()) return s;
  if (v.is_string()) {
    s.name = v.get<std::string>();
  } else if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
    s.name = v.at("content").get<std::string>();
  } else {
    fail_key(ErrorKind::Model, file, key, "expected a string or an object with a string \"content\", got " + v.dump());
  }
  return s;
}

std::optional<bool> bool_setting(const Json& doc, const std::string& file, const std::string& key) {
  if (!doc.is_object() || !doc.contains(key) || doc.at(key).is_null()) return std::nullopt;
  if (!doc.at(key).is_boolean())
    fail_key(ErrorKind::Model, file, key, "expected true or false, got " + doc.at(key).dump());
  return doc.at(key).get<bool>();
}

std::string read_text_file(const std::string& path) {
  if (files::is_dir(path)) fail_at(ErrorKind::Model, path, "is a directory, not a text file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_at(ErrorKind::Model, path, "cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} (the "default" one is
// used). Newer transformers versions save it beside the config instead: chat_template.jinja or
// chat_template.json.
std::string chat_template(const Json& cfg, const std::string& dir, const std::string& cfg_file) {
  if (cfg.is_object() && cfg.contains("chat_template") && !cfg.at("chat_template").is_null()) {
    const Json& t = cfg.at("chat_template");
    if (t.is_string()) return t.get<std::string>();
    if (t.is_array() && !t.empty()) {
      for (const auto& entry : t)
        if (entry.value("name", "") == "default" && entry.contains("template")) return entry.at("template").get<std::string>();
      if (t.at(0).contains("template") && t.at(0).at("template").is_string()) return t.at(0).at("template").get<std::string>();
    }
    fail_key(ErrorKind::Model, cfg_file, "chat_template",
             "expected a string or a list of {\"name\", \"template\"}, got " + t.dump().substr(0, 80));
  }
  if (files::exists(files::join(dir, "chat_template.jinja"))) return read_text_file(files::join(dir, "chat_template.jinja"));
  if (files::exists(files::join(dir, "chat_template.json"))) {
    std::string file = files::join(dir, "chat_template.json");
    return JsonReader{read_json_file(file, ErrorKind::Model), file, ErrorKind::Model}.get_string("chat_template");
  }
  return "";
}

// What tokenizer.json's Metaspace pre-tokenizer does ("prepend_scheme", or the older "add_prefix_space"), if `node`
// is one.
std::optional<DummyPrefix> metaspace_scheme(const Json& node, const std::string& file, const std::string& key) {
  if (!node.is_object() || node.value("type", "") != "Metaspace") return std::nullopt;
  if (node.contains("prepend_scheme") && node.at("prepend_scheme").is_string()) {
    const std::string scheme = node.at("prepend_scheme").get<std::string>();
    if (scheme == "always") return DummyPrefix::MetaspaceAlways;
    if (scheme == "first") return DummyPrefix::First;
    if (scheme == "never") return DummyPrefix::Never;
    fail_key(ErrorKind::Model, file, key + ".prepend_scheme",
             "is \"" + scheme + "\" (expected \"always\", \"first\" or \"never\")");
  }
  if (node.contains("add_prefix_space") && node.at("add_prefix_space").is_boolean())
    return node.at("add_prefix_space").get<bool>() ? DummyPrefix::MetaspaceAlways : DummyPrefix::Never;
  return DummyPrefix::MetaspaceAlways;  // tokenizers' default scheme
}

// Where a sentencepiece model's dummy prefix goes, as transformers 4.x reads the directory: its fast tokenizer
// runs tokenizer.json's pipeline where there is one (a Metaspace pre-tokenizer's prepend_scheme; a Prepend
// normalizer, as Llama 2's files have, prefixes every run of text as sentencepiece does; neither: no prefix); else,
// or where tokenizer_config.json sets add_prefix_space (which makes it convert the sentencepiece model anew), it
// converts the model as tokenizer_config.json's `legacy` says (true, the default: a Prepend normalizer; false: a
// Metaspace "first"; add_prefix_space false: no prefix either way).
DummyPrefix spm_dummy_prefix(const Json* tokenizer_json, const std::string& json_path, const Json& cfg,
                             const std::string& cfg_file) {
  const bool legacy = bool_setting(cfg, cfg_file, "legacy").value_or(true);
  if (const std::optional<bool> add_prefix_space = bool_setting(cfg, cfg_file, "add_prefix_space"))
    return !*add_prefix_space ? DummyPrefix::Never : legacy ? DummyPrefix::Always : DummyPrefix::First;
  if (tokenizer_json && tokenizer_json->is_object()) {
    const Json& pre = tokenizer_json->value("pre_tokenizer", Json());
    if (auto p = metaspace_scheme(pre, json_path, "pre_tokenizer")) return *p;
    if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers"))
      for (size_t i = 0; i < pre.at("pretokenizers").size(); ++i)
        if (auto p = metaspace_scheme(pre.at("pretokenizers")[i], json_path,
                                      "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]"))
          return *p;
    const Json& norm = tokenizer_json->value("normalizer", Json());
    const auto prepends = [](const Json& n) { return n.is_object() && n.value("type", "") == "Prepend"; };
    if (prepends(norm)) return DummyPrefix::Always;
    if (norm.is_object() && norm.value("type", "") == "Sequence" && norm.contains("normalizers"))
      for (const auto& step : norm.at("normalizers"))
        if (prepends(step)) return DummyPrefix::Always;
    return DummyPrefix::Never;
  }
  return legacy ? DummyPrefix::Always : DummyPrefix::First;
}

}  // namespace

// A field of an unexpected type deep in a tokenizer file (nlohmann's type errors) is the file's fault: a model
// error naming the directory's tokenizer files, not an internal error.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir) try {
  const std::string& dir = model_dir;
  if (!files::is_dir(dir))
    fail_at(ErrorKind::Model, model_dir, "not a directory (expected a model directory with tokenizer files)");
  const std::string json_path = files::join(dir, "tokenizer.json"), model_path = files::join(dir, "tokenizer.model");
  const bool has_json = files::exists(json_path), has_model = files::exists(model_path);

  const std::string cfg_file = files::join(dir, "tokenizer_config.json");
  const std::string map_file = files::join(dir, "special_tokens_map.json");
  const Json cfg = files::exists(cfg_file) ? read_json_file(cfg_file, ErrorKind::Model) : Json::object();
  const Json map = files::exists(map_file) ? read_json_file(map_file, ErrorKind::Model) : Json::object();
  for (const auto& [doc, file] : {std::pair<const Json&, const std::string&>{cfg, cfg_file}, {map, map_file}})
    if (!doc.is_object())
      fail_at(ErrorKind::Model, file, std::string("expected a JSON object, got ") + json_type_name(doc));

  std::unique_ptr<Tokenizer> tok;
  Json doc;
  if (has_json) {
    doc = read_json_file(json_path, ErrorKind::Model);
    const Json* model = doc.is_object() && doc.contains("model") ? &doc.at("model") : nullptr;
    std::string type = model && model->is_object() ? model->value("type", "") : "";
    if ((type == "BPE" || type.empty()) && is_byte_level_tokenizer_json(doc)) {
      tok = std::make_unique<BpeTokenizer>(doc, json_path);
    } else if (!has_model) {
      // Only byte-level BPE is implemented from tokenizer.json; other models (sentencepiece-style BPE with
      // byte_fallback, WordPiece, Unigram) need their tokenizer.model.
      if (type != "BPE")
        fail_key(ErrorKind::Model, json_path, "model.type",
                 "expected \"BPE\" (byte-level, as Llama 3), got " + (model && model->contains("type") ? model->at("type").dump() : "none") +
                     "; and there is no tokenizer.model (sentencepiece) in " + model_dir);
      fail_key(ErrorKind::Model, json_path, "pre_tokenizer",
               "expected a ByteLevel pre-tokenizer (as Llama 3); and there is no tokenizer.model (sentencepiece) in " +
                   model_dir);
    }
  }
  if (!tok && has_model)
    tok = std::make_unique<SentencePieceTokenizer>(
        model_path, spm_dummy_prefix(has_json ? &doc : nullptr, json_path, cfg, cfg_file));
  if (!tok)
    fail_at(ErrorKind::Model, model_dir,
            "no tokenizer found: expected tokenizer.json (byte-level BPE, Llama 3) or tokenizer.model "
            "(sentencepiece, Llama 2)");

  // Special tokens: tokenizer_config.json, then special_tokens_map.json, then what the model files imply.
  const TokenizerDefaults d = tok->defaults();

  auto resolve = [&](const std::string& key, int32_t fallback) {
    TokenSetting s = token_setting(cfg, cfg_file, key);
    if (!s.present) s = token_setting(map, map_file, key);
    if (!s.present) return fallback;
    if (!s.name) return int32_t{-1};
    int32_t id = tok->token_to_id(*s.name);
    if (id < 0) fail_key(ErrorKind::Model, s.file, key, "\"" + *s.name + "\" is not a token of the tokenizer");
    return id;
  };
  tok->bos_id_ = resolve("bos_token", d.bos_id);
  tok->eos_id_ = resolve("eos_token", d.eos_id);
  // An explicit add_bos_token / add_eos_token wins over the post-processor (transformers' LlamaTokenizerFast
  // rebuilds its template from these flags).
  tok->add_bos_ = bool_setting(cfg, cfg_file, "add_bos_token").value_or(d.add_bos);
  tok->add_eos_ = bool_setting(cfg, cfg_file, "add_eos_token").value_or(d.add_eos);
  if (tok->add_bos_ && tok->bos_id_ < 0)
    fail_key(ErrorKind::Model, cfg_file, "add_bos_token", "is true but the tokenizer has no BOS token");
  if (tok->add_eos_ && tok->eos_id_ < 0)
    fail_key(ErrorKind::Model, cfg_file, "add_eos_token", "is true but the tokenizer has no EOS token");
  tok->chat_template_ = chat_template(cfg, dir, cfg_file);
  return tok;
} catch (const nlohmann::json::exception& e) {
  fail_at(ErrorKind::Model, model_dir,
          std::string("a tokenizer file (tokenizer.json, tokenizer_config.json or special_tokens_map.json) holds a "
                      "field of an unexpected type or lacks a key: ") + e.what());
}

namespace {

class IdsOnlyTokenizer : public Tokenizer {
 public:
  IdsOnlyTokenizer(int32_t vocab, int32_t bos, int32_t eos) : vocab_(vocab) {
    bos_id_ = bos;
    eos_id_ = eos;
  }
  std::vector<int32_t> encode(std::string_view) const override { no_text(); }
  std::vector<int32_t> encode_with_special(std::string_view) const override { no_text(); }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
    return out;
  }
  int32_t vocab_size() const override { return vocab_; }
  int32_t token_to_id(std::string_view) const override { return -1; }
  std::string id_to_token(int32_t id) const override { return id >= 0 && id < vocab_ ? std::to_string(id) : ""; }
  TokenizerDefaults defaults() const override { return {bos_id_, eos_id_, false, false}; }

 private:
  [[noreturn]] static void no_text() {
    fail(ErrorKind::Data,
         "this model has no tokenizer (model.init \"random\" with a named shape): text data cannot be encoded; "
         "give pre-tokenized records ({\"input_ids\": [...]}) with data.format \"tokenized\"");
  }
  int32_t vocab_;
};

}  // namespace

std::unique_ptr<Tokenizer> ids_only_tokenizer(int32_t vocab_size, int32_t bos_id, int32_t eos_id) {
  return std::make_unique<IdsOnlyTokenizer>(vocab_size, bos_id, eos_id);
}

}  // namespace qt
