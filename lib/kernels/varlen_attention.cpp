// Varlen causal attention: FlashAttention-2 through ATen on CUDA (bf16/fp16), a dense-mask SDPA elsewhere.
#include "lib/kernels/varlen_attention.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "lib/core/error.h"

namespace qt {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                  int64_t max_seqlen) {
  const std::string me = "varlen_causal_attention: ";
  QT_CHECK(q.defined() && k.defined() && v.defined() && cu_seqlens.defined(), ErrorKind::Internal,
           me + "undefined tensor");
  QT_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, ErrorKind::Internal,
           me + "expected q, k, v as [total_tokens, heads, head_dim]");
  QT_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2), ErrorKind::Internal,
           me + "q, k, v disagree on total_tokens or head_dim, or k and v differ in shape");
  QT_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, ErrorKind::Internal,
           me + "query heads must be a multiple of key/value heads");
  QT_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
               at::isFloatingType(q.scalar_type()),
           ErrorKind::Internal, me + "q, k, v must share one floating dtype");
  QT_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == cu_seqlens.device(),
           ErrorKind::Internal, me + "q, k, v and cu_seqlens must be on one device");
  QT_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 && cu_seqlens.scalar_type() == at::kInt,
           ErrorKind::Internal, me + "cu_seqlens must be int32 [n_docs + 1] with n_docs >= 1");
  QT_CHECK(max_seqlen > 0, ErrorKind::Internal, me + "max_seqlen must be positive");
}

// window (HF convention, itself included) -> flash window_size_left; -1 means unbounded.
int64_t flash_window_left(int64_t window) { return window > 0 ? window - 1 : -1; }

class FlashVarlenFunction : public torch::autograd::Function<FlashVarlenFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                               double scale, int64_t window) {
    // Flash needs a unit stride in head_dim (and reads [T, H, D] with arbitrary T/H strides); contiguous()
    // is a no-op for the usual reshape of a projection output.
    at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const int64_t left = flash_window_left(window);
    auto r = at::_flash_attention_forward(q, k, v, std::optional<at::Tensor>(cu_seqlens),
                                          std::optional<at::Tensor>(cu_seqlens), max_seqlen, max_seqlen,
                                          /*dropout_p=*/0.0, /*is_causal=*/true, /*return_debug_mask=*/false,
                                          std::optional<double>(scale), std::optional<int64_t>(left),
                                          std::optional<int64_t>(0));
    at::Tensor out = std::get<0>(r);
    ctx->save_for_backward({q, k, v, out, std::get<1>(r)});
    ctx->saved_data["cu"] = cu_seqlens;
    ctx->saved_data["rng"] = std::get<2>(r);
    ctx->saved_data["unused"] = std::get<3>(r);
    ctx->saved_data["max"] = max_seqlen;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["left"] = left;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    at::Tensor cu = ctx->saved_data["cu"].toTensor();
    const int64_t max_seqlen = ctx->saved_data["max"].toInt();
    at::Tensor go = grad_outputs[0];
    if (!go.defined()) go = at::zeros_like(saved[3]);
    auto g = at::_flash_attention_backward(
        go.contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4], cu, cu, max_seqlen, max_seqlen,
        /*dropout_p=*/0.0, /*is_causal=*/true, ctx->saved_data["rng"].toTensor(),
        ctx->saved_data["unused"].toTensor(), std::optional<double>(ctx->saved_data["scale"].toDouble()),
        std::optional<int64_t>(ctx->saved_data["left"].toInt()), std::optional<int64_t>(0));
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

bool varlen_attention_uses_flash(const at::Tensor& q) {
  if (!q.defined() || !q.is_cuda() || q.dim() != 3) return false;
  if (q.scalar_type() != at::kBFloat16 && q.scalar_type() != at::kHalf) return false;
  const int64_t d = q.size(2);
  return d % 8 == 0 && d <= 256;
}

at::Tensor varlen_causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                   int64_t window) {
  check_inputs(q, k, v, cu_seqlens, max_seqlen);
  if (!varlen_attention_uses_flash(q))
    return varlen_causal_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale, window);
  return FlashVarlenFunction::apply(q, k, v, cu_seqlens, max_seqlen, scale, window)[0];
}

