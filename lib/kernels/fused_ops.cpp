// Autograd wrappers of the fused RMSNorm / SwiGLU kernels and their plain-ATen references (fused_ops.h).
#include "lib/kernels/fused_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "lib/core/error.h"
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

#ifdef QT_WITH_CUDA
CUstream_st* stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor xc = x.contiguous();
    const int64_t H = x.size(-1), rows = x.numel() / H;
    at::Tensor y = at::empty_like(xc);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    kernels::rms_norm_forward_launch(xc.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr<float>(), rows, H,
                                     static_cast<float>(eps), elem_type(x), stream_of(x));
    ctx->save_for_backward({xc, weight, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &rstd = s[2];
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    at::Tensor dx = at::empty_like(x);
    const int64_t H = x.size(-1), rows = x.numel() / H;
    kernels::rms_norm_backward_launch(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
                                      rows, H, elem_type(x), stream_of(x));
    return {dx, at::Tensor(), at::Tensor()};
  }
};

struct SwigluFn : public torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    c10::cuda::CUDAGuard guard(gate.device());
    at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor out = at::empty_like(g);
    kernels::swiglu_forward_launch(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), elem_type(g), stream_of(g));
    ctx->save_for_backward({g, u});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &g = s[0], &u = s[1];
    c10::cuda::CUDAGuard guard(g.device());
    at::Tensor dy = grads[0].to(g.scalar_type()).contiguous();
    at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
    kernels::swiglu_backward_launch(dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(),
                                    elem_type(g), stream_of(g));
    return {dg, du};
  }
};

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor y = at::empty_like(x);
    const int64_t D = x.size(-1), heads = x.size(-2), tokens = x.numel() / (D * heads);
    kernels::rope_launch(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), tokens, heads, D,
                         /*inverse=*/false, elem_type(x), stream_of(x));
    ctx->save_for_backward({cos, sin});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    const at::Tensor &cos = s[0], &sin = s[1];
    c10::cuda::CUDAGuard guard(cos.device());
    at::Tensor dy = grads[0].to(cos.scalar_type()).contiguous();
    at::Tensor dx = at::empty_like(dy);
    const int64_t D = dy.size(-1), heads = dy.size(-2), tokens = dy.numel() / (D * heads);
    kernels::rope_launch(dy.data_ptr(), cos.data_ptr(), sin.data_ptr(), dx.data_ptr(), tokens, heads, D,
                         /*inverse=*/true, elem_type(dy), stream_of(dy));
    return {dx, at::Tensor(), at::Tensor()};
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

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return weight * h.to(x.scalar_type());
}

at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& weight, double eps) {
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(x) && x.is_contiguous() && !weight.requires_grad() && weight.scalar_type() == x.scalar_type() &&
      weight.is_contiguous() && weight.numel() == x.size(-1) && aligned(weight))
    return RmsNormFn::apply(x, weight, eps);
#endif
  return rms_norm_reference(x, weight, eps);
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

at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // transformers' apply_rotary_pos_emb on [B, heads, S, D] (unsqueeze_dim=1), viewed from [B, S, heads, D].
  at::Tensor xt = x.transpose(1, 2);
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-xt.narrow(-1, half, half), xt.narrow(-1, 0, half)}, -1);
  return (xt * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).transpose(1, 2);
}

at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
#ifdef QT_WITH_CUDA
  if (fused_ops_apply(x) && x.dim() == 4 && x.size(-1) % 16 == 0 && x.is_contiguous() &&
      cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.dim() == 3 &&
      cos.size(0) == x.size(0) && cos.size(1) == x.size(1) && cos.size(2) == x.size(3) && cos.sizes() == sin.sizes()) {
    at::Tensor c = cos.contiguous(), s = sin.contiguous();
    if (aligned(c) && aligned(s)) return RopeFn::apply(x, c, s);
  }
#endif
  return rope_reference(x, cos, sin);
}

}  // namespace qt
