#pragma once
// Rotary position embedding (Su et al., RoFormer, 2021) as LLaMA applies it: rotate_half over the two halves of
// each head, frequencies theta^(-2i/d), with Llama 3.1's frequency-dependent scaling where configured.
#include <ATen/core/Tensor.h>

#include "lib/model/llama_config.h"

namespace qt {

// inv_freq [head_dim/2] in fp32, on the CPU, as transformers computes it (linear, yarn and llama3 scaling; for
// dynamic, the frequencies at sequence lengths up to max_position_embeddings, i.e. the unscaled ones).
at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim);

// Dynamic NTK scaling (transformers' _compute_dynamic_ntk_parameters): for seq_len > max_position_embeddings the
// base becomes theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ^ (d / (d - 2)).
at::Tensor rope_dynamic_inv_freq(const RopeConfig& rope, int64_t head_dim, int64_t seq_len,
                                 int64_t max_position_embeddings);

// cos, sin [B, S, head_dim] for integer positions [B, S], computed in fp32, multiplied by `scale` (yarn's
// attention_factor) and cast to `dtype`.
std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions, c10::ScalarType dtype,
                                               double scale = 1.0);

// Applying the rotation: rope_fused / rope_reference in lib/kernels/fused_ops.h.

}  // namespace qt
