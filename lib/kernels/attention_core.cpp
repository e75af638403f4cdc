// Causal attention over ATen's fused kernels with an output / log-sum-exp stash for activation checkpointing.
#include "lib/kernels/attention_core.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>

#include "lib/core/error.h"

namespace qt {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;


at::Tensor expand_kv(const at::Tensor& t, int64_t groups) {
  return groups == 1 ? t : t.repeat_interleave(groups, /*dim=*/1);
}


// The expanded K / V gradient summed back over each group of query heads: [B, Hkv * g, S, D] -> [B, Hkv, S, D].
at::Tensor reduce_kv(const at::Tensor& g, int64_t groups) {
  if (groups == 1) return g;
  const auto s = g.sizes();
  return g.reshape({s[0], s[1] / groups, groups, s[2], s[3]}).sum(2);
}

class CausalAttentionFn : public torch::autograd::Function<CausalAttentionFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale, int64_t backend_id, int64_t stash_ptr) {
    auto* stash = reinterpret_cast<AttentionStash*>(stash_ptr);
    const auto backend = static_cast<AttentionBackend>(backend_id);
    const int64_t S = q.size(2);
    const int64_t groups = backend == AttentionBackend::CudaCudnn && cudnn_grouped_kv(S, q.size(3))
                               ? 1  // cuDNN reads the groups itself
                               : q.size(1) / k.size(1);
    const at::Tensor ke = expand_kv(k, groups), ve = expand_kv(v, groups);
    at::Tensor out, lse, seed, offset, cum_q, cum_k;
    if (stash && stash->replay && stash->out.defined()) {
      out = stash->out;
      lse = stash->lse;
      seed = stash->seed;
      offset = stash->offset;
      cum_q = stash->cum_q;
      cum_k = stash->cum_k;
    } else {
      if (stash) ++stash->forward_runs;
      if (backend == AttentionBackend::CpuFlash) {
        std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, /*is_causal=*/true,
                                                                               std::nullopt, scale);
      } else if (backend == AttentionBackend::CudaCudnn) {
        auto r = at::_scaled_dot_product_cudnn_attention(q, ke, ve, std::nullopt, /*compute_log_sumexp=*/true, 0.0,
                                                         /*is_causal=*/true, /*return_debug_mask=*/false, scale);
        std::tie(out, lse, cum_q, cum_k, std::ignore, std::ignore, seed, offset, std::ignore) = r;
      } else {
        auto r = at::_scaled_dot_product_flash_attention(q, ke, ve, 0.0, /*is_causal=*/true,
                                                         /*return_debug_mask=*/false, scale);
        std::tie(out, lse, cum_q, cum_k, std::ignore, std::ignore, seed, offset, std::ignore) = r;
      }
      if (stash && !stash->replay) {
        stash->out = out;
        stash->lse = lse;
        stash->seed = seed;
        stash->offset = offset;
        stash->cum_q = cum_q;
        stash->cum_k = cum_k;
      }
    }
    // (Dropout is never used: the philox seed and offset only need to be the kernel's own, or empty.)
    if (!seed.defined()) seed = at::empty({0}, q.options().dtype(at::kLong));
    if (!offset.defined()) offset = at::empty({0}, q.options().dtype(at::kLong));
    ctx->save_for_backward({q, ke, ve, out, lse, seed, offset});
    ctx->saved_data["cum_q"] = cum_q;
    ctx->saved_data["cum_k"] = cum_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["backend"] = backend_id;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["S"] = S;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &ke = s[1], &ve = s[2], &out = s[3], &lse = s[4], &seed = s[5], &offset = s[6];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto backend = static_cast<AttentionBackend>(ctx->saved_data["backend"].toInt());
    const int64_t groups = ctx->saved_data["groups"].toInt(), S = ctx->saved_data["S"].toInt();
    const at::Tensor cum_q = ctx->saved_data["cum_q"].toTensor(), cum_k = ctx->saved_data["cum_k"].toTensor();
    at::Tensor go = grads[0].defined() ? grads[0] : at::zeros_like(out);
    at::Tensor dq, dk, dv;
    // cuDNN takes the gradient in its own layout (the [B, S, H, D] buffer the output projection's backward wrote,
    // seen as [B, H, S, D]) as long as D has unit stride; the other kernels want it contiguous.
    const bool go_as_is = go.stride(-1) == 1 && go.is_non_overlapping_and_dense();
    if (backend == AttentionBackend::CpuFlash) {
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          go.contiguous(), q, ke, ve, out, lse, 0.0, /*is_causal=*/true, std::nullopt, scale);
    } else if (backend == AttentionBackend::CudaCudnn) {
      std::tie(dq, dk, dv) = at::_scaled_dot_product_cudnn_attention_backward(
          go_as_is ? go : go.contiguous(), q, ke, ve, out, lse, seed, offset, at::Tensor(), cum_q, cum_k, S, S, 0.0,
          /*is_causal=*/true, scale);
    } else {
      std::tie(dq, dk, dv) = at::_scaled_dot_product_flash_attention_backward(
          go.contiguous(), q, ke, ve, out, lse, cum_q, cum_k, S, S, 0.0, /*is_causal=*/true, seed, offset,
          scale);
    }
    return {dq, reduce_kv(dk, groups), reduce_kv(dv, groups), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace


bool causal_attention_supported(const at::Tensor& q) {
  if (!q.defined() || q.dim() != 4) return false;
  if (!q.is_cuda()) return q.is_cpu() && (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16);
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  const int64_t d = q.size(3);
  return d % 8 == 0 && d <= 128;
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            bool prefer_cudnn, AttentionStash* stash) {
  QT_CHECK(causal_attention_supported(q), ErrorKind::Internal, "causal_attention: unsupported device, dtype or head_dim");
  QT_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
               q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
           ErrorKind::Internal, "causal_attention: expected q [B, Hq, S, D] and k, v [B, Hkv, S, D] with Hkv dividing Hq");
  const AttentionBackend backend = !q.is_cuda() ? AttentionBackend::CpuFlash
                                   : prefer_cudnn ? AttentionBackend::CudaCudnn
                                                  : AttentionBackend::CudaFlash;
  return CausalAttentionFn::apply(q, k, v, scale, static_cast<int64_t>(backend), reinterpret_cast<int64_t>(stash))[0];
}

// (The gate's reasons: attention_core.h.)
bool cudnn_grouped_kv(int64_t S, int64_t D) { return S % 128 == 0 && (D == 64 || D == 128); }

}  // namespace qt
