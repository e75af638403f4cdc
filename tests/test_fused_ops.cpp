// Fused RMSNorm and SwiGLU kernels against their plain-ATen references (lib/kernels/fused_ops.h): forward and
// input gradients on random inputs of LLaMA widths, bf16 / fp16 / fp32, outputs poisoned through the caching
// allocator (a freed NaN-filled block is what the kernels' empty outputs get).
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>

#include <array>
#include <string>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/fused_ops_kernels.h"
#include "lib/kernels/tuned_gemm.h"
#include "tests/catch.h"
#include "tests/test_util.h"

using qt::test::rel_err;

namespace {


double bound(c10::ScalarType t) { return t == at::kFloat ? 1e-5 : t == at::kHalf ? 2e-3 : 1e-2; }

// rope_qkv and swiglu_packed on one fused projection output against rope_fused / swiglu_fused on its parts (the
// reference path of each off CUDA, the kernels on CUDA): forward, and the gradient of the fused output against the
// parts' gradients side by side. `tol` bounds the relative error.
void check_rope_qkv(const at::Device& device, c10::ScalarType dtype, int64_t Hq, int64_t Hkv, int64_t D, double tol) {
  INFO("dtype " << c10::toString(dtype) << " heads " << Hq << "/" << Hkv << " D " << D);
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  const int64_t B = 2, S = 37, width = (Hq + 2 * Hkv) * D;
  at::Tensor qkv0 = at::randn({B, S, width}, opt);
  at::Tensor angle = at::rand({B, S, D / 2}, opt.dtype(at::kFloat)) * 100;
  angle = at::cat({angle, angle}, -1);
  at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
  at::Tensor dq = at::randn({B, S, Hq, D}, opt), dk = at::randn({B, S, Hkv, D}, opt), dv = at::randn({B, S, Hkv, D}, opt);
  // Reference: the three parts as separate tensors.
  at::Tensor q0 = qkv0.narrow(-1, 0, Hq * D).reshape({B, S, Hq, D}).clone().requires_grad_(true);
  at::Tensor k0 = qkv0.narrow(-1, Hq * D, Hkv * D).reshape({B, S, Hkv, D}).clone().requires_grad_(true);
  at::Tensor v0 = qkv0.narrow(-1, (Hq + Hkv) * D, Hkv * D).reshape({B, S, Hkv, D});
  at::Tensor qr = qt::rope_reference(q0, cos, sin), kr = qt::rope_reference(k0, cos, sin);
  torch::autograd::backward({qr, kr}, {dq, dk});
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  at::Tensor qkv = qkv0.clone().requires_grad_(true);
  auto out = qt::rope_qkv(qkv, cos, sin, Hq, Hkv);
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  torch::autograd::backward({out[0], out[1], out[2]}, {dq, dk, dv});
  // On CUDA the kernel's node ran, not the reference's ops.
  if (device.is_cuda()) CHECK(out[0].grad_fn()->name().find("RopeQkvFn") != std::string::npos);
  CHECK(out[0].sizes() == qr.sizes());
  CHECK(out[2].sizes() == v0.sizes());
  CHECK(rel_err(out[0], qr) < tol);
  CHECK(rel_err(out[1], kr) < tol);
  CHECK(rel_err(out[2], v0) == 0);
  if (device.is_cuda()) {
    // One launch over the three runs of heads gives the bits of the kernel's one-run launches on the parts.
    CHECK(at::equal(out[0], qt::rope_fused(q0.detach().contiguous(), cos, sin)));
    CHECK(at::equal(out[1], qt::rope_fused(k0.detach().contiguous(), cos, sin)));
  }
  const at::Tensor expect = at::cat({q0.grad().reshape({B, S, -1}), k0.grad().reshape({B, S, -1}), dv.reshape({B, S, -1})}, -1);
  CHECK(rel_err(qkv.grad(), expect) < tol);
}

// rope_qkv_norm (Qwen3: each q / k head RMS-normed, then rotated) against the formula written out here from the
// parts (transformers' Qwen3RMSNorm: normalise in fp32, cast, times the weight; then rope_reference): forward and
// the gradient of qkv. With `kept`, the values come from a kept copy and the graph input is NaN-filled (a
// recomputation's projection that computed no output): the same outputs and gradient, nothing of it read.
void check_rope_qkv_norm(const at::Device& device, c10::ScalarType dtype, int64_t Hq, int64_t Hkv, int64_t D,
                         double tol, bool kept) {
  INFO("dtype " << c10::toString(dtype) << " heads " << Hq << "/" << Hkv << " D " << D << (kept ? " kept" : ""));
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  const int64_t B = 2, S = 37, width = (Hq + 2 * Hkv) * D;
  const double eps = 1e-6;
  at::Tensor qkv0 = (at::randn({B, S, width}, opt.dtype(at::kFloat)) * 3).to(dtype);
  at::Tensor angle = at::rand({B, S, D / 2}, opt.dtype(at::kFloat)) * 100;
  angle = at::cat({angle, angle}, -1);
  at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
  const qt::QkNorm norm{(at::rand({D}, opt.dtype(at::kFloat)) + 0.5).to(dtype),
                        (at::rand({D}, opt.dtype(at::kFloat)) + 0.5).to(dtype), eps};
  at::Tensor dq = at::randn({B, S, Hq, D}, opt), dk = at::randn({B, S, Hkv, D}, opt), dv = at::randn({B, S, Hkv, D}, opt);
  auto normed = [&](const at::Tensor& x, const at::Tensor& w) {
    at::Tensor h = x.to(at::kFloat);
    return w * (h * at::rsqrt(h.pow(2).mean(-1, true) + eps)).to(dtype);
  };
  at::Tensor q0 = qkv0.narrow(-1, 0, Hq * D).reshape({B, S, Hq, D}).clone().requires_grad_(true);
  at::Tensor k0 = qkv0.narrow(-1, Hq * D, Hkv * D).reshape({B, S, Hkv, D}).clone().requires_grad_(true);
  at::Tensor v0 = qkv0.narrow(-1, (Hq + Hkv) * D, Hkv * D).reshape({B, S, Hkv, D});
  at::Tensor qr = qt::rope_reference(normed(q0, norm.q_weight), cos, sin);
  at::Tensor kr = qt::rope_reference(normed(k0, norm.k_weight), cos, sin);
  torch::autograd::backward({qr, kr}, {dq, dk});
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  at::Tensor qkv = (kept ? at::full_like(qkv0, NAN) : qkv0.clone()).requires_grad_(true);
  auto out = qt::rope_qkv_norm(qkv, cos, sin, Hq, Hkv, norm, kept ? qkv0 : at::Tensor());
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  torch::autograd::backward({out[0], out[1], out[2]}, {dq, dk, dv});
  if (device.is_cuda()) CHECK(out[0].grad_fn()->name().find("RopeQkvNormFn") != std::string::npos);
  CHECK(out[0].sizes() == qr.sizes());
  CHECK(out[2].sizes() == v0.sizes());
  CHECK(qr.abs().max().item<double>() > 0);
  CHECK(rel_err(out[0], qr) < tol);
  CHECK(rel_err(out[1], kr) < tol);
  CHECK(rel_err(out[2], v0) == 0);
  const at::Tensor expect = at::cat({q0.grad().reshape({B, S, -1}), k0.grad().reshape({B, S, -1}), dv.reshape({B, S, -1})}, -1);
  CHECK(rel_err(qkv.grad(), expect) < tol);
}

void check_swiglu_packed(const at::Device& device, c10::ScalarType dtype, int64_t I, double tol) {
  INFO("dtype " << c10::toString(dtype) << " I " << I);
  const auto opt = at::TensorOptions().dtype(dtype).device(device);
  at::Tensor gu0 = (at::randn({3, 29, 2 * I}, opt.dtype(at::kFloat)) * 2).to(dtype);
  at::Tensor dy = at::randn({3, 29, I}, opt);
  at::Tensor g = gu0.narrow(-1, 0, I).contiguous().requires_grad_(true);
  at::Tensor u = gu0.narrow(-1, I, I).contiguous().requires_grad_(true);
  at::Tensor yr = qt::swiglu_reference(g, u);
  yr.backward(dy);
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  at::Tensor gu = gu0.clone().requires_grad_(true);
  at::Tensor y = qt::swiglu_packed(gu);
  if (device.is_cuda()) qt::test::poison_allocator_cache(device);
  y.backward(dy);
  if (device.is_cuda()) CHECK(y.grad_fn()->name().find("SwigluPackedFn") != std::string::npos);
  CHECK(y.sizes() == yr.sizes());
  CHECK(rel_err(y, yr) < tol);
  CHECK(rel_err(gu.grad(), at::cat({g.grad(), u.grad()}, -1)) < tol);
}

}  // namespace

