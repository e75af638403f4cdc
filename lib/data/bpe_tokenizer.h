#pragma once
// Byte-level BPE as Hugging Face `tokenizers` runs it for Llama 3's tokenizer.json:
//   1. added tokens are split out first (exact match, leftmost-longest; lstrip / rstrip ones with the white space
//      beside them);
//   2. the rest is pre-tokenized by Llama 3's regex (hand-written here: no regex library on the GPU image);
//   3. each pre-token's bytes are mapped to printable characters (GPT-2's bytes_to_unicode) and merged by
//      rank (tokenizers' BPE model: lowest rank first, leftmost on ties), with a per-pre-token cache.
#include <nlohmann/json_fwd.hpp>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lib/data/tokenizer.h"

namespace qt {

// Llama 3's pre-tokenization pattern, as it appears in its tokenizer.json (Split, behavior Isolated):
inline constexpr const char* k_llama3_pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Qwen2's (Qwen2 / 2.5 / 3 tokenizer.json): Llama 3's with digits one at a time (\p{N} for \p{N}{1,3}).
inline constexpr const char* k_qwen2_pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Splits `text` as tokenizers' Split(Regex(k_llama3_pattern), "isolated") does (max_digits 3), or with
// k_qwen2_pattern (max_digits 1); the pieces cover the text.
std::vector<std::string_view> llama3_pre_tokenize(std::string_view text, int max_digits = 3);

// Splits `text` as tokenizers' ByteLevel pre-tokenizer with use_regex true does (GPT-2's regex, "'s|'t|'re|'ve|'m|'ll|
// 'd| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"), after Digits(individual_digits) where
// `individual_digits` (each \p{N} a piece of its own, the regex run on the text between them); the pieces cover
// the text.
std::vector<std::string_view> gpt2_pre_tokenize(std::string_view text, bool individual_digits);

// True if tokenizer.json's pre_tokenizer is ByteLevel, alone or in a Sequence (how we recognise Llama 3 style).
bool is_byte_level_tokenizer_json(const nlohmann::json& doc);

class BpeTokenizer : public Tokenizer {
 public:
  // `doc` is the parsed tokenizer.json; `path` names it in errors.
  BpeTokenizer(const nlohmann::json& doc, const std::string& path);

  std::vector<int32_t> encode(std::string_view text) const override;
  std::vector<int32_t> encode_with_special(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(id_to_token_.size()); }
  int32_t token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  TokenizerDefaults defaults() const override { return defaults_; }

 private:
  struct AddedToken {
    std::string content;
    int32_t id;
    bool special;
    bool lstrip = false;  // the match takes the white space before it (tokenizers' AddedToken.lstrip)
    bool rstrip = false;  // and after it
  };
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };

  std::vector<int32_t> encode_impl(std::string_view text, bool split_special) const;
  void encode_pre_tokenized(std::string_view text, std::vector<int32_t>* out) const;
  void encode_word(std::string_view word, std::vector<int32_t>* out) const;
  std::vector<int32_t> bpe(std::string_view word) const;
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::unordered_map<std::string, int32_t> vocab_;  // model vocab and added tokens
  std::vector<std::string> id_to_token_;
  std::vector<std::string> id_to_bytes_;  // what decode() emits per id (ByteLevel decoder, precomputed)
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<std::string, 256> byte_to_char_;  // GPT-2 bytes_to_unicode, UTF-8 encoded
  std::array<int32_t, 256> byte_id_{};         // id of each byte's character, -1 if not in the vocab
  std::vector<AddedToken> added_;              // sorted longest first, for leftmost-longest matching
  std::array<std::vector<uint32_t>, 256> added_by_first_byte_;  // indices into added_, per first byte
  bool ignore_merges_ = false;
  int max_digits_ = 3;  // the pre-tokenization regex's run of digits: 3 (Llama 3) or 1 (Qwen2)
  // GPT-2's layout instead (SmolLM2's): ByteLevel's own regex, after each digit split off alone where
  // gpt2_digits_.
  bool gpt2_ = false, gpt2_digits_ = false;
  bool nfc_ = false;    // normalizer NFC (Qwen2): applied to the text between added tokens
  int32_t unk_id_ = -1;
  TokenizerDefaults defaults_;

  // Pre-token -> ids. Pre-tokens repeat heavily in text (words), so this removes most BPE work.
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace qt
