#pragma once
// A sentencepiece tokenizer.model (Llama 2, Mistral), run by the sentencepiece C++ library itself so that ids
// match the Python package (same normalizer, byte fallback, dummy prefix) exactly.
#include <memory>
#include <string>
#include <vector>

#include "lib/data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace qt {

// Where sentencepiece's dummy prefix (the "▁" before the text) goes, as the model directory's tokenizer files
// say (transformers' Llama tokenizers):
//   Always:          before every run of text between special tokens, as sentencepiece adds it (the legacy
//                    tokenizer; tokenizer.json's Prepend normalizer): Llama 2, TinyLlama, Mistral v0.1;
//   MetaspaceAlways: before every run that does not start with a space (tokenizer.json's Metaspace
//                    prepend_scheme "always", whose space already is the "▁");
//   First:           before the run at the input's start alone, where it does not start with a space (Metaspace
//                    "first": the non-legacy tokenizer): Mistral v0.3;
//   Never:           nowhere (Metaspace "never").
enum class DummyPrefix { Always, MetaspaceAlways, First, Never };

class SentencePieceTokenizer : public Tokenizer {
 public:
  // qt::Error(Model) naming the file.
  explicit SentencePieceTokenizer(const std::string& model_path, DummyPrefix prefix = DummyPrefix::Always);
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> encode(std::string_view text) const override;
  // Control tokens' strings (Llama 2: "<s>", "</s>"; Mistral v0.3: "[INST]" too) become their ids; each text piece
  // between them is encoded on its own, with the dummy prefix where dummy_prefix() puts it.
  std::vector<int32_t> encode_with_special(std::string_view text) const override;
  std::vector<int32_t> encode_after_special(std::string_view text) const override;
  DummyPrefix dummy_prefix() const { return prefix_; }
  std::string decode(const std::vector<int32_t>& ids) const override;
  bool dropped_by_decode(int32_t id) const override;
  int32_t vocab_size() const override;
  int32_t token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  TokenizerDefaults defaults() const override;

 private:
  // `prefixed`: the text gets the dummy prefix (the model's own processor), else not (bare_).
  std::vector<int32_t> encode_whole(std::string_view text, bool prefixed = true) const;
  std::vector<int32_t> encode_text(std::string_view text, bool prefixed) const;
  // `at_start`: the text's first run starts the input (else it follows a special token).
  std::vector<int32_t> encode_segments(std::string_view text, bool at_start) const;
  bool prefixes(std::string_view run, bool at_start) const;  // the run gets the dummy prefix

  std::string path_;
  DummyPrefix prefix_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> bare_;  // the model without its dummy prefix (not Always)
  std::vector<std::pair<std::string, int32_t>> controls_;  // control pieces, longest first
};

}  // namespace qt
