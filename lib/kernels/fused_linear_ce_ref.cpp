// Plain-ATen chunked reference of the fused linear cross-entropy (see fused_linear_ce.h). Same algorithm as
// the CUDA path, in fp32: per chunk of tokens, logits = h W^T, logsumexp, loss, G = dloss/dlogits,
// dh = G W, dW += G^T h. This is what the CPU runs, and the oracle the CUDA kernel is held to.
#include "lib/kernels/fused_linear_ce_impl.h"

namespace qt::detail {

FusedCeForward fused_linear_ce_reference(const at::Tensor& hidden, const at::Tensor& weight,
                                         const at::Tensor& labels, const FusedLinearCeOptions& options,
                                         int64_t chunk, bool want_dh, bool want_dw) {
  const int64_t tokens = hidden.size(0);
  const int64_t vocab = weight.size(0);
  const double eps = options.label_smoothing;
  const double zl = options.z_loss;
  const double cap = options.logit_softcap;

  const at::Tensor w32 = weight.to(at::kFloat);
  FusedCeForward out;
  out.loss_rows = at::zeros({tokens}, hidden.options().dtype(at::kFloat));
  if (want_dh) out.dh = at::zeros({tokens, hidden.size(1)}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw32;
  if (want_dw) dw32 = at::zeros({vocab, weight.size(1)}, weight.options().dtype(at::kFloat));

  for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const int64_t rows = std::min(chunk, tokens - t0);
    const at::Tensor y = labels.narrow(0, t0, rows);
    const at::Tensor valid = y.ne(options.ignore_index);
    // An all-ignored chunk contributes nothing (dh rows stay zero). The .item() sync is fine for a reference.
    if (!valid.any().item<bool>()) continue;
    const at::Tensor h32 = hidden.narrow(0, t0, rows).to(at::kFloat);
    at::Tensor z = at::matmul(h32, w32.t());  // [rows, V] fp32
    if (cap > 0) z = at::tanh(z / cap) * cap;
    const at::Tensor lse = at::logsumexp(z, 1);  // [rows]
    const at::Tensor y_safe = at::where(valid, y, at::zeros_like(y)).unsqueeze(1);
    const at::Tensor z_y = z.gather(1, y_safe).squeeze(1);
    at::Tensor loss = lse - (1.0 - eps) * z_y;
    if (eps > 0) loss = loss - (eps / static_cast<double>(vocab)) * z.sum(1);
    if (zl > 0) loss = loss + zl * lse * lse;
    out.loss_rows.narrow(0, t0, rows).copy_(at::where(valid, loss, at::zeros_like(loss)));
    if (!want_dh && !want_dw) continue;

    // d loss / d z = softmax * (1 + 2 zl lse) - (1 - eps) onehot(y) - eps / V, zero on ignored rows;
    // through the soft-cap, d z / d x = 1 - tanh^2 = 1 - (z / cap)^2.
    at::Tensor g = at::exp(z - lse.unsqueeze(1));
    if (zl > 0) g = g * (1.0 + 2.0 * zl * lse).unsqueeze(1);
    if (eps > 0) g = g - eps / static_cast<double>(vocab);
    g.scatter_add_(1, y_safe, at::full({rows, 1}, -(1.0 - eps), g.options()));
    if (cap > 0) g = g * (1.0 - (z / cap).square());
    g = g * valid.unsqueeze(1).to(at::kFloat);
    if (want_dh) out.dh.narrow(0, t0, rows).copy_(at::matmul(g, w32));
    if (want_dw) dw32.addmm_(g.t(), h32);
  }
  if (want_dw) out.dw = dw32.to(weight.scalar_type());
  return out;
}

}  // namespace qt::detail
