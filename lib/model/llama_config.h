#pragma once
// LlamaConfig: the fields of a Hugging Face `config.json` that define a LLaMA-family model. Files come from two
// eras of transformers: 4.x writes top-level `rope_theta`, `rope_scaling` and `torch_dtype`; 5.x writes
// `rope_parameters` (holding `rope_theta`, `rope_type` and the scaling) and `dtype`. Both are read.
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include "lib/core/json.h"

namespace qt {

enum class RopeType { Default, Linear, Dynamic, Yarn, Llama3 };

const char* rope_type_name(RopeType type);  // HF's rope_type spelling

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  // llama3 scaling (Meta's reference code for Llama 3.1; transformers `_compute_llama3_parameters`).
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
  // linear: positions divided by `factor`. dynamic (NTK-aware, transformers `_compute_dynamic_ntk_parameters`):
  // theta grows with the sequence length once it exceeds max_position_embeddings. yarn (`_compute_yarn_parameters`):
  // factor, beta_fast, beta_slow, original_max_position_embeddings; cos and sin scaled by attention_factor.
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double attention_factor = 1.0;  // yarn: given, or derived from factor / mscale / mscale_all_dim
  bool truncate = true;           // yarn: correction range rounded to whole dimensions
};

struct LlamaConfig {
  std::string model_type = "llama";
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // GQA: fewer KV heads than query heads; equal for plain multi-head
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  int64_t max_position_embeddings = 2048;
  int64_t vocab_size = 0;
  bool tie_word_embeddings = false;
  c10::ScalarType dtype = c10::ScalarType::Float;  // torch_dtype / dtype: the dtype the weights were saved in
  std::optional<int64_t> sliding_window;           // Mistral: token i attends to j with i - window < j <= i
  bool attention_bias = false;                     // q/k/v/o_proj carry a bias
  bool qkv_bias = false;                           // Qwen2: q/k/v_proj carry a bias, o_proj none
  bool qk_norm = false;                            // Qwen3: RMSNorm of q and k per head before RoPE
  bool mlp_bias = false;                           // gate/up/down_proj carry a bias
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;

  // Parses and validates; `file` names the source in errors.
  static LlamaConfig from_json(const Json& json, const std::string& file);
  static LlamaConfig from_file(const std::string& path);
  Json to_json() const;  // HF 5.x spelling (rope_parameters, dtype), with the 4.x rope_theta too

  // Whether the linear named `name` ("model.layers.0.self_attn.q_proj", or just "self_attn.q_proj") has a bias.
  bool linear_has_bias(const std::string& name) const;
  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
  int64_t num_parameters() const;  // with the embeddings and lm_head (once when tied)
};

c10::ScalarType parse_dtype_name(const std::string& name, const std::string& file, const std::string& key);
std::string dtype_hf_name(c10::ScalarType type);  // "bfloat16", "float16", "float32"

// The dtype names a user types, the same wherever a dtype is asked for (model.dtype, `export --dtype`): the short
// names bf16 / fp16 / fp32 and torch's bfloat16 / float16 / float32. nullopt for anything else.
std::optional<c10::ScalarType> user_dtype(const std::string& name);
inline constexpr const char* kUserDtypeNames = "bf16, bfloat16, fp16, float16, fp32 or float32";
const char* dtype_short_name(c10::ScalarType type);  // "bf16", "fp16", "fp32"

}  // namespace qt
