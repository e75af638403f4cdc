#include "lib/model/llama.h"

#include <ATen/ATen.h>

#include "lib/core/error.h"
#include "lib/model/rope.h"

namespace qt {

at::Tensor Linear::forward(const at::Tensor& x) const { return at::linear(x, weight); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return weight * h.to(x.scalar_type());
}

LlamaModel::LlamaModel(LlamaConfig cfg) : config(std::move(cfg)) {
  layers.resize(config.num_hidden_layers);
  inv_freq = rope_inv_freq(config.rope, config.head_dim);
}

at::Device LlamaModel::device() const { return embed_tokens.device(); }
c10::ScalarType LlamaModel::dtype() const { return embed_tokens.scalar_type(); }

at::Tensor LlamaModel::embed(const at::Tensor& input_ids) const { return at::embedding(embed_tokens, input_ids); }

at::Tensor LlamaModel::attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos,
                                 const at::Tensor& sin) const {
  const int64_t B = x.size(0), S = x.size(1), hd = config.head_dim;
  at::Tensor q = b.q_proj.forward(x).view({B, S, config.num_attention_heads, hd}).transpose(1, 2);
  at::Tensor k = b.k_proj.forward(x).view({B, S, config.num_key_value_heads, hd}).transpose(1, 2);
  at::Tensor v = b.v_proj.forward(x).view({B, S, config.num_key_value_heads, hd}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  at::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true,
                                                  /*scale=*/std::nullopt,
                                                  /*enable_gqa=*/config.num_key_value_heads != config.num_attention_heads);
  return b.o_proj.forward(o.transpose(1, 2).reshape({B, S, config.q_size()}));
}

at::Tensor LlamaModel::mlp(const LlamaBlock& b, const at::Tensor& x) const {
  return b.down_proj.forward(at::silu(b.gate_proj.forward(x)) * b.up_proj.forward(x));
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const at::Tensor& positions) const {
  QT_CHECK(inputs_embeds.dim() == 3 && inputs_embeds.size(2) == config.hidden_size, ErrorKind::Internal,
           "forward_hidden: expected [batch, seq, hidden] embeddings");
  const int64_t B = inputs_embeds.size(0), S = inputs_embeds.size(1);
  if (config.sliding_window && S > *config.sliding_window)
    fail(ErrorKind::Model, "sequence length " + std::to_string(S) + " exceeds the model's sliding_window " +
                               std::to_string(*config.sliding_window) + ", which is not implemented yet");
  at::Tensor pos = positions.defined()
                       ? positions
                       : at::arange(S, at::TensorOptions().dtype(at::kLong).device(inputs_embeds.device())).expand({B, S});
  auto [cos, sin] = rope_cos_sin(inv_freq, pos, inputs_embeds.scalar_type());
  at::Tensor h = inputs_embeds;
  for (const auto& b : layers) {
    h = h + attention(b, rms_norm(h, b.input_layernorm, config.rms_norm_eps), cos, sin);
    h = h + mlp(b, rms_norm(h, b.post_attention_layernorm, config.rms_norm_eps));
  }
  return rms_norm(h, norm, config.rms_norm_eps);
}

at::Tensor LlamaModel::logits(const at::Tensor& hidden) const { return at::linear(hidden, lm_head); }

std::vector<std::pair<std::string, at::Tensor*>> LlamaModel::named_tensors() {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  out.emplace_back("model.embed_tokens.weight", &embed_tokens);
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& b = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "input_layernorm.weight", &b.input_layernorm);
    out.emplace_back(p + "self_attn.q_proj.weight", &b.q_proj.weight);
    out.emplace_back(p + "self_attn.k_proj.weight", &b.k_proj.weight);
    out.emplace_back(p + "self_attn.v_proj.weight", &b.v_proj.weight);
    out.emplace_back(p + "self_attn.o_proj.weight", &b.o_proj.weight);
    out.emplace_back(p + "post_attention_layernorm.weight", &b.post_attention_layernorm);
    out.emplace_back(p + "mlp.gate_proj.weight", &b.gate_proj.weight);
    out.emplace_back(p + "mlp.up_proj.weight", &b.up_proj.weight);
    out.emplace_back(p + "mlp.down_proj.weight", &b.down_proj.weight);
  }
  out.emplace_back("model.norm.weight", &norm);
  if (!config.tie_word_embeddings) out.emplace_back("lm_head.weight", &lm_head);
  return out;
}

}  // namespace qt
