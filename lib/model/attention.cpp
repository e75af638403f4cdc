// LlamaModel's attention (lib/model/llama.h): the q / k / v projection and RoPE, the kernel's choice (cuDNN's
// fused attention for rows of one whole document, FlashAttention-2 varlen for packed rows, SDPA's own order
// otherwise), the masks, the keep ladder's record and replay.
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include "lib/kernels/attention_core.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/varlen_attention.h"
#include "lib/model/llama.h"
#include "lib/model/projection_group.h"
#include "lib/model/rope.h"

namespace qt {

namespace {
// Puts one SDPA backend first in torch's (process-wide) priority order for the guard's lifetime.
class SdpFirst {
 public:
  explicit SdpFirst(at::SDPBackend first) : saved_(at::globalContext().sDPPriorityOrder()) {
    std::vector<int64_t> order{static_cast<int64_t>(first)};
    for (at::SDPBackend b : saved_)
      if (b != first) order.push_back(static_cast<int64_t>(b));
    at::globalContext().setSDPPriorityOrder(order);
  }
  ~SdpFirst() {
    std::vector<int64_t> order;
    for (at::SDPBackend b : saved_) order.push_back(static_cast<int64_t>(b));
    at::globalContext().setSDPPriorityOrder(order);
  }
  SdpFirst(const SdpFirst&) = delete;
  SdpFirst& operator=(const SdpFirst&) = delete;