TEST_CASE("fused ops: off CUDA the references run", "[fused_ops]") {
  at::Tensor x = at::randn({5, 24}).requires_grad_(true);
  at::Tensor w = at::rand({24}) + 0.5;
  CHECK(!qt::fused_ops_apply(x));
  at::Tensor yn = qt::rms_norm_fused(x, w, 1e-5);
  // The reference is transformers' LlamaRMSNorm formula, written out here independently.
  at::Tensor expect = w * (x / at::sqrt(x.pow(2).mean(-1, true) + 1e-5));
  CHECK(rel_err(yn, expect) < 1e-6);
  at::Tensor g = at::randn({5, 24}), u = at::randn({5, 24});
  CHECK(rel_err(qt::swiglu_fused(g, u), g * at::sigmoid(g) * u) < 1e-6);
  // RoPE on [B, S, heads, D]: pairs (j, j + D/2) rotate by the angle whose cos / sin are given.
  at::Tensor xq = at::randn({2, 3, 4, 8});
  at::Tensor angle = at::rand({2, 3, 4}) * 10;
  angle = at::cat({angle, angle}, -1);
  at::Tensor y = qt::rope_fused(xq, angle.cos(), angle.sin());
  at::Tensor x1 = xq.narrow(-1, 0, 4), x2 = xq.narrow(-1, 4, 4);
  at::Tensor c = angle.cos().narrow(-1, 0, 4).unsqueeze(2), s = angle.sin().narrow(-1, 0, 4).unsqueeze(2);
  CHECK(rel_err(y, at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1)) < 1e-6);
}

TEST_CASE("fused ops on one q/k/v or gate/up projection output equal the ops on its parts, off CUDA", "[fused_ops]") {
  check_rope_qkv(at::kCPU, at::kFloat, 4, 2, 8, 1e-6);
  check_rope_qkv(at::kCPU, at::kFloat, 3, 3, 16, 1e-6);
  check_swiglu_packed(at::kCPU, at::kFloat, 24, 1e-6);
  for (bool kept : {false, true}) {
    check_rope_qkv_norm(at::kCPU, at::kFloat, 4, 2, 16, 1e-6, kept);
    check_rope_qkv_norm(at::kCPU, at::kFloat, 3, 3, 32, 1e-6, kept);
  }
}

TEST_CASE("fused RoPE of q and k read out of one q/k/v projection output, and SwiGLU of one gate/up output, on CUDA",
          "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    check_rope_qkv(cuda, dtype, 32, 8, 128, bound(dtype));  // Llama 3 8B
    check_rope_qkv(cuda, dtype, 5, 5, 64, bound(dtype));
    check_rope_qkv(cuda, dtype, 6, 2, 16, bound(dtype));
    for (int64_t I : {14336, 8192, 24}) check_swiglu_packed(cuda, dtype, I, bound(dtype));
  }
}

