// Autograd wrappers of the fused RMSNorm / SwiGLU kernels and their plain-ATen references (fused_ops.h).
#include "lib/kernels/fused_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/dropout_hash.h"
#include "lib/kernels/fused_ops_kernels.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace qt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

kernels::ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::ElemType::Float32;
    case at::kHalf: return kernels::ElemType::Float16;
    case at::kBFloat16: return kernels::ElemType::BFloat16;
    default: fail(ErrorKind::Internal, "fused ops: unsupported dtype");
  }
}

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (t.element_size() * 8) == 0;
}

// The distance between rows of t (elements) where its rows are of contiguous elements a uniform, 16-byte aligned
// stride apart (a contiguous tensor, or the first columns of a wider one), else 0.
int64_t row_stride(const at::Tensor& t) {
  if (t.dim() < 2 || t.stride(-1) != 1 || !aligned(t)) return 0;
  const int64_t ld = t.size(-2) == 1 ? t.size(-1) : t.stride(-2);
  if (ld < t.size(-1) || ld % 8 != 0) return 0;
  for (int64_t d = t.dim() - 3, inner = ld * t.size(-2); d >= 0; inner *= t.size(d), --d)
    if (t.size(d) != 1 && t.stride(d) != inner) return 0;
  return ld;
}

#ifdef QT_WITH_CUDA
CUstream_st* stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// y of x's shape, as the first H columns of a [rows, H + spare] buffer where spare > 0 (rms_norm_fused).
at::Tensor norm_output(const at::Tensor& x, int64_t spare) {
  if (spare == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t H = x.size(-1);
  return at::empty({x.numel() / H, H + spare}, x.options()).narrow(1, 0, H).view(x.sizes());
}
int64_t norm_output_ld(const at::Tensor& y) { return y.dim() >= 2 && y.size(-2) > 1 ? y.stride(-2) : y.size(-1); }

struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            int64_t spare) {
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor xc = x.contiguous();
    const int64_t H = x.size(-1), rows = x.numel() / H;
    at::Tensor y = norm_output(xc, spare);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    kernels::rms_norm_forward_launch(xc.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, H,
                                     norm_output_ld(y), static_cast<float>(eps), elem_type(x), stream_of(x));
    ctx->save_for_backward({xc, weight, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &rstd = s[2];
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t H = x.size(-1), rows = x.numel() / H;
    at::Tensor dy = grads[0].to(x.scalar_type());
    int64_t ld = row_stride(dy);  // the first columns of a wider GEMM output are read in place
    if (ld == 0) {
      dy = dy.contiguous();
      ld = H;
    }
    at::Tensor dx = at::empty_like(x);
    kernels::rms_norm_backward_launch(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                      rows, H, ld, elem_type(x), stream_of(x));
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// x = h + a and y = RMSNorm(x) in one kernel; the backward's one kernel writes the gradient of h and a: x's own
// gradient (the residual stream's) plus the norm's input gradient.
struct AddRmsNormFn : public torch::autograd::Function<AddRmsNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& a, const at::Tensor& weight,
                               double eps, int64_t spare) {
    c10::cuda::CUDAGuard guard(h.device());
    const at::Tensor hc = h.contiguous(), ac = a.contiguous();
    const int64_t H = h.size(-1), rows = h.numel() / H;
    at::Tensor x = at::empty_like(hc), y = norm_output(hc, spare);
    at::Tensor rstd = at::empty({rows}, h.options().dtype(at::kFloat));
    kernels::add_rms_norm_forward_launch(hc.data_ptr(), ac.data_ptr(), weight.data_ptr(), x.data_ptr(), y.data_ptr(),
                                         rstd.data_ptr<float>(), rows, H, norm_output_ld(y), static_cast<float>(eps),
                                         elem_type(h), stream_of(h));
    ctx->save_for_backward({x, weight, rstd});
    ctx->set_materialize_grads(false);  // (x without a gradient of its own: the norm's alone, no zeros read)
    return {x, y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &rstd = s[2];
    at::Tensor dres = grads[0], dy = grads[1];
    if (!dy.defined()) return {dres, dres, at::Tensor(), at::Tensor(), at::Tensor()};
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t H = x.size(-1), rows = x.numel() / H;
    dy = dy.to(x.scalar_type());
    int64_t ld = row_stride(dy);  // the first columns of a wider GEMM output are read in place
    if (ld == 0) {
      dy = dy.contiguous();
      ld = H;
    }
    if (dres.defined()) {
      dres = dres.to(x.scalar_type()).contiguous();
      if (!aligned(dres)) dres = dres.clone();
    }
    at::Tensor g = at::empty_like(x);
    kernels::add_rms_norm_backward_launch(dy.data_ptr(), dres.defined() ? dres.data_ptr() : nullptr, x.data_ptr(),
                                          w.data_ptr(), rstd.data_ptr<float>(), g.data_ptr(), rows, H, ld, elem_type(x),
                                          stream_of(x));
    return {g, g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// SwiGLU over gate and up rows `ld_in` elements apart (two [.., I] tensors, or one [.., 2I] projection output).
at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u, int64_t cols, int64_t ld_in,
                          at::IntArrayRef out_sizes) {
  at::Tensor out = at::empty(out_sizes, g.options());
  const int64_t rows = out.numel() / cols;
  kernels::swiglu_forward_launch(g.data_ptr(), u.data_ptr(), out.data_ptr(), rows, cols, ld_in, cols, elem_type(g),
                                 stream_of(g));
  return out;
}
void swiglu_backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, const at::Tensor& dg,
                     const at::Tensor& du, int64_t cols, int64_t ld_in) {
  kernels::swiglu_backward_launch(dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                  dy.numel() / cols, cols, ld_in, cols, elem_type(g), stream_of(g));
}

struct SwigluFn : public torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    c10::cuda::CUDAGuard guard(gate.device());
    at::Tensor g = gate.contiguous(), u = up.contiguous();
    const int64_t I = g.size(-1);
    ctx->save_for_backward({g, u});
    return swiglu_forward(g, u, I, I, g.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &g = s[0], &u = s[1];
    c10::cuda::CUDAGuard guard(g.device());
    at::Tensor dy = grads[0].to(g.scalar_type()).contiguous();
    at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
    swiglu_backward(dy, g, u, dg, du, g.size(-1), g.size(-1));
    return {dg, du};
  }
};

// gu [.., 2I] (gate | up, one projection output) -> [.., I]; the gradient comes back as one [.., 2I] tensor, the
// gradient of the projection output as it is.
struct SwigluPackedFn : public torch::autograd::Function<SwigluPackedFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate_up) {
    c10::cuda::CUDAGuard guard(gate_up.device());
    at::Tensor gu = gate_up.contiguous();
    const int64_t I = gu.size(-1) / 2;
    std::vector<int64_t> sizes(gu.sizes().begin(), gu.sizes().end());
    sizes.back() = I;
    ctx->save_for_backward({gu});
    return swiglu_forward(gu, gu.narrow(-1, I, I), I, 2 * I, sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor gu = ctx->get_saved_variables()[0];
    c10::cuda::CUDAGuard guard(gu.device());
    const int64_t I = gu.size(-1) / 2;
    at::Tensor dy = grads[0].to(gu.scalar_type()).contiguous();
    at::Tensor dgu = at::empty_like(gu);
    swiglu_backward(dy, gu, gu.narrow(-1, I, I), dgu, dgu.narrow(-1, I, I), I, 2 * I);
    return {dgu};
  }
};

// RoPE of [tokens, heads, D] rows `x_ld` / `y_ld` elements apart per token (see rope_launch).
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& y, int64_t heads,
               int64_t D, int64_t x_ld, int64_t y_ld, bool inverse) {
  const int64_t tokens = cos.numel() / D;
  kernels::rope_launch(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), tokens, heads, D, x_ld, y_ld,
                       inverse, elem_type(x), stream_of(x));
}

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor y = at::empty_like(x);
    const int64_t D = x.size(-1), heads = x.size(-2);
    rope_rows(x, cos, sin, y, heads, D, heads * D, heads * D, /*inverse=*/false);
    ctx->save_for_backward({cos, sin});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &cos = s[0], &sin = s[1];
    c10::cuda::CUDAGuard guard(cos.device());
    at::Tensor dy = grads[0].to(cos.scalar_type()).contiguous();
    at::Tensor dx = at::empty_like(dy);
    const int64_t D = dy.size(-1), heads = dy.size(-2);
    rope_rows(dy, cos, sin, dx, heads, D, heads * D, heads * D, /*inverse=*/true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// qkv [B, S, (Hq + 2 Hkv) D] (one fused projection output) -> q, k rotated [B, S, H, D] and v [B, S, Hkv, D], each
// contiguous; the gradients of the three are written back into one [B, S, (Hq + 2 Hkv) D] tensor.
struct RopeQkvFn : public torch::autograd::Function<RopeQkvFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv_in, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t q_heads, int64_t kv_heads) {
    c10::cuda::CUDAGuard guard(qkv_in.device());
    at::Tensor qkv = qkv_in.contiguous();
    const int64_t B = qkv.size(0), S = qkv.size(1), D = cos.size(-1), ld = qkv.size(-1);
    at::Tensor q = at::empty({B, S, q_heads, D}, qkv.options()), k = at::empty({B, S, kv_heads, D}, qkv.options()),
               v = at::empty({B, S, kv_heads, D}, qkv.options());
    // One launch: q and k rotated, v copied out (ATen's strided copy ran at a third of the bandwidth).
    const char* base = static_cast<const char*>(qkv.data_ptr());
    const int64_t e = qkv.element_size();
    const kernels::RopeRows runs[3] = {{base, q.data_ptr(), ld, q_heads * D, q_heads, true},
                                       {base + q_heads * D * e, k.data_ptr(), ld, kv_heads * D, kv_heads, true},
                                       {base + (q_heads + kv_heads) * D * e, v.data_ptr(), ld, kv_heads * D, kv_heads,
                                        false}};
    kernels::rope_runs_launch(runs, 3, cos.data_ptr(), sin.data_ptr(), B * S, D, /*inverse=*/false, elem_type(qkv),
                              stream_of(qkv));
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["q_heads"] = q_heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    return {q, k, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    return {rope_qkv_grad_cuda(grads, s[0], s[1], ctx->saved_data["q_heads"].toInt(),
                               ctx->saved_data["kv_heads"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
  // The gradient of qkv out of those of rope(q), rope(k), v (undefined ones zero): the inverse rotation written
  // into one [B, S, (Hq + 2 Hkv) D] tensor.
  static at::Tensor rope_qkv_grad_cuda(const variable_list& grads, const at::Tensor& cos, const at::Tensor& sin,
                                       int64_t q_heads, int64_t kv_heads) {
    c10::cuda::CUDAGuard guard(cos.device());
    const int64_t B = cos.size(0), S = cos.size(1), D = cos.size(-1), ld = (q_heads + 2 * kv_heads) * D;
    at::Tensor dqkv = at::empty({B, S, ld}, cos.options());
    auto grad = [&](int i, int64_t heads) {
      return grads[i].defined() ? grads[i].to(cos.scalar_type()).contiguous()
                                : at::zeros({B, S, heads, D}, cos.options());
    };
    // One launch: the inverse rotations of dq and dk and dv's copy into their columns of dqkv.
    const at::Tensor dq = grad(0, q_heads), dk = grad(1, kv_heads), dv = grad(2, kv_heads);
    char* base = static_cast<char*>(dqkv.data_ptr());
    const int64_t e = dqkv.element_size();
    const kernels::RopeRows runs[3] = {{dq.data_ptr(), base, q_heads * D, ld, q_heads, true},
                                       {dk.data_ptr(), base + q_heads * D * e, kv_heads * D, ld, kv_heads, true},
                                       {dv.data_ptr(), base + (q_heads + kv_heads) * D * e, kv_heads * D, ld, kv_heads,
                                        false}};
    kernels::rope_runs_launch(runs, 3, cos.data_ptr(), sin.data_ptr(), B * S, D, /*inverse=*/true, elem_type(dqkv),
                              stream_of(dqkv));
    return dqkv;
  }
};
#endif

}  // namespace

bool fused_ops_apply(const at::Tensor& x) {
#ifdef QT_WITH_CUDA
  const auto t = x.scalar_type();
  return x.is_cuda() && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && x.dim() >= 1 &&
         x.size(-1) % 8 == 0 && aligned(x);
#else
  (void)x;
  return false;
#endif
}

void copy_rows(const at::Tensor& dst, const at::Tensor& src) {
#ifdef QT_WITH_CUDA
  const int64_t e = dst.element_size();
  if (dst.is_cuda() && src.device() == dst.device() && dst.dim() == 2 && src.sizes() == dst.sizes() &&
      src.scalar_type() == dst.scalar_type() && dst.stride(1) == 1 && src.stride(1) == 1 &&
      (dst.size(1) * e) % 16 == 0 && (dst.stride(0) * e) % 16 == 0 && (src.stride(0) * e) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0) {
    c10::cuda::CUDAGuard guard(dst.device());
    kernels::copy_rows_launch(dst.data_ptr(), dst.stride(0) * e, src.data_ptr(), src.stride(0) * e, dst.size(0),
                              dst.size(1) * e, stream_of(dst));
    return;
  }
#endif
  dst.copy_(src);
}

at::Tensor to_device_async(const at::Tensor& t, const at::Device& device) {
  if (t.device() == device) return t;
  if (!device.is_cuda() || !t.device().is_cpu()) return t.to(device);
  at::Tensor pinned = at::empty(t.sizes(), t.options().pinned_memory(true));
  pinned.copy_(t);
  return pinned.to(device, /*non_blocking=*/true);
}

void scaled_copies_reference(const std::vector<ScaledCopy>& copies) {
  for (const ScaledCopy& c : copies) c.dst.copy_(c.scale == 1.0 ? c.src : c.src * c.scale);
}

void scaled_copies(const std::vector<ScaledCopy>& copies) {
  if (copies.empty()) return;
#ifdef QT_WITH_CUDA
  const at::Tensor& first = copies[0].dst;
  const auto t = first.scalar_type();
  bool take = first.is_cuda() && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16);
  for (const ScaledCopy& c : copies) {
    if (!take) break;
    take = c.dst.device() == first.device() && c.src.device() == first.device() && c.dst.scalar_type() == t &&
           c.src.scalar_type() == at::kFloat && c.dst.dim() == 2 && c.src.sizes() == c.dst.sizes() &&
           (c.dst.size(1) <= 1 || c.dst.stride(1) == 1) && (c.src.size(1) <= 1 || c.src.stride(1) == 1);
  }
  if (take) {
    std::vector<kernels::ScaledCopyJob> jobs;
    int64_t blocks = 0;
    for (const ScaledCopy& c : copies) {
      const int64_t n = c.dst.numel();
      if (n == 0) continue;
      jobs.push_back({c.src.data_ptr<float>(), c.dst.data_ptr(), c.dst.size(0), c.dst.size(1), c.src.stride(0),
                      c.dst.stride(0), static_cast<float>(c.scale), blocks});
      blocks += (n + kernels::kScaledCopyChunk - 1) / kernels::kScaledCopyChunk;
    }
    if (jobs.empty()) return;
    // The table goes to the device through pinned memory, queued ahead of the kernel (the host allocator keeps the
    // pinned block until the copy has run; the device block is the stream's until the kernel has).
    const int64_t bytes = static_cast<int64_t>(jobs.size() * sizeof(kernels::ScaledCopyJob));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), jobs.data(), static_cast<size_t>(bytes));
    c10::cuda::CUDAGuard guard(first.device());
    at::Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(first.device()));
    table.copy_(host, /*non_blocking=*/true);
    kernels::scaled_copies_launch(static_cast<const kernels::ScaledCopyJob*>(table.data_ptr()),
                                  static_cast<int64_t>(jobs.size()), blocks, elem_type(first), stream_of(first));
    return;
  }
