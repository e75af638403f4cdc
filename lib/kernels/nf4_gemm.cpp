// Tensor-level NF4 GEMM: checks, the fused Hopper kernel (sm90/nf4_gemm_sm90.cu) and the plain-ATen reference.
#include "lib/kernels/nf4_gemm.h"

#include <ATen/ATen.h>

#include <string>

#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include "lib/kernels/sm90/nf4_gemm_sm90.h"
#endif

namespace qt::kernels {
namespace {

int64_t tail_columns(const at::Tensor& tail) { return tail.defined() ? tail.size(1) : 0; }

void check_operands(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                    const at::Tensor& tail) {
  QT_CHECK(x.dim() == 2 && out.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1, ErrorKind::Internal,
           "nf4_linear_into: x and out must be 2-D with unit column stride");
  QT_CHECK(out.size(0) == x.size(0) && out.scalar_type() == x.scalar_type() && out.device() == x.device(),
           ErrorKind::Internal, "nf4_linear_into: out must have x's rows, dtype and device");
  QT_CHECK(!ws.empty(), ErrorKind::Internal, "nf4_linear_into: no weight");
  const int64_t k = x.size(1) - tail_columns(tail);
  int64_t cols = 0;
  for (const Nf4Data* w : ws) {
    check_nf4_data(*w);
    QT_CHECK(k > 0 && w->numel % k == 0, ErrorKind::Internal,
             "nf4_linear_into: a weight of " + std::to_string(w->numel) + " elements is not [rows, " +
                 std::to_string(k) + "]");
    cols += w->numel / k;
  }
  QT_CHECK(cols <= out.size(1), ErrorKind::Internal,
           "nf4_linear_into: the weights' " + std::to_string(cols) + " rows exceed out's " +
               std::to_string(out.size(1)) + " columns");
  QT_CHECK(!tail.defined() || (tail.dim() == 2 && tail.size(0) == cols && tail.scalar_type() == x.scalar_type() &&
                               tail.device() == x.device()),
           ErrorKind::Internal, "nf4_linear_into: the tail must be [" + std::to_string(cols) + ", k_tail] of x's dtype");
}

}  // namespace

std::string nf4_gemm_unfit(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                           const at::Tensor& tail) {
#ifndef QT_WITH_CUDA
  (void)x, (void)ws, (void)out, (void)tail;
  return "this build has no CUDA kernels";
#else
  if (!x.is_cuda()) return "x is not on a CUDA device";
  if (x.scalar_type() != at::kBFloat16 || (out.defined() && out.scalar_type() != at::kBFloat16))
    return "x and out must be bf16";
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
  if (prop->major != 9 || prop->minor != 0) return "the kernel is built for compute capability 9.0 (sm_90a)";
  if (ws.empty() || ws.size() > static_cast<size_t>(sm90::kNf4GemmMaxWeights)) return "1..4 weights a call";
  const int64_t k = x.dim() == 2 ? x.size(1) - tail_columns(tail) : 0;
  if (k <= 0 || k % sm90::kNf4GemmTileK != 0) return "K must be a positive multiple of 64";
  if (tail.defined() &&
      (tail.scalar_type() != at::kBFloat16 || tail.dim() != 2 || tail.size(1) % 8 != 0 || tail.stride(1) != 1 ||
       tail.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(tail.data_ptr()) % 16 != 0 || !tail.is_cuda()))
    return "the tail must be bf16 with a multiple of 8 columns and 16-byte aligned rows";
  if (k > (int64_t{1} << 30) || x.size(0) > (int64_t{1} << 30)) return "x too large";
  if (x.stride(1) != 1 || x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0)
    return "x's rows must be 16-byte aligned";
  if (out.defined() && (out.dim() != 2 || out.stride(1) != 1 || out.stride(0) % 2 != 0 ||
                        reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 != 0))
    return "out must have unit column stride, an even row stride and 4-byte alignment";
  for (const Nf4Data* w : ws) {
    if (w->blocksize != sm90::kNf4GemmTileK) return "blocksize must be 64";
    if (w->numel % k != 0 || (w->numel / k) % sm90::kNf4GemmTileN != 0) return "each weight's rows a multiple of 128";
    if (reinterpret_cast<uintptr_t>(w->packed.data_ptr()) % 16 != 0) return "packed codes must be 16-byte aligned";
    if (!w->packed.is_cuda() || w->packed.device() != x.device()) return "weights on another device";
  }
  return "";
#endif
}

int nf4_gemm_variant(const std::string& text) {
  for (int v : {0, 1, 5, 7, 8, 9, 11, 12, 13, 14, 15})
    if (text == std::to_string(v)) return v;
  fail(ErrorKind::Usage,
       "QT_NF4_GEMM_VARIANT='" + text +
           "': expected one of the fused NF4 GEMM's variants that compute right values, "
           "0, 1, 5, 7, 8, 9, 11, 12, 13, 14 or 15");
}

void nf4_linear_ref_into(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                         bool accumulate, const at::Tensor& tail) {
  check_operands(x, ws, out, tail);
  const int64_t k = x.size(1) - tail_columns(tail);
  const at::Tensor xk = x.narrow(1, 0, k);
  int64_t c = 0;
  for (const Nf4Data* w : ws) {
    const int64_t rows = w->numel / k;
    at::Tensor wt = at::empty({rows, k}, x.options());
    nf4_dequant_into(*w, wt);
    at::Tensor dst = out.narrow(1, c, rows);
    if (accumulate) {
      dst.addmm_(xk, wt.t());
    } else {
      at::mm_out(dst, xk, wt.t());
    }
    c += rows;
  }
  if (tail.defined()) out.narrow(1, 0, c).addmm_(x.narrow(1, k, tail.size(1)), tail.t());
}

void nf4_linear_into(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                     bool accumulate, const at::Tensor& tail, int variant) {
  check_operands(x, ws, out, tail);
  if (!nf4_gemm_unfit(x, ws, out, tail).empty()) {
    nf4_linear_ref_into(x, ws, out, accumulate, tail);
    return;
  }
#ifndef QT_WITH_CUDA
  (void)variant;
#else
  sm90::Nf4GemmArgs args;
  args.x = x.data_ptr();
  args.ldx = x.stride(0);
  args.y = out.data_ptr();
  args.ldy = out.stride(0);
  args.m = static_cast<int32_t>(x.size(0));
  args.k = static_cast<int32_t>(x.size(1) - tail_columns(tail));
  if (tail.defined()) {
    args.tail = tail.data_ptr();
    args.ld_tail = tail.stride(0);
    args.k_tail = static_cast<int32_t>(tail.size(1));
  }
  args.accumulate = accumulate;
  args.variant = variant;
  args.n_weights = static_cast<int32_t>(ws.size());
  for (size_t j = 0; j < ws.size(); ++j) {
    const Nf4Data& d = *ws[j];
    sm90::Nf4GemmWeight& w = args.w[j];
    w.packed = d.packed.data_ptr<uint8_t>();
    w.absmax_q = d.absmax_q.data_ptr<uint8_t>();
    w.nested_absmax = d.nested_absmax.data_ptr<float>();
    w.nested_map = d.nested_map.data_ptr<float>();
    w.quant_map = d.quant_map.data_ptr<float>();
    w.offset = d.offset;
    w.rows = static_cast<int32_t>(d.numel / args.k);
  }
  const int err = sm90::nf4_gemm_sm90_launch(args, at::cuda::getCurrentCUDAStream());
  if (err != 0)
    fail(ErrorKind::Device,
         std::string("nf4_linear_into: kernel launch: ") + cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
}

}  // namespace qt::kernels