// SwiGLU's kernels on the [rows, runs of 256 vectors] grid (bench/bench_elementwise.cpp weighs it against the flat
// grid-stride loop the model takes) give the flat loop's bits, forward and backward, on gate / up read out of one
// packed output; rows whose vectors are not a multiple of 256 included. Outputs start as NaN.
TEST_CASE("SwiGLU's kernels on a rows grid give the bits of the flat loop, on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    const auto type = dtype == at::kFloat  ? qt::kernels::ElemType::Float32
                      : dtype == at::kHalf ? qt::kernels::ElemType::Float16
                                           : qt::kernels::ElemType::BFloat16;
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 14336}, {5, 24}, {300, 2056}}) {
      INFO(c10::toString(dtype) << " rows " << rows << " cols " << cols);
      const auto opt = at::TensorOptions().dtype(dtype).device(cuda);
      const at::Tensor gu = at::randn({rows, 2 * cols}, opt) * 3, dy = at::randn({rows, cols}, opt);
      cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
      std::array<at::Tensor, 2> out, dgu;
      for (int by_rows = 0; by_rows < 2; ++by_rows) {
        out[by_rows] = at::full({rows, cols}, NAN, opt);
        dgu[by_rows] = at::full({rows, 2 * cols}, NAN, opt);
        const char* g = static_cast<const char*>(gu.data_ptr());
        const int64_t half = cols * gu.element_size();
        qt::kernels::swiglu_forward_launch(g, g + half, out[by_rows].data_ptr(), rows, cols, 2 * cols, cols, type,
                                           stream, by_rows == 1);
        char* d = static_cast<char*>(dgu[by_rows].data_ptr());
        qt::kernels::swiglu_backward_launch(dy.data_ptr(), g, g + half, d, d + half, rows, cols, 2 * cols, cols, type,
                                            stream, by_rows == 1);
      }
      CHECK(out[0].isfinite().all().item<bool>());
      CHECK(dgu[0].isfinite().all().item<bool>());
      CHECK(qt::test::same_bits(out[1], out[0]));
      CHECK(qt::test::same_bits(dgu[1], dgu[0]));
      // and the flat loop is the op the model runs: swiglu_packed's forward
      CHECK(qt::test::same_bits(out[0], qt::swiglu_packed_values(gu)));
    }
  }
}

TEST_CASE("fused q / k norm and RoPE (Qwen3) read out of one q/k/v projection output, on CUDA, and from kept values",
          "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat})
    for (bool kept : {false, true}) {
      check_rope_qkv_norm(cuda, dtype, 32, 8, 128, bound(dtype), kept);  // Qwen3 8B
      check_rope_qkv_norm(cuda, dtype, 5, 5, 64, bound(dtype), kept);
      check_rope_qkv_norm(cuda, dtype, 6, 2, 256, bound(dtype), kept);
      check_rope_qkv_norm(cuda, dtype, 3, 1, 16, bound(dtype), kept);
    }
}

TEST_CASE("fused RMSNorm kernel equals the ATen reference on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t H : {2048, 3072, 4096, 8192, 40}) {
      INFO("dtype " << c10::toString(dtype) << " H " << H);
      const auto opt = at::TensorOptions().dtype(dtype).device(cuda);
      at::Tensor x0 = (at::randn({3, 37, H}, opt.dtype(at::kFloat)) * 3).to(dtype);
      at::Tensor w = (at::rand({H}, opt.dtype(at::kFloat)) + 0.5).to(dtype);
      at::Tensor dy = at::randn({3, 37, H}, opt);
      at::Tensor xr = x0.clone().requires_grad_(true);
      at::Tensor yr = qt::rms_norm_reference(xr, w, 1e-5);
      yr.backward(dy);
      qt::test::poison_allocator_cache(cuda);
      at::Tensor xf = x0.clone().requires_grad_(true);
      REQUIRE(qt::fused_ops_apply(xf));
      at::Tensor yf = qt::rms_norm_fused(xf, w, 1e-5);
      qt::test::poison_allocator_cache(cuda);
      yf.backward(dy);
      CHECK(yf.scalar_type() == dtype);
      CHECK(rel_err(yf, yr) < bound(dtype));
      CHECK(rel_err(xf.grad(), xr.grad()) < 2 * bound(dtype));
      // The gradient as the first columns of a wider GEMM output (q / k / v's [dx | dy B]), read in place.
      at::Tensor wide = at::randn({3, 37, H + 24}, opt);
      wide.narrow(-1, 0, H).copy_(dy);
      at::Tensor xs = x0.clone().requires_grad_(true);
      at::Tensor ys = qt::rms_norm_fused(xs, w, 1e-5);
      qt::test::poison_allocator_cache(cuda);
      ys.backward(wide.narrow(-1, 0, H));
      CHECK(rel_err(xs.grad(), xr.grad()) < 2 * bound(dtype));
    }
  }
}

// add_rms_norm_fused (the attention residual and the MLP's input norm) against the ops apart on `device`: x = h + a
// bit for bit, the norm as rms_norm_fused's (bit for bit: the same rounding) and within the dtype's bound of the
// reference; the gradients of h and a, each x's residual gradient plus the norm's, bit for bit those of the ops
// apart (autograd adding the two rounded gradients) and within bounds of the reference; dy also read as the first
// columns of a wider GEMM output; x's residual gradient absent (only the norm's).
void check_add_rms_norm(const at::Device& device) {
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t H : {4096, 3072, 40}) {
      INFO(device << " " << c10::toString(dtype) << " H " << H);
      const auto opt = at::TensorOptions().dtype(dtype).device(device);
      const at::Tensor h0 = (at::randn({3, 37, H}, opt.dtype(at::kFloat)) * 3).to(dtype);
      const at::Tensor a0 = at::randn({3, 37, H}, opt);
      const at::Tensor w = (at::rand({H}, opt.dtype(at::kFloat)) + 0.5).to(dtype);
      const at::Tensor dres = at::randn({3, 37, H}, opt), dy = at::randn({3, 37, H}, opt);
      for (int variant = 0; variant < 3; ++variant) {  // 0: both gradients, 1: dy strided, 2: no residual gradient
        INFO("variant " << variant);
        // The ops apart (the kernels' RMSNorm on CUDA) and the plain reference.
        at::Tensor hs = h0.clone().requires_grad_(true), as = a0.clone().requires_grad_(true);
        at::Tensor xs = hs + as;
        at::Tensor ys = qt::rms_norm_fused(xs, w, 1e-5);
        at::Tensor hr = h0.clone().requires_grad_(true), ar = a0.clone().requires_grad_(true);
        auto ref = qt::add_rms_norm_reference(hr, ar, w, 1e-5);
        at::Tensor wide = at::randn({3, 37, H + 24}, opt);
        wide.narrow(-1, 0, H).copy_(dy);
        const at::Tensor dyv = variant == 1 ? wide.narrow(-1, 0, H) : dy;
        if (variant == 2) {
          ys.backward(dyv);
          ref[1].backward(dyv);
        } else {
          torch::autograd::backward({xs, ys}, {dres, dyv});
          torch::autograd::backward({ref[0], ref[1]}, {dres, dyv});
        }
        if (device.is_cuda()) qt::test::poison_allocator_cache(device);
        at::Tensor hf = h0.clone().requires_grad_(true), af = a0.clone().requires_grad_(true);
        auto out = qt::add_rms_norm_fused(hf, af, w, 1e-5);
        if (device.is_cuda()) {
          REQUIRE(out[1].grad_fn());
          CHECK(out[1].grad_fn()->name().find("AddRmsNormFn") != std::string::npos);
          qt::test::poison_allocator_cache(device);
        }
        if (variant == 2) out[1].backward(dyv);
        else torch::autograd::backward({out[0], out[1]}, {dres, dyv});
        CHECK(at::equal(out[0], xs));
        CHECK(at::equal(out[1], ys));
        CHECK(rel_err(out[1], ref[1]) < bound(dtype));
        CHECK(at::equal(hf.grad(), hs.grad()));
        CHECK(at::equal(af.grad(), as.grad()));
        CHECK(rel_err(hf.grad(), hr.grad()) < 2 * bound(dtype));
        CHECK(hf.grad().abs().max().item<double>() > 0);
      }
    }
  }
}