#endif
  scaled_copies_reference(copies);
}

bool lora_dropout_kernels_take(const at::Tensor& x2) {
#ifdef QT_WITH_CUDA
  const auto t = x2.scalar_type();
  return x2.is_cuda() && x2.dim() == 2 && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) &&
         x2.size(1) % 8 == 0 && row_stride(x2) != 0;
#else
  (void)x2;
  return false;
#endif
}

at::Tensor lora_dropout_mask(int64_t rows, int64_t cols, const DropoutMask& m) {
  const uint32_t threshold = dropout_hash::threshold_of(m.p);
  at::Tensor mask = at::empty({rows, cols}, at::kBool);
  bool* out = mask.data_ptr<bool>();
  uint64_t bits = 0;
  for (int64_t e = 0, n = rows * cols; e < n; ++e) {
    if (e % 4 == 0) bits = dropout_hash::bits4(m.key, static_cast<uint64_t>(e) >> 2);
    out[e] = dropout_hash::kept(bits, static_cast<int>(e % 4), threshold);
  }
  return mask;
}

namespace {
float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }
at::Tensor scaled_mask(int64_t rows, int64_t cols, const DropoutMask& m, const at::Device& device) {
  return lora_dropout_mask(rows, cols, m).to(device).to(at::kFloat).mul_(dropout_scale(m.p));
}
}  // namespace

