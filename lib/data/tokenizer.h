#pragma once
// Text <-> token ids for LLaMA-family models, reproducing the ids of the model's own tokenizer files:
//   - Llama 3: tokenizer.json (Hugging Face `tokenizers` format), byte-level BPE   -> BpeTokenizer
//   - Llama 2 / Mistral: tokenizer.model (sentencepiece)                           -> SentencePieceTokenizer
// BOS/EOS ids, whether a document gets them, and the chat template come from tokenizer_config.json,
// special_tokens_map.json and tokenizer.json's post-processor, as transformers reads them.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qt {

// What a tokenizer's own model file implies when tokenizer_config.json is silent: sentencepiece's bos/eos ids,
// or the tokens a tokenizer.json post-processor template puts around a sequence.
struct TokenizerDefaults {
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  bool add_bos = false;
  bool add_eos = false;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Ids of `text` with no special tokens added; special-token strings in the text ("<|eot_id|>") are plain text.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // As encode(), but special-token strings in the text become their ids (what `tokenizers` does by default).
  virtual std::vector<int32_t> encode_with_special(std::string_view text) const = 0;
  // As encode_with_special, for text that does not start the input: it follows a special token written in the
  // text (a chat template's BOS). Only a sentencepiece tokenizer whose files put the dummy prefix at the input's
  // start alone (DummyPrefix::First, transformers' non-legacy Llama tokenizer) encodes it differently.
  virtual std::vector<int32_t> encode_after_special(std::string_view text) const { return encode_with_special(text); }
  // Bytes of the ids, special tokens included as their text (sentencepiece drops control tokens, as it does).
  // Not lossy: a prefix of a sequence may end inside a UTF-8 character.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;

  // A token that decode() leaves out (sentencepiece's control pieces: <s>, </s>, Mistral v0.3's [INST]).
  virtual bool dropped_by_decode(int32_t /*id*/) const { return false; }

  // One more than the largest id (added tokens included).
  virtual int32_t vocab_size() const = 0;
  virtual int32_t token_to_id(std::string_view token) const = 0;  // -1 if absent
  virtual std::string id_to_token(int32_t id) const = 0;         // "" if out of range

  int32_t bos_id() const { return bos_id_; }  // -1 if the model has none
  int32_t eos_id() const { return eos_id_; }  // -1 if the model has none
  bool add_bos() const { return add_bos_; }   // a document starts with BOS, as the model's files say
  bool add_eos() const { return add_eos_; }   // a document ends with EOS, as the model's files say
  // tokenizer_config.json's chat_template (Jinja source), empty if none.
  const std::string& chat_template() const { return chat_template_; }

  // encode(text) with BOS/EOS added as add_bos()/add_eos() say.
  std::vector<int32_t> encode_document(std::string_view text) const;

  virtual TokenizerDefaults defaults() const = 0;

 protected:
  friend std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir);

  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  bool add_bos_ = false;
  bool add_eos_ = false;
  std::string chat_template_;
};

// Loads the tokenizer of a Hugging Face model directory: tokenizer.json with a byte-level BPE model -> BPE;
// otherwise tokenizer.model -> sentencepiece; otherwise qt::Error(Model) naming the directory and the files
// looked for. Malformed or unsupported files are qt::Error(Model) naming the file and the key.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir);

// A stand-in for a model that has no tokenizer files (model.init "random" with a named shape): ids only. Token
// ids below `vocab_size` are valid; encode/decode fail with qt::Error(Data) saying that the data must be
// pre-tokenized (data.format "tokenized").
std::unique_ptr<Tokenizer> ids_only_tokenizer(int32_t vocab_size, int32_t bos_id, int32_t eos_id);

}  // namespace qt