TEST_CASE("the residual add and RMSNorm as one op equal the ops apart, off CUDA", "[fused_ops]") {
  check_add_rms_norm(at::Device(at::kCPU));
}

TEST_CASE("the residual add and RMSNorm in one kernel equal the ops apart bit for bit on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  check_add_rms_norm(at::Device(at::kCUDA, 0));
}

// The norms' output written into the first columns of a wider buffer (`spare` columns after each row: a LoRA group's
// concatenated input) against the contiguous output: the same values and input gradients bit for bit, the row stride
// H + spare.
void check_norm_spare(const at::Device& device) {
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    for (int64_t H : {4096, 40}) {
      for (int64_t spare : {48, 8}) {
        INFO(device << " " << c10::toString(dtype) << " H " << H << " spare " << spare);
        const auto opt = at::TensorOptions().dtype(dtype).device(device);
        const at::Tensor x0 = at::randn({2, 19, H}, opt), a0 = at::randn({2, 19, H}, opt);
        const at::Tensor w = (at::rand({H}, opt.dtype(at::kFloat)) + 0.5).to(dtype);
        const at::Tensor dy = at::randn({2, 19, H}, opt);
        at::Tensor xa = x0.clone().requires_grad_(true), xb = x0.clone().requires_grad_(true);
        const at::Tensor ya = qt::rms_norm_fused(xa, w, 1e-5);
        const at::Tensor yb = qt::rms_norm_fused(xb, w, 1e-5, spare);
        CHECK(yb.stride(1) == H + spare);
        CHECK(at::equal(ya, yb));
        ya.backward(dy);
        yb.backward(dy);
        CHECK(at::equal(xa.grad(), xb.grad()));
        at::Tensor ha = x0.clone().requires_grad_(true), hb = x0.clone().requires_grad_(true);
        const auto oa = qt::add_rms_norm_fused(ha, a0, w, 1e-5);
        const auto ob = qt::add_rms_norm_fused(hb, a0, w, 1e-5, spare);
        CHECK(ob[1].stride(1) == H + spare);
        CHECK(at::equal(oa[0], ob[0]));
        CHECK(at::equal(oa[1], ob[1]));
        torch::autograd::backward({oa[0], oa[1]}, {dy, dy * 2});
        torch::autograd::backward({ob[0], ob[1]}, {dy, dy * 2});
        CHECK(at::equal(ha.grad(), hb.grad()));
        CHECK(ha.grad().abs().max().item<double>() > 0);
      }
    }
  }
}

TEST_CASE("the norms' output in the first columns of a wider buffer equals the contiguous one", "[fused_ops]") {
  check_norm_spare(at::Device(at::kCPU));
}

TEST_CASE("on CUDA the norms' output in the first columns of a wider buffer equals the contiguous one",
          "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  check_norm_spare(at::Device(at::kCUDA, 0));
}

TEST_CASE("copy_rows into the first columns of a wider matrix equals copy_, on CUDA and off", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  for (const at::Device device : {at::Device(at::kCPU), at::Device(at::kCUDA, 0)}) {
    for (auto dtype : {at::kBFloat16, at::kFloat}) {
      for (int64_t cols : {4096, 8, 24}) {
        INFO(device << " " << c10::toString(dtype) << " cols " << cols);
        const auto opt = at::TensorOptions().dtype(dtype).device(device);
        const at::Tensor src = at::randn({37, cols}, opt);
        at::Tensor wide = at::full({37, cols + 16}, std::numeric_limits<float>::quiet_NaN(), opt);
        qt::copy_rows(wide.narrow(1, 0, cols), src);
        CHECK(at::equal(wide.narrow(1, 0, cols), src));
        CHECK(wide.narrow(1, cols, 16).isnan().all().item<bool>());  // the columns beyond untouched
        // ... and out of a wider one into a contiguous tensor
        at::Tensor back = at::full({37, cols}, std::numeric_limits<float>::quiet_NaN(), opt);
        qt::copy_rows(back, wide.narrow(1, 0, cols));
        CHECK(at::equal(back, src));
      }
    }
  }
}