at::Tensor varlen_causal_attention_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_seqlens, int64_t /*max_seqlen*/, double scale,
                                             int64_t window) {
  check_inputs(q, k, v, cu_seqlens, 1);
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1);
  at::Tensor cu = cu_seqlens.to(at::kLong);
  at::Tensor lengths = cu.slice(0, 1) - cu.slice(0, 0, -1);
  at::Tensor doc = at::repeat_interleave(at::arange(lengths.size(0), cu.options()), lengths, /*dim=*/0,
                                         /*output_size=*/T);
  QT_CHECK(doc.size(0) == T, ErrorKind::Internal,
           "varlen_causal_attention_reference: cu_seqlens does not end at total_tokens");
  at::Tensor idx = at::arange(T, cu.options());
  at::Tensor di = idx.unsqueeze(1) - idx.unsqueeze(0);  // i - j
  at::Tensor mask = doc.unsqueeze(1).eq(doc.unsqueeze(0)) & di.ge(0);
  if (window > 0) mask = mask & di.lt(window);
  // [T, H, D] -> [1, H, T, D]; key/value heads repeated in HF's repeat_kv order.
  at::Tensor qh = q.transpose(0, 1).unsqueeze(0);
  at::Tensor kh = k.repeat_interleave(Hq / Hkv, /*dim=*/1).transpose(0, 1).unsqueeze(0);
  at::Tensor vh = v.repeat_interleave(Hq / Hkv, /*dim=*/1).transpose(0, 1).unsqueeze(0);
  at::Tensor o = at::scaled_dot_product_attention(qh, kh, vh, mask.view({1, 1, T, T}), /*dropout_p=*/0.0,
                                                  /*is_causal=*/false, scale);
  return o.squeeze(0).transpose(0, 1).contiguous();
}

VarlenLayout cu_seqlens_from_doc_ids(const at::Tensor& doc_ids) {
  QT_CHECK(doc_ids.defined() && doc_ids.dim() == 2, ErrorKind::Internal,
           "cu_seqlens_from_doc_ids: expected doc_ids [batch, seq]");
  const int64_t B = doc_ids.size(0), S = doc_ids.size(1);
  at::Tensor d = doc_ids.to(at::kCPU, at::kInt).contiguous();
  const int32_t* p = d.data_ptr<int32_t>();
  std::vector<int32_t> cu{0};
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* row = p + b * S;
    int32_t last_id = -1;  // last non-negative id seen in this row (-1: none yet)
    for (int64_t t = 0; t < S; ++t) {
      const int32_t id = row[t];
      const bool starts = t == 0 || id < 0 || id != row[t - 1];
      if (id >= 0) {
        QT_CHECK(!starts || id > last_id || last_id < 0, ErrorKind::Internal,
                 "cu_seqlens_from_doc_ids: document " + std::to_string(id) + " of row " + std::to_string(b) +
                     " is not one contiguous run (ids must increase along a row)");
        last_id = id;
      }
      if (starts && t > 0) {
        const int64_t len = b * S + t - cu.back();
        max_len = std::max(max_len, len);
        cu.push_back(static_cast<int32_t>(b * S + t));
      }
    }
    // Close the row's last document.
    const int64_t end = (b + 1) * S;
    if (S > 0) {
      max_len = std::max(max_len, end - cu.back());
      cu.push_back(static_cast<int32_t>(end));
    }
  }
  QT_CHECK(B * S < (int64_t{1} << 31), ErrorKind::Internal, "cu_seqlens_from_doc_ids: too many tokens for int32");
  VarlenLayout out;
  out.cu_seqlens = at::tensor(cu, at::TensorOptions().dtype(at::kInt)).to(doc_ids.device());
  out.max_seqlen = max_len;
  out.num_docs = static_cast<int64_t>(cu.size()) - 1;
  out.token_index = at::arange(B * S, at::TensorOptions().dtype(at::kLong).device(doc_ids.device()));
  return out;
}

}  // namespace qt
