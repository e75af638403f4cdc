#pragma once
// The tokenizer of a model directory as GGUF holds it (lib/export/gguf_llama.h): llama.cpp's `llama` vocabulary
// from a sentencepiece tokenizer.model, its `gpt2` one from a byte-level BPE tokenizer.json (pre-tokenizer
// `llama-bpe` or `qwen2`), and the special ids and chat template from tokenizer_config.json, as
// convert_hf_to_gguf.py reads them.
#include <cstdint>
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/model/llama_config.h"

namespace qt {

// llama.cpp's token types (llama.h, enum llama_token_type / gguf's TokenType).
enum TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct Vocab {
  std::string model;  // tokenizer.ggml.model
  std::string pre;    // tokenizer.ggml.pre
  std::vector<std::string> tokens;
  std::vector<float> scores;  // sentencepiece only
  std::vector<int32_t> types;
  std::vector<std::string> merges;  // BPE only
  int32_t unk_id = -1;

  int32_t id_of(const std::string& token) const {
    for (size_t i = 0; i < tokens.size(); ++i)
      if (tokens[i] == token) return static_cast<int32_t>(i);
    return -1;
  }
};

struct SpecialTokens {
  int32_t bos = -1;
  int32_t eos = -1;
  int32_t pad = -1;
  bool add_bos = false;
  bool add_eos = false;
  std::string chat_template;
};

// A token setting of tokenizer_config.json ("<pad>" or {"content": "<pad>", ...}); "" when absent or null.
std::string token_text(const Json& cfg, const std::string& key);

// Pads `v` to `n` tokens as convert_hf_to_gguf.py does for ids the tokenizer lacks ("[PAD<id>]", unused); a
// tokenizer larger than the model's vocab_size cannot be written.
void pad_vocab(Vocab& v, int64_t n, const std::string& config_path);
// Sentencepiece (Llama 2, Mistral): every piece with its score and type; tokenizer_config.json's added tokens past
// the model's pieces.
Vocab sentencepiece_vocab(const std::string& dir, const Json& tok_cfg);
// Byte-level BPE (Llama 3, Qwen): the vocab strings as they are, added tokens as control or user-defined, the
// merges as "left right" strings.
Vocab bpe_vocab(const std::string& json_path);
// Special ids from tokenizer_config.json (config.json's eos_token_id when it names none), add_bos_token /
// add_eos_token, and the chat template (tokenizer_config.json's, else chat_template.jinja).
SpecialTokens special_tokens_from_files(const Vocab& v, const Json& cfg, const std::string& cfg_path,
                                        const std::string& dir, const LlamaConfig& config);

}  // namespace qt