// scaled_copies on `device` against the reference applied to a copy: the LoRA factors' layout (As into the rows of a
// stacked matrix, scaled Bs into diagonal blocks of a wider one) for a few hundred linears of widths up to the 8B
// shape's, sources with strided rows, scales 1, 2 and -0.5; the destinations poisoned, the space between the blocks
// left as it was.
void check_scaled_copies(const at::Device& device) {
  at::manual_seed(11);
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
    INFO(device << " " << c10::toString(dt));
    const auto opt = at::TensorOptions().dtype(dt).device(device);
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
    std::vector<at::Tensor> outs;
    std::vector<qt::ScaledCopy> copies;
    const int64_t widths[] = {4096, 1024, 14336, 24, 8};
    for (int i = 0; i < 120; ++i) {
      const int64_t in = widths[i % 5], out = widths[(i + 2) % 5], r = i % 7 == 0 ? 1 : 16;
      at::Tensor a = at::full({2 * r, in}, std::numeric_limits<float>::quiet_NaN(), opt);
      at::Tensor bd = at::full({out + 8, 2 * r}, std::numeric_limits<float>::quiet_NaN(), opt);
      const at::Tensor A = at::randn({r, in}, f32);
      const at::Tensor B = at::randn({out, r + 3}, f32).narrow(1, 0, r);  // rows r + 3 apart
      const double scale = i % 3 == 0 ? 1.0 : i % 3 == 1 ? 2.0 : -0.5;
      copies.push_back({a.narrow(0, r, r), A, 1.0});
      copies.push_back({bd.narrow(0, 8, out).narrow(1, r, r), B, scale});
      outs.push_back(a);
      outs.push_back(bd);
    }
    std::vector<at::Tensor> want;
    std::vector<qt::ScaledCopy> ref;
    for (const at::Tensor& t : outs) want.push_back(t.clone());
    for (size_t i = 0; i < copies.size(); ++i) {
      const at::Tensor& w = want[i];
      ref.push_back({i % 2 == 0 ? w.narrow(0, copies[i].dst.size(0), copies[i].dst.size(0))
                                : w.narrow(0, 8, copies[i].dst.size(0)).narrow(1, copies[i].dst.size(1), copies[i].dst.size(1)),
                     copies[i].src, copies[i].scale});
    }
    qt::scaled_copies(copies);
    qt::scaled_copies_reference(ref);
    for (size_t i = 0; i < outs.size(); ++i) {
      INFO("matrix " << i);
      const at::Tensor got = outs[i].cpu().to(at::kFloat), exp = want[i].cpu().to(at::kFloat);
      CHECK(at::equal(got.isnan(), exp.isnan()));  // the same elements written, the rest still poisoned
      CHECK(at::equal(at::nan_to_num(got, 0.0), at::nan_to_num(exp, 0.0)));
      CHECK(got.isnan().logical_not().sum().item<int64_t>() > 0);
    }
    // the reference itself: a scaled cast copy
    CHECK(at::equal(want[3].narrow(0, 8, copies[3].dst.size(0)).narrow(1, copies[3].dst.size(1), copies[3].dst.size(1)),
                    (copies[3].src * copies[3].scale).to(dt)));
  }
}

TEST_CASE("to_device_async copies host tensors to CUDA without a sync, the values of .to(device)", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  const at::Tensor ids = at::randint(0, 1000, {2, 37}, at::kLong);
  const at::Tensor strided = at::randn({8, 6}).t();  // not contiguous
  // Work queued ahead, as the step before would have queued it; a sync would wait for it and raise here.
  at::Tensor busy = at::randn({4096, 4096}, at::TensorOptions().device(cuda));
  for (int i = 0; i < 8; ++i) busy = at::mm(busy, busy).div_(64.0);
  at::Tensor a, b;
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  try {
    a = qt::to_device_async(ids, cuda);
    b = qt::to_device_async(strided, cuda);
  } catch (...) {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
    throw;
  }
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  CHECK(a.is_cuda());
  CHECK(at::equal(a.cpu(), ids));
  CHECK(at::equal(b.cpu(), strided));
  CHECK(qt::to_device_async(ids, at::kCPU).is_same(ids));  // already there
}

TEST_CASE("scaled_copies of fp32 blocks into strided blocks equals the reference, off CUDA", "[fused_ops]") {
  check_scaled_copies(at::Device(at::kCPU));
}

TEST_CASE("scaled_copies' one launch equals the reference on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  check_scaled_copies(at::Device(at::kCUDA, 0));
}

// LoRA dropout's counter-based masks (lib/kernels/dropout_hash.h): each draw keeps 1 - p of the elements, draws of
// different keys are independent, and so are neighbouring elements within a draw (the 4 of one hash word, and the
// rows); the references apply exactly that mask.
TEST_CASE("LoRA dropout's counter-based masks keep 1 - p, independently across keys and elements; the references "
          "apply them", "[fused_ops]") {
  const int64_t rows = 96, cols = 4104, n = rows * cols;  // (cols not a multiple of 4: words straddle rows)
  for (double p : {0.05, 0.1, 0.5}) {
    INFO("p " << p);
    const qt::DropoutMask m{0x1234567ull, p}, other{0x1234568ull, p};
    const at::Tensor a = qt::lora_dropout_mask(rows, cols, m).to(at::kDouble);
    const at::Tensor b = qt::lora_dropout_mask(rows, cols, other).to(at::kDouble);
    const double sigma = std::sqrt(p * (1 - p) / static_cast<double>(n));
    CHECK(std::abs(a.mean().item<double>() - (1 - p)) < 5 * sigma);
    CHECK(std::abs(b.mean().item<double>() - (1 - p)) < 5 * sigma);
    // Independence: P(both kept) = (1 - p)^2 for another key, the next element, the element a row below.
    const double both = (1 - p) * (1 - p), sigma2 = std::sqrt(both * (1 - both) / static_cast<double>(n));
    CHECK(std::abs((a * b).mean().item<double>() - both) < 5 * sigma2);
    const at::Tensor flat = a.reshape({-1});
    CHECK(std::abs((flat.narrow(0, 0, n - 1) * flat.narrow(0, 1, n - 1)).mean().item<double>() - both) < 5 * sigma2);
    CHECK(std::abs((a.narrow(0, 0, rows - 1) * a.narrow(0, 1, rows - 1)).mean().item<double>() - both) < 5 * sigma2);
    // The same key, the same mask.
    CHECK(at::equal(qt::lora_dropout_mask(rows, cols, m), qt::lora_dropout_mask(rows, cols, m)));
  }
  // The references: kept elements scaled by 1 / (1 - p), the others zero; the rank-r term added under the mask.
  const qt::DropoutMask m{42, 0.25};
  const at::Tensor x = at::randn({33, 64}), mask = qt::lora_dropout_mask(33, 64, m);
  const at::Tensor y = qt::lora_dropout_apply_reference(x, m);
  CHECK(at::equal(y.masked_select(mask.logical_not()), at::zeros({mask.logical_not().sum().item<int64_t>()})));
  CHECK(at::allclose(y.masked_select(mask), x.masked_select(mask) / 0.75, 1e-6, 0));
  CHECK(at::equal(qt::lora_dropout_apply(x, m), y));  // (off CUDA the reference runs)
  const at::Tensor g = at::randn({33, 5}), a = at::randn({5, 64}), dx0 = at::randn({33, 64});
  at::Tensor dx = dx0.clone();
  qt::lora_dropout_rank_update(dx, g, a, m);
  CHECK(at::allclose(dx, dx0 + at::mm(g, a) * mask.to(at::kFloat) / 0.75, 1e-5, 1e-5));
}

