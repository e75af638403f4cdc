#pragma once
// A LLaMA decoder in plain ATen ops (autograd-capable): RMSNorm, RoPE, grouped-query attention through
// at::scaled_dot_product_attention, SwiGLU MLP, lm_head. Parameter names follow Hugging Face's LlamaForCausalLM.
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "lib/model/llama_config.h"

namespace qt {

// A block linear y = x W^T. Dense for now; the QLoRA issue gives it an NF4 base and LoRA adapters.
struct Linear {
  at::Tensor weight;  // [out, in]
  at::Tensor forward(const at::Tensor& x) const;
};

struct LlamaBlock {
  at::Tensor input_layernorm;           // [H]
  at::Tensor post_attention_layernorm;  // [H]
  Linear q_proj, k_proj, v_proj, o_proj;
  Linear gate_proj, up_proj, down_proj;
};

// LLaMA's RMSNorm (transformers' LlamaRMSNorm): normalise in fp32, cast back, then scale.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

class LlamaModel {
 public:
  LlamaConfig config;
  at::Tensor embed_tokens;  // [V, H]
  std::vector<LlamaBlock> layers;
  at::Tensor norm;     // [H]
  at::Tensor lm_head;  // [V, H]; the same tensor as embed_tokens when tie_word_embeddings
  at::Tensor inv_freq;  // [head_dim / 2] fp32, CPU

  explicit LlamaModel(LlamaConfig cfg);

  at::Tensor embed(const at::Tensor& input_ids) const;  // [B, S] -> [B, S, H]
  // Runs the blocks and the final norm. positions: [B, S] integer positions (undefined: 0..S-1 for each row).
  at::Tensor forward_hidden(const at::Tensor& inputs_embeds, const at::Tensor& positions = {}) const;
  at::Tensor logits(const at::Tensor& hidden) const;  // [.., H] -> [.., V]
  at::Tensor forward(const at::Tensor& input_ids) const { return logits(forward_hidden(embed(input_ids))); }

  // Hugging Face names of every tensor the model holds (lm_head omitted when tied), in load order.
  std::vector<std::pair<std::string, at::Tensor*>> named_tensors();

  at::Device device() const;
  c10::ScalarType dtype() const;

 private:
  at::Tensor attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const;
  at::Tensor mlp(const LlamaBlock& b, const at::Tensor& x) const;
};

}  // namespace qt