 private:
  std::array<at::SDPBackend, at::num_sdp_backends> saved_;
};
}  // namespace

bool LlamaModel::cudnn_admits(int64_t batch, int64_t seq) const {
  std::lock_guard<std::mutex> lock(cudnn_shapes->mutex);
  auto& admitted = cudnn_shapes->admitted;
  const auto shape = std::make_pair(batch, seq);
  if (admitted.count(shape)) return true;
  if (admitted.size() >= kCudnnShapes) return false;
  admitted.insert(shape);
  return true;
}

int64_t LlamaModel::dense_attention_backend(int64_t seq, at::Device device, c10::ScalarType dtype) const {
  const int64_t hd = config.head_dim, Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  // The layout attention() passes: [B, S, heads, D] transposed to [B, heads, S, D].
  at::Tensor q = at::empty({1, seq, Hq, hd}, opts).transpose(1, 2);
  at::Tensor k = at::empty({1, seq, Hkv, hd}, opts).transpose(1, 2);
  std::optional<SdpFirst> first;
  if (plan.attention == AttentionKernel::Cudnn && device.is_cuda()) first.emplace(at::SDPBackend::cudnn_attention);
  return at::_fused_sdp_choice(q, k, k, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt, /*enable_gqa=*/Hkv != Hq);
}

at::Tensor LlamaModel::attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos,
                                 const at::Tensor& sin, const AttentionMask& mask, const Pass& pass,
                                 bool x_widened) const {
  const int64_t B = x.size(0), S = x.size(1), hd = config.head_dim;
  const int64_t Hq = config.num_attention_heads, Hkv = config.num_key_value_heads;
  // [B, S, heads, hd] throughout: the projections' layout, which flash attention takes as it is.
  at::Tensor q, k, v;
  AttentionStash* stash = pass.stash;  // a checkpointed block's under the keep ladder
  at::Tensor projected;  // the fused q / k / v projection's output (undefined: the per-linear path ran)
  // Qwen3's q / k norms sit between the projection and RoPE: rope_qkv_norm applies them with the rotation.
  const bool qk_norm = b.q_norm.defined();
  const QkNorm norm{b.q_norm, b.k_norm, config.rms_norm_eps};
  if (stash && stash->replay && (qk_norm ? stash->qkv.defined() : stash->q.defined())) {
    // keep_qkv's recomputation: the projection's node for the backward pass without its output, the rotated q,
    // k, v of the forward pass in place of RoPE's (or, with q / k norms, the kept projection output renormed and
    // rotated again: an elementwise pass instead of the GEMMs).
    if (at::Tensor qkv = project_group({&b.q_proj, &b.k_proj, &b.v_proj}, x, pass, false, /*output_unused=*/true);
        qkv.defined()) {
      auto kept = qk_norm ? rope_qkv_norm(qkv, cos, sin, Hq, Hkv, norm, stash->qkv)
                          : rope_qkv_replay(qkv, cos, sin, Hq, Hkv, stash->q, stash->k, stash->v);
      q = kept[0], k = kept[1], v = kept[2];
      pass.count(&ModelStats::qkv_replays);
    }
  }
  if (!q.defined()) {
    // (the LoRA B terms inside the base GEMM where the norm left room for [x | x A^T | 0]: no copy of x for it)
    if (at::Tensor qkv = project_group({&b.q_proj, &b.k_proj, &b.v_proj}, x, pass, /*concat_b=*/x_widened,
                                       /*output_unused=*/false, x_widened);
        qkv.defined()) {
      auto rotated = qk_norm ? rope_qkv_norm(qkv, cos, sin, Hq, Hkv, norm) : rope_qkv(qkv, cos, sin, Hq, Hkv);
      q = rotated[0], k = rotated[1], v = rotated[2];
      projected = qkv;
    } else {
      q = b.q_proj.forward(x, pass).view({B, S, Hq, hd});
      k = b.k_proj.forward(x, pass).view({B, S, Hkv, hd});
      if (qk_norm) {  // transformers' Qwen3Attention: q_norm(q_proj(x).view(hidden_shape)), the same for k
        q = rms_norm(q, b.q_norm, config.rms_norm_eps);
        k = rms_norm(k, b.k_norm, config.rms_norm_eps);
      }
      q = rope_fused(q, cos, sin);
      k = rope_fused(k, cos, sin);
      v = b.v_proj.forward(x, pass).view({B, S, Hkv, hd});
    }
  }
  at::Tensor o;  // [B, S, Hq, hd]
  if (mask.cu_seqlens.defined()) {
    // Packed documents through flash attention's varlen layout: the [B, S] grid flattened, no mask.
    auto flat = [&](const at::Tensor& t, int64_t heads) { return t.reshape({B * S, heads, hd}); };
    o = varlen_causal_attention(flat(q, Hq), flat(k, Hkv), flat(v, Hkv), mask.cu_seqlens, mask.max_seqlen,
                                1.0 / std::sqrt(static_cast<double>(hd)), mask.window)
            .view({B, S, Hq, hd});
  } else {
    const at::Tensor& dense = mask.dense;
    const bool cudnn = plan.attention == AttentionKernel::Cudnn && q.is_cuda() && cudnn_admits(B, S);
    if (stash && !dense.defined() && causal_attention_supported(q.transpose(1, 2))) {
      if (!stash->replay && stash->keep_qkv && projected.defined()) {
        // With q / k norms the projection output is kept (renormed and rotated in the recomputation).
        if (qk_norm) stash->qkv = projected;
        else stash->q = q, stash->k = k, stash->v = v;
      }
      const int64_t runs = stash->forward_runs;
      o = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           1.0 / std::sqrt(static_cast<double>(hd)), cudnn, stash)
              .transpose(1, 2);
      if (stash->forward_runs > runs) pass.count(&ModelStats::attention_forwards);
      // keep_residual's recomputation: block_forward puts the kept residual in place of h + this output.
      const at::Tensor o2 = o.reshape({B, S, config.q_size()});
      return stash->replay && stash->residual.defined() ? linear_output_unused(b.o_proj, o2, pass)
                                                        : b.o_proj.forward(o2, pass);
    }
    std::optional<SdpFirst> first;
    if (cudnn) first.emplace(at::SDPBackend::cudnn_attention);
    o = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dense.defined() ? std::optional<at::Tensor>(dense) : std::nullopt,
                                         /*dropout_p=*/0.0, /*is_causal=*/!dense.defined(), /*scale=*/std::nullopt,
                                         /*enable_gqa=*/Hkv != Hq)
            .transpose(1, 2);
  }
  return b.o_proj.forward(o.reshape({B, S, config.q_size()}), pass);
}

AttentionMask LlamaModel::varlen_mask(const at::Tensor& doc_ids, at::Device device, c10::ScalarType dtype) const {
  at::Tensor probe = at::empty({0, 1, config.head_dim}, at::TensorOptions().dtype(dtype).device(device));
  if (!varlen_attention_uses_flash(probe)) return {};
  VarlenLayout layout = cu_seqlens_from_doc_ids(doc_ids.to(at::kInt));
  return AttentionMask{{}, to_device_async(layout.cu_seqlens, device), layout.max_seqlen,
                       config.sliding_window ? *config.sliding_window : -1};
}

at::Tensor LlamaModel::window_mask(const at::Tensor& mask, int64_t S, at::Device device) const {
  if (!config.sliding_window || S <= *config.sliding_window) return mask;
  // As transformers' sliding_window_overlay on the causal mask: key j is visible from query i iff
  // i - window < j <= i (token indices, as the cache positions are).
  const int64_t w = *config.sliding_window;
  at::Tensor causal = at::ones({S, S}, at::TensorOptions().dtype(at::kBool).device(device)).tril();
  at::Tensor window = causal.triu(-(w - 1));
  if (!mask.defined()) return window.view({1, 1, S, S});
  // Keep the diagonal that a padding row relies on (it is inside every window).
  return mask & window.view({1, 1, S, S});
}

}  // namespace qt