at::Tensor lora_dropout_apply_reference(const at::Tensor& x2, const DropoutMask& m) {
  return (x2.to(at::kFloat) * scaled_mask(x2.size(0), x2.size(1), m, x2.device())).to(x2.scalar_type());
}

at::Tensor lora_dropout_apply(const at::Tensor& x2, const DropoutMask& m) {
#ifdef QT_WITH_CUDA
  if (lora_dropout_kernels_take(x2)) {
    c10::cuda::CUDAGuard guard(x2.device());
    at::Tensor y = at::empty(x2.sizes(), x2.options().memory_format(at::MemoryFormat::Contiguous));
    kernels::dropout_apply_launch(x2.data_ptr(), row_stride(x2), y.data_ptr(), x2.size(1), x2.size(0), x2.size(1),
                                  m.key, dropout_hash::threshold_of(m.p), dropout_scale(m.p), elem_type(x2),
                                  stream_of(x2));
    return y;
  }
#endif
  return lora_dropout_apply_reference(x2, m);
}

void lora_dropout_rank_update_reference(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a,
                                        const DropoutMask& m) {
  const at::Tensor term = at::mm(g.to(at::kFloat), a.to(at::kFloat)) * scaled_mask(dx.size(0), dx.size(1), m, dx.device());
  dx.copy_((dx.to(at::kFloat) + term).to(dx.scalar_type()));
}

