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

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model_path);  // qt::Error(Model) naming the file
  ~SentencePieceTokenizer() override;

  std::vector<int32_t> encode(std::string_view text) const override;
  // Control tokens' strings (Llama 2: "<s>", "</s>") become their ids; each text piece between them is encoded
  // on its own, with its own dummy prefix, as transformers' legacy Llama tokenizer does.
  std::vector<int32_t> encode_with_special(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t vocab_size() const override;
  int32_t token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  TokenizerDefaults defaults() const override;

 private:
  std::vector<int32_t> encode_whole(std::string_view text) const;

  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::vector<std::pair<std::string, int32_t>> controls_;  // control pieces, longest first
};

}  // namespace qt