// The kernels against their references on CUDA: the same mask bit for bit (apply is exact; the rank update's fp32
// sums round once), rows strided (the first columns of a wider tensor), widths of a block's linears and odd ones,
// ranks below, at and above the kernel's chunk of 16; outputs poisoned through the caching allocator.
TEST_CASE("LoRA dropout's kernels equal their references on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t cols : {4096, 14336, 8, 264}) {
      for (int64_t rows : {1, 70, 129}) {
        INFO("dtype " << c10::toString(dtype) << " rows " << rows << " cols " << cols);
        const auto opt = at::TensorOptions().dtype(dtype).device(cuda);
        const qt::DropoutMask m{0x9E3779B9ull * static_cast<uint64_t>(rows + cols), 0.1};
        const at::Tensor wide = at::randn({rows, cols + 24}, opt), x = wide.narrow(1, 0, cols);
        REQUIRE(qt::lora_dropout_kernels_take(x));
        qt::test::poison_allocator_cache(cuda);
        const at::Tensor y = qt::lora_dropout_apply(x, m);
        CHECK(y.is_contiguous());
        CHECK(at::equal(y, qt::lora_dropout_apply_reference(x, m)));
        for (int64_t r : {1, 16, 33}) {
          INFO("rank " << r);
          const at::Tensor g = at::randn({rows, r + 3}, opt).narrow(1, 3, r), a = at::randn({r, cols}, opt);
          at::Tensor dxw = at::randn({rows, cols + 8}, opt);
          const at::Tensor before = dxw.clone();
          at::Tensor dx = dxw.narrow(1, 0, cols), want = dx.clone();
          qt::lora_dropout_rank_update(dx, g, a, m);
          qt::lora_dropout_rank_update_reference(want, g, a, m);
          CHECK(rel_err(dx, want) < bound(dtype));
          CHECK(at::equal(dxw.narrow(1, cols, 8), before.narrow(1, cols, 8)));  // the columns beyond untouched
          // Where the mask drops, dx is as it was; elsewhere it moved (by how much depends on the draw of g and a:
          // a rank-1 term over one row can be small next to dx, but not zero).
          const at::Tensor dropped = qt::lora_dropout_mask(rows, cols, m).logical_not().to(cuda);
          CHECK(at::equal(dx.masked_select(dropped), before.narrow(1, 0, cols).masked_select(dropped)));
          CHECK(dx.ne(before.narrow(1, 0, cols)).logical_and(dropped.logical_not()).any().item<bool>());
        }
      }
    }
  }
}

TEST_CASE("fused SwiGLU kernel equals the ATen reference on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t I : {8192, 14336, 24}) {
      INFO("dtype " << c10::toString(dtype) << " I " << I);
      const auto opt = at::TensorOptions().dtype(dtype).device(cuda);
      at::Tensor g0 = (at::randn({2, 53, I}, opt.dtype(at::kFloat)) * 2).to(dtype);
      at::Tensor u0 = at::randn({2, 53, I}, opt);
      at::Tensor dy = at::randn({2, 53, I}, opt);
      at::Tensor gr = g0.clone().requires_grad_(true), ur = u0.clone().requires_grad_(true);
      qt::swiglu_reference(gr, ur).backward(dy);
      at::Tensor outr = qt::swiglu_reference(g0, u0);
      qt::test::poison_allocator_cache(cuda);
      at::Tensor gf = g0.clone().requires_grad_(true), uf = u0.clone().requires_grad_(true);
      at::Tensor outf = qt::swiglu_fused(gf, uf);
      qt::test::poison_allocator_cache(cuda);
      outf.backward(dy);
      CHECK(rel_err(outf, outr) < bound(dtype));
      CHECK(rel_err(gf.grad(), gr.grad()) < bound(dtype));
      CHECK(rel_err(uf.grad(), ur.grad()) < bound(dtype));
    }
  }
}

TEST_CASE("fused RoPE kernel equals the ATen reference on CUDA", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device cuda(at::kCUDA, 0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t D : {64, 128, 16}) {
      INFO("dtype " << c10::toString(dtype) << " D " << D);
      const auto opt = at::TensorOptions().dtype(dtype).device(cuda);
      const int64_t B = 2, S = 45, H = 5;
      at::Tensor x0 = at::randn({B, S, H, D}, opt);
      // cos / sin of real rotations at random positions, as rope_cos_sin makes them.
      at::Tensor angle = at::rand({B, S, D / 2}, opt.dtype(at::kFloat)) * 100;
      angle = at::cat({angle, angle}, -1);
      at::Tensor cos = angle.cos().to(dtype), sin = angle.sin().to(dtype);
      at::Tensor dy = at::randn({B, S, H, D}, opt);
      at::Tensor xr = x0.clone().requires_grad_(true);
      at::Tensor yr = qt::rope_reference(xr, cos, sin);
      yr.backward(dy);
      qt::test::poison_allocator_cache(cuda);
      at::Tensor xf = x0.clone().requires_grad_(true);
      at::Tensor yf = qt::rope_fused(xf, cos, sin);
      qt::test::poison_allocator_cache(cuda);
      yf.backward(dy);
      CHECK(yf.is_contiguous());
      CHECK(rel_err(yf, yr) < bound(dtype));
      CHECK(rel_err(xf.grad(), xr.grad()) < bound(dtype));
    }
  }
}