void lora_dropout_rank_update(const at::Tensor& dx, const at::Tensor& g, const at::Tensor& a, const DropoutMask& m) {
  QT_CHECK(dx.dim() == 2 && g.dim() == 2 && a.dim() == 2 && g.size(0) == dx.size(0) && a.size(1) == dx.size(1) &&
               g.size(1) == a.size(0),
           ErrorKind::Internal, "lora_dropout_rank_update: dx [rows, cols], g [rows, r], a [r, cols] expected");
#ifdef QT_WITH_CUDA
  if (lora_dropout_kernels_take(dx) && g.device() == dx.device() && a.device() == dx.device() &&
      g.scalar_type() == dx.scalar_type() && a.scalar_type() == dx.scalar_type()) {
    c10::cuda::CUDAGuard guard(dx.device());
    const at::Tensor gc = g.stride(1) == 1 ? g : g.contiguous();
    // a's rows are read 4 elements a load: a row stride of a multiple of 4, the start aligned to the 4.
    const bool a_vectors = a.stride(1) == 1 && (a.size(0) == 1 || a.stride(0) % 4 == 0) &&
                           reinterpret_cast<uintptr_t>(a.data_ptr()) % (4 * a.element_size()) == 0;
    const at::Tensor ac = a_vectors ? a : at::empty(a.sizes(), a.options()).copy_(a);
    kernels::dropout_rank_update_launch(dx.data_ptr(), row_stride(dx), gc.data_ptr(), gc.size(0) > 1 ? gc.stride(0) : gc.size(1),
                                        ac.data_ptr(), ac.size(0) > 1 ? ac.stride(0) : ac.size(1), dx.size(0), dx.size(1),
                                        g.size(1), m.key, dropout_hash::threshold_of(m.p), dropout_scale(m.p),
                                        elem_type(dx), stream_of(dx));
    return;
  }
#endif
  lora_dropout_rank_update_reference(dx, g, a, m);
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return weight * h.to(x.scalar_type());
}

