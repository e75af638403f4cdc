#pragma once
// Shared by the fused linear cross-entropy tests: the plain path they are held to (full [T, V] logits,
// at::cross_entropy_loss with sum reduction, autograd) and error measures.
#include <ATen/ATen.h>

#include "tests/test_util.h"

#include <cmath>

#include "lib/kernels/fused_linear_ce.h"

namespace qt::test_fused_ce {

struct PlainCe {
  at::Tensor loss;  // fp32 scalar, sum over counted tokens
  at::Tensor dh;    // fp32, undefined unless asked for
  at::Tensor dw;    // fp32, undefined unless asked for
};

// Everything in fp32 on the inputs' device; inputs of other dtypes are upcast first.
inline PlainCe plain_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                   const FusedLinearCeOptions& o, bool want_dh, bool want_dw) {
  at::Tensor h = hidden.detach().to(at::kFloat).clone().requires_grad_(want_dh);
  at::Tensor w = weight.detach().to(at::kFloat).clone().requires_grad_(want_dw);
  at::Tensor z = at::matmul(h, w.t());
  if (o.logit_softcap > 0) z = at::tanh(z / o.logit_softcap) * o.logit_softcap;
  at::Tensor loss = at::cross_entropy_loss(z, labels, {}, at::Reduction::Sum, o.ignore_index, o.label_smoothing);
  if (o.z_loss > 0) {
    const at::Tensor valid = labels.ne(o.ignore_index).to(at::kFloat);
    loss = loss + o.z_loss * (at::logsumexp(z, 1).square() * valid).sum();
  }
  if (want_dh || want_dw) loss.backward();
  PlainCe out;
  out.loss = loss.detach();
  if (want_dh) out.dh = h.grad();
  if (want_dw) out.dw = w.grad();
  return out;
}

using qt::test::rel_err;  // (NaN never passes a bound)

inline double max_abs(const at::Tensor& a) { return a.detach().abs().max().to(at::kDouble).item<double>(); }

// Random labels in [0, V), about one in `ignore_every` replaced by the ignore index.
inline at::Tensor random_labels(int64_t tokens, int64_t vocab, int64_t ignore_every, int64_t ignore_index,
                                const at::TensorOptions& device) {
  at::Tensor y = at::randint(0, vocab, {tokens}, device.dtype(at::kLong));
  if (ignore_every > 0) {
    const at::Tensor drop = at::randint(0, ignore_every, {tokens}, device.dtype(at::kLong)).eq(0);
    y.masked_fill_(drop, ignore_index);
  }
  return y;
}

}  // namespace qt::test_fused_ce