// LoRA's rank-r GEMM kernels (lora_project, lora_grads) against fp32 products of the same 16-bit values: ranks 1 to
// 128 (every tile count the kernels take up to 8 x 16), widths not a multiple of a stage, token counts not a multiple
// of a tile, operands and outputs the columns of wider matrices, outputs poisoned, each cluster size (K split for the
// projection, the tokens for the gradients; ranks left without work where the extent is short); and the same bits
// when run again.
TEST_CASE("LoRA's rank-r GEMM kernels against fp32 products of their operands", "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  const at::Device dev(at::kCUDA, 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const double rel = dtype == at::kBFloat16 ? 8e-3 : 2e-3;  // the output's rounding (x a^T in 16 bits), and some
    const auto opt = at::TensorOptions().dtype(dtype).device(dev);
    struct P {
      int64_t M, K, r;
    };
    for (const P& p : {P{4096, 4096, 48}, P{4096, 14336, 16}, P{333, 1000, 8}, P{77, 4104, 72}, P{129, 264, 128},
                       P{5, 8, 1}, P{200, 136, 33}, P{64, 128, 120}, P{300, 72, 16}}) {
      // x: the columns 8.. of a wider matrix; out: columns 5.. of a wider one, poisoned
      const at::Tensor xw = at::randn({p.M, p.K + 24}, opt), x = xw.narrow(1, 8, p.K);
      const at::Tensor a = at::randn({p.r, p.K}, opt) * 0.05;
      const at::Tensor ref = at::mm(x.to(at::kFloat), a.to(at::kFloat).t());
      const at::Tensor tol = ref.abs() * rel + 1e-4 * std::sqrt(static_cast<double>(p.K));
      CHECK(ref.abs().max().item<double>() > 1e-3);
      for (int cluster : {0, 1, 2, 4, 8}) {  // K split over 1 to 8 CTAs (more than K's stages at K 72 and 8)
        INFO(c10::toString(dtype) << " project M " << p.M << " K " << p.K << " r " << p.r << " cluster " << cluster);
        at::Tensor ow = at::full({p.M, p.r + 11}, nan, opt);
        const at::Tensor out = ow.narrow(1, 5, p.r);
        CHECK(qt::lora_project(out, x, a, true, cluster));
        CHECK((out.to(at::kFloat) - ref).abs().le(tol).all().item<bool>());
        CHECK(ow.narrow(1, 0, 5).isnan().all().item<bool>());  // nothing written beside it
        CHECK(ow.narrow(1, 5 + p.r, 6).isnan().all().item<bool>());
        at::Tensor again = at::full({p.M, p.r}, nan, opt);
        qt::lora_project(again, x, a, true, cluster);
        CHECK(at::equal(again, out));
      }
      // the switch off: the reference
      at::Tensor off = at::full({p.M, p.r}, nan, opt);
      CHECK_FALSE(qt::lora_project(off, x, a, false));
      at::Tensor expect = at::empty({p.M, p.r}, opt);
      qt::lora_project_reference(expect, x, a);
      CHECK(at::equal(off, expect));
    }
    struct G {
      int64_t M;
      std::vector<std::pair<int64_t, int64_t>> jobs;  // (r, N); the first not transposed (an A gradient)
    };
    for (const G& c : {G{4096, {{48, 4096}, {16, 4096}, {16, 1024}, {16, 1024}}}, G{4096, {{16, 14336}, {16, 4096}}},
                       G{333, {{8, 1000}, {128, 136}}}, G{64, {{64, 264}}}, G{1, {{24, 40}, {8, 8}}},
                       G{1000, {{120, 4104}, {32, 520}, {8, 16}}}}) {
      for (int cluster : {0, 1, 2, 4, 8}) {
        INFO(c10::toString(dtype) << " grads M " << c.M << " jobs " << c.jobs.size() << " cluster " << cluster);
        std::vector<qt::LoraGrad> jobs;
        std::vector<at::Tensor> refs, bounds;
        for (size_t i = 0; i < c.jobs.size(); ++i) {
          const auto [r, n] = c.jobs[i];
          // g: columns 8.. of a wider matrix (t inside [x | t | 0]); x: columns 16.. of one (a member's dy)
          const at::Tensor g = at::randn({c.M, r + 16}, opt).narrow(1, 8, r);
          const at::Tensor x = at::randn({c.M, n + 24}, opt).narrow(1, 16, n);
          const double alpha = i == 0 ? 1.0 : i == 1 ? 2.0 : -0.5;
          const bool transposed = i > 0;
          jobs.push_back({g, x, alpha, transposed});
          at::Tensor ref = at::mm(g.to(at::kFloat).t(), x.to(at::kFloat)) * alpha;
          at::Tensor mag = at::mm(g.to(at::kFloat).abs().t(), x.to(at::kFloat).abs()) * std::abs(alpha);
          refs.push_back(transposed ? ref.t() : ref);
          bounds.push_back(transposed ? mag.t() : mag);
        }
        bool ran = false;
        const std::vector<at::Tensor> got = qt::lora_grads(jobs, true, cluster, &ran);
        CHECK(ran);
        REQUIRE(got.size() == refs.size());
        for (size_t i = 0; i < got.size(); ++i) {
          INFO("job " << i);
          CHECK(got[i].scalar_type() == at::kFloat);
          REQUIRE(got[i].sizes() == refs[i].sizes());
          // fp32 sums of exact products in another order
          CHECK((got[i] - refs[i]).abs().le(bounds[i] * 1e-4 + 1e-30).all().item<bool>());
        }
        const std::vector<at::Tensor> again = qt::lora_grads(jobs, true, cluster);
        for (size_t i = 0; i < got.size(); ++i) CHECK(at::equal(again[i], got[i]));
      }
    }
    // A rank the kernel does not take (r % 8 != 0): every job by the reference
    const at::Tensor g = at::randn({100, 4}, opt), x = at::randn({100, 64}, opt);
    bool ran = true;
    const std::vector<at::Tensor> got = qt::lora_grads({{g, x, 1.0, false}, {g, x, 3.0, true}}, true, 0, &ran);
    CHECK_FALSE(ran);
    const std::vector<at::Tensor> ref = qt::lora_grads_reference({{g, x, 1.0, false}, {g, x, 3.0, true}});
    CHECK(at::equal(got[0], ref[0]));
    CHECK(at::equal(got[1], ref[1]));
  }
}

// The tuned GEMM (lib/kernels/tuned_gemm.h) in the trainer's layouts: a weight's transpose view (the forward pass),
// a row-major right operand (the input gradient), the output as the first columns of a wider buffer, the left
// operand as the first columns of one (the widened inputs), and accumulating onto the output (o_proj's and
// down_proj's base GEMM onto their rank-r term). Each case: out (=|+=) a b.
struct GemmCase {
  const char* what;
  int64_t M, N, K;
  bool b_transposed;   // b = w.t() for a stored [N, K] w
  int64_t out_extra;   // out = the first N columns of [M, N + out_extra]
  int64_t a_extra;     // a = the first K columns of [M, K + a_extra]
  bool accumulate;
};
const GemmCase kGemmCases[] = {
    {"forward, a weight's transpose", 320, 384, 256, true, 0, 0, false},
    {"forward, the widened input's first columns", 256, 320, 192, true, 0, 64, false},
    {"input gradient, into a wider buffer's first columns", 192, 256, 384, false, 128, 0, false},
    {"accumulating onto the output", 256, 192, 320, true, 0, 0, true},
    {"accumulating, row-major right operand", 128, 256, 192, false, 0, 0, true},
};