namespace {
// y (x's shape) copied into the first columns of a [rows, H + spare] buffer, for the references (differentiable).
at::Tensor widened(const at::Tensor& y, int64_t spare) {
  if (spare == 0) return y;
  const int64_t H = y.size(-1);
  at::Tensor wide = at::empty({y.numel() / H, H + spare}, y.options());
  at::Tensor first = wide.narrow(1, 0, H);
  first.copy_(y.reshape({-1, H}));
  return first.view(y.sizes());
}
}  // namespace

at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t spare) {
  QT_CHECK(spare >= 0 && spare % 8 == 0, ErrorKind::Internal, "rms_norm_fused: spare columns a multiple of 8");
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(x) && x.is_contiguous() && !weight.requires_grad() && weight.scalar_type() == x.scalar_type() &&
      weight.is_contiguous() && weight.numel() == x.size(-1) && aligned(weight))
    return RmsNormFn::apply(x, weight, eps, spare);
#endif
  return widened(rms_norm_reference(x, weight, eps), spare);
}

std::array<at::Tensor, 2> add_rms_norm_reference(const at::Tensor& h, const at::Tensor& a, const at::Tensor& weight,
                                                 double eps) {
  at::Tensor x = h + a;
  return {x, rms_norm_reference(x, weight, eps)};
}

std::array<at::Tensor, 2> add_rms_norm_fused(const at::Tensor& h, const at::Tensor& a, const at::Tensor& weight,
                                             double eps, int64_t spare) {
  QT_CHECK(spare >= 0 && spare % 8 == 0, ErrorKind::Internal, "add_rms_norm_fused: spare columns a multiple of 8");
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(h) && h.sizes() == a.sizes() && a.scalar_type() == h.scalar_type() && a.device() == h.device() &&
      !weight.requires_grad() && weight.scalar_type() == h.scalar_type() && weight.is_contiguous() &&
      weight.numel() == h.size(-1) && aligned(weight) && (a.is_contiguous() ? aligned(a) : true)) {
    const variable_list out = AddRmsNormFn::apply(h, a, weight, eps, spare);
    return {out[0], out[1]};
  }
#endif
  auto out = add_rms_norm_reference(h, a, weight, eps);
  out[1] = widened(out[1], spare);
  return out;
}

at::Tensor swiglu_reference(const at::Tensor& gate, const at::Tensor& up) { return at::silu(gate) * up; }

at::Tensor swiglu_fused(const at::Tensor& gate, const at::Tensor& up) {
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(gate) && gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() &&
      gate.is_contiguous() && up.is_contiguous() && aligned(up))
    return SwigluFn::apply(gate, up);
#endif
  return swiglu_reference(gate, up);
}

at::Tensor swiglu_packed(const at::Tensor& gate_up) {
  QT_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, ErrorKind::Internal,
           "swiglu_packed: expected [.., 2 * intermediate]");
  const int64_t I = gate_up.size(-1) / 2;
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(gate_up) && I % 8 == 0 && gate_up.is_contiguous()) return SwigluPackedFn::apply(gate_up);
#endif
  auto halves = at::split_with_sizes(gate_up, {I, I}, -1);  // one node: its backward is one cat
  return swiglu_reference(halves[0], halves[1]);
}

namespace {
bool swiglu_packed_kernel_takes(const at::Tensor& gate_up) {
  return fused_ops_apply(gate_up) && (gate_up.size(-1) / 2) % 8 == 0 && gate_up.is_contiguous();
}
}  // namespace

