#include "lib/model/llama.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "lib/core/error.h"
#include "lib/model/rope.h"

namespace qt {

namespace {

// The NF4 base matmul as an autograd function: saves nothing but a pointer to the (model-owned, frozen)
// Nf4Weight, dequantizes into a scratch buffer in forward and again in backward.
struct Nf4LinearFn : public torch::autograd::Function<Nf4LinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t weight_ptr) {
    const auto* w = reinterpret_cast<const Nf4Weight*>(weight_ptr);
    ctx->saved_data["w"] = weight_ptr;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::Tensor W = w->dequantize(x.scalar_type());
    return at::matmul(x, W.t());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* w = reinterpret_cast<const Nf4Weight*>(ctx->saved_data["w"].toInt());
    auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
    at::Tensor W = w->dequantize(dtype);
    return {at::matmul(grads[0].to(dtype), W), at::Tensor()};
  }
};

}  // namespace

at::Tensor nf4_linear(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w) {
  return Nf4LinearFn::apply(x, reinterpret_cast<int64_t>(w.get()));
}

int64_t Linear::out_features() const { return quantized() ? nf4->shape.at(0) : weight.size(0); }
int64_t Linear::in_features() const { return quantized() ? nf4->shape.at(1) : weight.size(1); }

at::Tensor Linear::base_weight(c10::ScalarType dtype) const {
  return quantized() ? nf4->dequantize(dtype) : weight.to(dtype);
}

at::Tensor Linear::forward(const at::Tensor& x) const {
  at::Tensor y = quantized() ? nf4_linear(x, nf4) : at::linear(x, weight);
  if (lora) {
    at::Tensor h = (training && lora->dropout > 0) ? at::dropout(x, lora->dropout, /*train=*/true) : x;
    y = y + at::linear(at::linear(h, lora->A), lora->B) * lora->scale;
  }
  return y;
}

void LlamaModel::set_training(bool training) {
  for_each_linear([&](const std::string&, Linear& l) { l.training = training; });
}

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
                                 const at::Tensor& sin, const at::Tensor& mask) const {
  const int64_t B = x.size(0), S = x.size(1), hd = config.head_dim;
  at::Tensor q = b.q_proj.forward(x).view({B, S, config.num_attention_heads, hd}).transpose(1, 2);
  at::Tensor k = b.k_proj.forward(x).view({B, S, config.num_key_value_heads, hd}).transpose(1, 2);
  at::Tensor v = b.v_proj.forward(x).view({B, S, config.num_key_value_heads, hd}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  const bool gqa = config.num_key_value_heads != config.num_attention_heads;
  at::Tensor o = at::scaled_dot_product_attention(q, k, v, mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt,
                                                  /*dropout_p=*/0.0, /*is_causal=*/!mask.defined(),
                                                  /*scale=*/std::nullopt,
                                                  /*enable_gqa=*/gqa);
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
  return run_blocks(inputs_embeds, pos, /*mask=*/{});
}

at::Tensor LlamaModel::run_blocks(const at::Tensor& inputs_embeds, const at::Tensor& positions,
                                  const at::Tensor& mask) const {
  auto [cos, sin] = rope_cos_sin(inv_freq, positions, inputs_embeds.scalar_type());
  at::Tensor h = inputs_embeds;
  for (const auto& b : layers) {
    h = h + attention(b, rms_norm(h, b.input_layernorm, config.rms_norm_eps), cos, sin, mask);
    h = h + mlp(b, rms_norm(h, b.post_attention_layernorm, config.rms_norm_eps));
  }
  return rms_norm(h, norm, config.rms_norm_eps);
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const Batch& batch) const {
  if (!batch.doc_ids.defined()) return forward_hidden(inputs_embeds, batch.positions);
  // Block-diagonal causal mask [B, 1, S, S]: token i sees token j <= i of its own document. Padding (doc -1)
  // sees only itself, so that no softmax row is empty (its outputs carry no target).
  const int64_t S = inputs_embeds.size(1);
  at::Tensor doc = batch.doc_ids.to(inputs_embeds.device());
  at::Tensor same = doc.unsqueeze(2) == doc.unsqueeze(1);
  at::Tensor causal = at::ones({S, S}, at::TensorOptions().dtype(at::kBool).device(doc.device())).tril();
  at::Tensor eye = at::eye(S, at::TensorOptions().dtype(at::kBool).device(doc.device()));
  at::Tensor mask = ((same & causal) & (doc >= 0).unsqueeze(2)) | eye;
  return run_blocks(inputs_embeds, batch.positions.to(inputs_embeds.device()), mask.unsqueeze(1));
}

at::Tensor LlamaModel::logits(const at::Tensor& hidden) const { return at::linear(hidden, lm_head); }

std::vector<std::pair<std::string, at::Tensor*>> LlamaModel::named_tensors() {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  out.emplace_back("model.embed_tokens.weight", &embed_tokens);
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& b = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "input_layernorm.weight", &b.input_layernorm);
    out.emplace_back(p + "post_attention_layernorm.weight", &b.post_attention_layernorm);
  }
  for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.quantized()) out.emplace_back(name + ".weight", &l.weight);
  });
  out.emplace_back("model.norm.weight", &norm);
  if (!config.tie_word_embeddings) out.emplace_back("lm_head.weight", &lm_head);
  return out;
}

}  // namespace qt
