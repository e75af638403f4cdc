#pragma once
// Rotary position embedding (Su et al., RoFormer, 2021) as LLaMA applies it: rotate_half over the two halves of
// each head, frequencies theta^(-2i/d), with Llama 3.1's frequency-dependent scaling where configured.
#include <ATen/core/Tensor.h>

#include "lib/model/llama_config.h"

namespace qt {

// inv_freq [head_dim/2] in fp32, on the CPU, as transformers computes it (including llama3 scaling).
at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim);

// cos, sin [B, S, head_dim] for integer positions [B, S], computed in fp32 and cast to `dtype`.
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions, c10::ScalarType dtype);

// x [B, heads, S, head_dim]; cos/sin [B, S, head_dim].
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace qt