at::Tensor swiglu_packed_values(const at::Tensor& gate_up) {
  QT_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, ErrorKind::Internal,
           "swiglu_packed_values: expected [.., 2 * intermediate]");
  at::NoGradGuard no_grad;
  const int64_t I = gate_up.size(-1) / 2;
#ifdef QT_WITH_CUDA
  if (swiglu_packed_kernel_takes(gate_up)) {
    c10::cuda::CUDAGuard guard(gate_up.device());
    std::vector<int64_t> sizes(gate_up.sizes().begin(), gate_up.sizes().end());
    sizes.back() = I;
    return swiglu_forward(gate_up, gate_up.narrow(-1, I, I), I, 2 * I, sizes);
  }
#endif
  auto halves = at::split_with_sizes(gate_up, {I, I}, -1);
  return swiglu_reference(halves[0], halves[1]);
}

at::Tensor swiglu_packed_grad(const at::Tensor& gate_up, const at::Tensor& grad) {
  const int64_t I = gate_up.size(-1) / 2;
#ifdef QT_WITH_CUDA
  if (swiglu_packed_kernel_takes(gate_up)) {
    c10::cuda::CUDAGuard guard(gate_up.device());
    at::Tensor dy = grad.to(gate_up.scalar_type()).contiguous();
    at::Tensor dgu = at::empty_like(gate_up);
    swiglu_backward(dy, gate_up, gate_up.narrow(-1, I, I), dgu, dgu.narrow(-1, I, I), I, 2 * I);
    return dgu;
  }
#endif
  // The reference's own backward (autograd through its ops), as swiglu_packed's graph would run it.
  at::AutoGradMode enable(true);
  at::Tensor leaf = gate_up.detach().requires_grad_(true);
  auto halves = at::split_with_sizes(leaf, {I, I}, -1);
  return torch::autograd::grad({swiglu_reference(halves[0], halves[1])}, {leaf}, {grad})[0];
}

at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // transformers' apply_rotary_pos_emb on [B, heads, S, D] (unsqueeze_dim=1), viewed from [B, S, heads, D].
  at::Tensor xt = x.transpose(1, 2);
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-xt.narrow(-1, half, half), xt.narrow(-1, 0, half)}, -1);
  return (xt * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).transpose(1, 2);
}

namespace {
bool rope_kernel_takes(const at::Tensor& x, int64_t D, const at::Tensor& cos, const at::Tensor& sin) {
  return fused_ops_apply(x) && D % 16 == 0 && cos.scalar_type() == x.scalar_type() &&
         sin.scalar_type() == x.scalar_type() && cos.dim() == 3 && cos.size(0) == x.size(0) &&
         cos.size(1) == x.size(1) && cos.size(2) == D && cos.sizes() == sin.sizes();
}
}  // namespace

at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
#ifdef QT_WITH_CUDA
  if (x.dim() == 4 && x.is_contiguous() && rope_kernel_takes(x, x.size(-1), cos, sin)) {
    at::Tensor c = cos.contiguous(), s = sin.contiguous();
    if (aligned(c) && aligned(s)) return RopeFn::apply(x, c, s);
  }
#endif
  return rope_reference(x, cos, sin);
}

namespace {
// rope_qkv_replay's node: the values given, the gradient of rope_qkv. The inverse rotation of x cos + rotate_half(x)
// sin (cos and sin repeat over the two halves of a head) is the rotation with -sin.
struct RopeQkvReplayFn : public torch::autograd::Function<RopeQkvReplayFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t q_heads, int64_t kv_heads, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v) {
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["q_heads"] = q_heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    ctx->saved_data["shape"] = qkv.sizes().vec();
    return {q, k, v};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &cos = s[0], &sin = s[1];
    const int64_t q_heads = ctx->saved_data["q_heads"].toInt(), kv_heads = ctx->saved_data["kv_heads"].toInt();
    const int64_t B = cos.size(0), S = cos.size(1), D = cos.size(-1);
    at::Tensor dqkv;
#ifdef QT_WITH_CUDA
    if (rope_kernel_takes(cos, D, cos, sin)) {
      const at::Tensor c = cos.contiguous(), sn = sin.contiguous();
      if (aligned(c) && aligned(sn)) dqkv = RopeQkvFn::rope_qkv_grad_cuda(grads, c, sn, q_heads, kv_heads);
    }
#endif
    if (!dqkv.defined()) {
      auto grad = [&](int i, int64_t heads) {
        return grads[i].defined() ? grads[i] : at::zeros({B, S, heads, D}, cos.options());
      };
      const at::Tensor neg_sin = -sin;
      dqkv = at::cat({rope_reference(grad(0, q_heads), cos, neg_sin).reshape({B, S, q_heads * D}),
                      rope_reference(grad(1, kv_heads), cos, neg_sin).reshape({B, S, kv_heads * D}),
                      grad(2, kv_heads).reshape({B, S, kv_heads * D})},
                     -1);
    }
    variable_list out(8);
    out[0] = dqkv.view(ctx->saved_data["shape"].toIntVector());
    return out;
  }
};
}  // namespace