struct GemmOperands {
  at::Tensor a, b, out, c0;
};
GemmOperands gemm_operands(const GemmCase& c, const at::TensorOptions& opt) {
  GemmOperands o;
  o.a = at::randn({c.M, c.K + c.a_extra}, opt).narrow(1, 0, c.K);
  o.b = c.b_transposed ? at::randn({c.N, c.K}, opt).t() : at::randn({c.K, c.N}, opt);
  o.out = at::empty({c.M, c.N + c.out_extra}, opt).narrow(1, 0, c.N);
  o.c0 = at::randn({c.M, c.N}, opt);
  return o;
}

TEST_CASE("the tuned GEMM on the CPU is ATen's GEMM, bit for bit, in every layout the trainer uses", "[fused_ops]") {
  at::manual_seed(11);
  for (const GemmCase& c : kGemmCases) {
    INFO(c.what);
    const GemmOperands o = gemm_operands(c, at::TensorOptions().dtype(at::kFloat));
    const int64_t aten_before = qt::kernels::gemm_tuner_counts().aten_calls;
    o.out.copy_(c.accumulate ? o.c0 : at::full_like(o.c0, std::numeric_limits<float>::quiet_NaN()));
    qt::kernels::gemm_out(o.out, o.a, o.b, c.accumulate);
    at::Tensor ref = c.accumulate ? o.c0.clone() : at::empty_like(o.c0);
    if (c.accumulate)
      ref.addmm_(o.a, o.b);
    else
      at::mm_out(ref, o.a, o.b);
    CHECK(at::equal(o.out, ref));
    CHECK(qt::kernels::gemm_tuner_counts().aten_calls == aten_before + 1);
  }
  const at::Tensor a = at::randn({8, 4}), b = at::randn({5, 3});
  bool threw = false;
  try {
    (void)qt::kernels::gemm(a, b);
  } catch (const qt::Error& e) {
    threw = std::string(e.what()).find("shapes do not chain") != std::string::npos;
  }
  CHECK(threw);
  CHECK(at::equal(qt::kernels::gemm(a, b.narrow(0, 0, 4)), at::mm(a, b.narrow(0, 0, 4))));
}

// On CUDA in bf16: within bf16's rounding of the fp32 product; the same bits at every later call of a problem (its
// algorithm is kept) and with other values; each new problem timed once over candidates of one output (the tuner
// keeps only those with the first candidate's bits); tuning off gives ATen's path.
TEST_CASE("the tuned GEMM on CUDA: bf16 bounds, one algorithm a problem, the same bits every call",
          "[fused_ops][gpu]") {
  REQUIRE(at::hasCUDA());
  at::manual_seed(12);
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  qt::kernels::set_gemm_tuning(true);
  for (const GemmCase& c : kGemmCases) {
    INFO(c.what);
    const GemmOperands o = gemm_operands(c, opt);
    const auto before = qt::kernels::gemm_tuner_counts();
    auto run = [&] {
      o.out.copy_(c.accumulate ? o.c0 : at::full_like(o.c0, std::numeric_limits<float>::quiet_NaN()));
      qt::kernels::gemm_out(o.out, o.a, o.b, c.accumulate);
      return o.out.clone();
    };
    const at::Tensor first = run();
    const auto after = qt::kernels::gemm_tuner_counts();
    CHECK(after.problems_tuned == before.problems_tuned + 1);
    CHECK(after.candidates_timed >= before.candidates_timed + 1);
    CHECK(after.lt_calls == before.lt_calls + 1);
    at::Tensor ref = at::mm(o.a.to(at::kFloat), o.b.to(at::kFloat));
    if (c.accumulate) ref.add_(o.c0.to(at::kFloat));
    const double scale = ref.abs().max().item<double>();
    CHECK(first.isfinite().all().item<bool>());
    CHECK((first.to(at::kFloat) - ref).abs().max().item<double>() <= 1e-2 * scale);
    // kept: the same bits, no new timing
    for (int i = 0; i < 3; ++i) CHECK(at::equal(run(), first));
    CHECK(qt::kernels::gemm_tuner_counts().problems_tuned == after.problems_tuned);
    CHECK(qt::kernels::gemm_tuner_counts().lt_calls == after.lt_calls + 3);
    // other values of the same problem: its algorithm, within bounds
    o.a.copy_(at::randn(o.a.sizes(), opt));
    const at::Tensor other = run();
    at::Tensor ref2 = at::mm(o.a.to(at::kFloat), o.b.to(at::kFloat));
    if (c.accumulate) ref2.add_(o.c0.to(at::kFloat));
    CHECK((other.to(at::kFloat) - ref2).abs().max().item<double>() <= 1e-2 * ref2.abs().max().item<double>());
    CHECK(qt::kernels::gemm_tuner_counts().problems_tuned == after.problems_tuned);
    // tuning off: ATen's own call
    qt::kernels::set_gemm_tuning(false);
    const int64_t aten_before = qt::kernels::gemm_tuner_counts().aten_calls;
    const at::Tensor off = run();
    at::Tensor aten = c.accumulate ? o.c0.clone() : at::empty_like(o.c0);
    if (c.accumulate)
      aten.addmm_(o.a, o.b);
    else
      at::mm_out(aten, o.a, o.b);
    CHECK(at::equal(off, aten));
    CHECK(qt::kernels::gemm_tuner_counts().aten_calls == aten_before + 1);
    qt::kernels::set_gemm_tuning(true);
  }
  // A layout cuBLASLt cannot take here (a row stride that is no 16-byte multiple): ATen's path
  const at::Tensor a = at::randn({128, 100 + 3}, opt).narrow(1, 0, 100), b = at::randn({100, 128}, opt);
  const int64_t aten_before = qt::kernels::gemm_tuner_counts().aten_calls;
  CHECK(at::equal(qt::kernels::gemm(a, b), at::mm(a, b)));
  CHECK(qt::kernels::gemm_tuner_counts().aten_calls == aten_before + 1);
}
