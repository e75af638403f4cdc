#include "lib/model/rope.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "lib/kernels/fused_ops.h"

namespace qt {

static at::Tensor default_inv_freq(double theta, int64_t head_dim) {
  // theta ** (arange(0, d, 2) / d), in fp32 as transformers' _compute_default_rope_parameters.
  at::Tensor exponent = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(head_dim);
  return 1.0 / at::pow(at::scalar_tensor(theta, at::kFloat), exponent);
}

// YaRN (Peng et al., 2023), as transformers' _compute_yarn_parameters: dimensions that rotate fewer than beta_slow
// times over the original context are interpolated (divided by factor), those rotating more than beta_fast times
// kept, a linear ramp between.
static at::Tensor yarn_inv_freq(const RopeConfig& rope, int64_t dim) {
  const double base = rope.theta;
  const double old_ctx = static_cast<double>(rope.original_max_position_embeddings);
  at::Tensor pos_freqs =
      at::pow(at::scalar_tensor(base, at::kFloat), at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(dim));
  at::Tensor extrapolation = 1.0 / pos_freqs;
  at::Tensor interpolation = 1.0 / (rope.factor * pos_freqs);
  auto correction_dim = [&](double rotations) {
    return (dim * std::log(old_ctx / (rotations * 2 * M_PI))) / (2 * std::log(base));
  };
  double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // prevent a singularity
  at::Tensor ramp = ((at::arange(dim / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
  at::Tensor extrapolation_factor = 1 - ramp;
  return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
}

at::Tensor rope_dynamic_inv_freq(const RopeConfig& rope, int64_t head_dim, int64_t seq_len,
                                 int64_t max_position_embeddings) {
  seq_len = std::max(seq_len, max_position_embeddings);
  // fp32 as transformers, where seq_len is a tensor.
  at::Tensor base = at::scalar_tensor(rope.theta, at::kFloat) *
                    at::pow((rope.factor * at::scalar_tensor(seq_len, at::kFloat) / static_cast<double>(max_position_embeddings)) -
                                (rope.factor - 1),
                            static_cast<double>(head_dim) / static_cast<double>(head_dim - 2));
  at::Tensor exponent = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(head_dim);
  return 1.0 / at::pow(base, exponent);
}

at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim) {
  if (rope.type == RopeType::Yarn) return yarn_inv_freq(rope, head_dim);
  at::Tensor inv_freq = default_inv_freq(rope.theta, head_dim);
  if (rope.type == RopeType::Linear) return inv_freq / rope.factor;
  if (rope.type != RopeType::Llama3) return inv_freq;
  // Llama 3.1 scaling: Meta's reference `apply_scaling` (llama-models), as transformers' _compute_llama3_parameters:
  // long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
  const double old_ctx = static_cast<double>(rope.original_max_position_embeddings);
  const double low_freq_wavelen = old_ctx / rope.low_freq_factor;
  const double high_freq_wavelen = old_ctx / rope.high_freq_factor;
  at::Tensor wavelen = 2 * M_PI / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq);
  at::Tensor smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled;
  at::Tensor is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(is_medium, smoothed, scaled);
}

std::pair<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& inv_freq, const at::Tensor& positions,
                                               c10::ScalarType dtype, double scale) {
  at::Tensor freqs =
      positions.to(at::kFloat).unsqueeze(-1) * to_device_async(inv_freq, positions.device()).view({1, 1, -1});
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  if (scale == 1.0) return {emb.cos().to(dtype), emb.sin().to(dtype)};
  return {(emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)};
}

}  // namespace qt