std::array<at::Tensor, 3> rope_qkv_replay(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                          int64_t q_heads, int64_t kv_heads, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v) {
  QT_CHECK(qkv.dim() == 3 && cos.dim() == 3 && qkv.size(-1) == (q_heads + 2 * kv_heads) * cos.size(-1) &&
               q.dim() == 4 && q.size(2) == q_heads && k.dim() == 4 && k.size(2) == kv_heads && v.sizes() == k.sizes(),
           ErrorKind::Internal, "rope_qkv_replay: expected qkv [B, S, (q_heads + 2 kv_heads) head_dim] and the "
                                "rotated q [B, S, q_heads, head_dim], k and v [B, S, kv_heads, head_dim]");
  auto out = RopeQkvReplayFn::apply(qkv, cos, sin, q_heads, kv_heads, q.detach(), k.detach(), v.detach());
  return {out[0], out[1], out[2]};
}

std::array<at::Tensor, 3> rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                   int64_t q_heads, int64_t kv_heads) {
  QT_CHECK(qkv.dim() == 3 && cos.dim() == 3 && qkv.size(-1) == (q_heads + 2 * kv_heads) * cos.size(-1),
           ErrorKind::Internal, "rope_qkv: expected qkv [B, S, (q_heads + 2 kv_heads) head_dim], cos [B, S, head_dim]");
  const int64_t B = qkv.size(0), S = qkv.size(1), D = cos.size(-1);
#ifdef QT_WITH_CUDA
  if (qkv.is_contiguous() && rope_kernel_takes(qkv, D, cos, sin)) {
    at::Tensor c = cos.contiguous(), s = sin.contiguous();
    if (aligned(c) && aligned(s)) {
      auto out = RopeQkvFn::apply(qkv, c, s, q_heads, kv_heads);
      return {out[0], out[1], out[2]};
    }
  }
#endif
  auto parts = at::split_with_sizes(qkv, {q_heads * D, kv_heads * D, kv_heads * D}, -1);
  return {rope_reference(parts[0].view({B, S, q_heads, D}), cos, sin),
          rope_reference(parts[1].view({B, S, kv_heads, D}), cos, sin), parts[2].view({B, S, kv_heads, D})};
}

std::array<at::Tensor, 3> rope_qkv_norm_reference(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                  int64_t q_heads, int64_t kv_heads, const QkNorm& norm) {
  const int64_t B = qkv.size(0), S = qkv.size(1), D = cos.size(-1);
  auto parts = at::split_with_sizes(qkv, {q_heads * D, kv_heads * D, kv_heads * D}, -1);
  return {rope_reference(rms_norm_reference(parts[0].view({B, S, q_heads, D}), norm.q_weight, norm.eps), cos, sin),
          rope_reference(rms_norm_reference(parts[1].view({B, S, kv_heads, D}), norm.k_weight, norm.eps), cos, sin),
          parts[2].view({B, S, kv_heads, D})};
}

namespace {
// rope_qkv_norm's node: forward from `src` (qkv's values, or the kept ones), the gradient to qkv. On CUDA through
// rope_norm_launch and its backward; elsewhere the reference, differentiated by autograd in the backward pass.
struct RopeQkvNormFn : public torch::autograd::Function<RopeQkvNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& src, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& wq, const at::Tensor& wk, double eps,
                               int64_t q_heads, int64_t kv_heads, bool cuda) {
    ctx->save_for_backward({src, cos, sin, wq, wk});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["q_heads"] = q_heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    ctx->saved_data["cuda"] = cuda;
    ctx->saved_data["shape"] = qkv.sizes().vec();
    const int64_t B = src.size(0), S = src.size(1), D = cos.size(-1), ld = src.size(-1);
#ifdef QT_WITH_CUDA
    if (cuda) {
      c10::cuda::CUDAGuard guard(src.device());
      at::Tensor q = at::empty({B, S, q_heads, D}, src.options()), k = at::empty({B, S, kv_heads, D}, src.options());
      const int64_t tokens = B * S;
      kernels::rope_norm_launch(src.data_ptr(), wq.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), tokens,
                                q_heads, D, ld, q_heads * D, static_cast<float>(eps), elem_type(src), stream_of(src));
      kernels::rope_norm_launch(src.narrow(-1, q_heads * D, kv_heads * D).data_ptr(), wk.data_ptr(), cos.data_ptr(),
                                sin.data_ptr(), k.data_ptr(), tokens, kv_heads, D, ld, kv_heads * D,
                                static_cast<float>(eps), elem_type(src), stream_of(src));
      at::Tensor v = src.narrow(-1, (q_heads + kv_heads) * D, kv_heads * D).reshape({B, S, kv_heads, D}).contiguous();
      return {q, k, v};
    }
#endif
    (void)ld;
    at::NoGradGuard no_grad;
    auto out = rope_qkv_norm_reference(src, cos, sin, q_heads, kv_heads, QkNorm{wq, wk, eps});
    return {out[0], out[1], out[2].contiguous()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &src = s[0], &cos = s[1], &sin = s[2], &wq = s[3], &wk = s[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t q_heads = ctx->saved_data["q_heads"].toInt(), kv_heads = ctx->saved_data["kv_heads"].toInt();
    const int64_t B = src.size(0), S = src.size(1), D = cos.size(-1), ld = src.size(-1);
    auto grad = [&](int i, int64_t heads) {
      return grads[i].defined() ? grads[i].to(src.scalar_type()).contiguous() : at::zeros({B, S, heads, D}, src.options());
    };
    at::Tensor dqkv;
#ifdef QT_WITH_CUDA
    if (ctx->saved_data["cuda"].toBool()) {
      c10::cuda::CUDAGuard guard(src.device());
      dqkv = at::empty({B, S, ld}, src.options());
      const int64_t tokens = B * S;
      const at::Tensor dq = grad(0, q_heads), dk = grad(1, kv_heads);
      kernels::rope_norm_backward_launch(dq.data_ptr(), src.data_ptr(), wq.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                         dqkv.data_ptr(), tokens, q_heads, D, q_heads * D, ld, ld,
                                         static_cast<float>(eps), elem_type(src), stream_of(src));
      kernels::rope_norm_backward_launch(dk.data_ptr(), src.narrow(-1, q_heads * D, kv_heads * D).data_ptr(),
                                         wk.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                         dqkv.narrow(-1, q_heads * D, kv_heads * D).data_ptr(), tokens, kv_heads, D,
                                         kv_heads * D, ld, ld, static_cast<float>(eps), elem_type(src), stream_of(src));
      dqkv.narrow(-1, (q_heads + kv_heads) * D, kv_heads * D).copy_(grad(2, kv_heads).view({B, S, kv_heads * D}));
    }
#endif
    if (!dqkv.defined()) {
      at::AutoGradMode enable(true);
      at::Tensor leaf = src.detach().requires_grad_(true);
      auto out = rope_qkv_norm_reference(leaf, cos, sin, q_heads, kv_heads, QkNorm{wq, wk, eps});
      dqkv = torch::autograd::grad({out[0], out[1], out[2]}, {leaf}, {grad(0, q_heads), grad(1, kv_heads), grad(2, kv_heads)})[0];
    }
    variable_list out(10);
    out[0] = dqkv.view(ctx->saved_data["shape"].toIntVector());
    return out;
  }
};
}  // namespace

std::array<at::Tensor, 3> rope_qkv_norm(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                        int64_t q_heads, int64_t kv_heads, const QkNorm& norm, const at::Tensor& kept) {
  QT_CHECK(qkv.dim() == 3 && cos.dim() == 3 && qkv.size(-1) == (q_heads + 2 * kv_heads) * cos.size(-1) &&
               norm.q_weight.numel() == cos.size(-1) && norm.k_weight.numel() == cos.size(-1) &&
               (!kept.defined() || kept.sizes() == qkv.sizes()),
           ErrorKind::Internal, "rope_qkv_norm: expected qkv [B, S, (q_heads + 2 kv_heads) head_dim], cos [B, S, "
                                "head_dim], q / k norm weights [head_dim] and kept values of qkv's shape");
  QT_CHECK(!norm.q_weight.requires_grad() && !norm.k_weight.requires_grad(), ErrorKind::Internal,
           "rope_qkv_norm: the q / k norm weights are frozen");
  const at::Tensor src = kept.defined() ? kept.detach() : qkv;
  const int64_t D = cos.size(-1);
  bool cuda = false;
  at::Tensor c = cos, s = sin, wq = norm.q_weight, wk = norm.k_weight;
#ifdef QT_WITH_CUDA
  if (src.is_contiguous() && rope_kernel_takes(src, D, cos, sin) && kernels::rope_norm_takes_head_dim(D) &&
      wq.scalar_type() == src.scalar_type() && wk.scalar_type() == src.scalar_type() && wq.is_cuda() && wk.is_cuda()) {
    c = cos.contiguous(), s = sin.contiguous(), wq = wq.contiguous(), wk = wk.contiguous();
    cuda = aligned(c) && aligned(s) && aligned(wq) && aligned(wk);
  }
#endif
  if (!cuda && !kept.defined()) return rope_qkv_norm_reference(qkv, cos, sin, q_heads, kv_heads, norm);
  (void)D;
  auto out = RopeQkvNormFn::apply(qkv, src.detach(), c, s, wq, wk, norm.eps, q_heads, kv_heads, cuda);
  return {out[0], out[1], out[2]};
}

}  // namespace qt
