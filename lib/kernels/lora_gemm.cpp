// The tensor-level API of LoRA's rank-r GEMM kernels (fused_ops.h: lora_project, lora_grads) and their references.
#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/lora_gemm.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace qt {
namespace {

#ifdef QT_WITH_CUDA
// Whether the kernels were built for t's device (asked once a device).
bool built_for(const at::Tensor& t) {
  static std::atomic<int8_t> known[64] = {};  // 0 unknown, 1 yes, -1 no
  const int d = t.get_device();
  if (d < 0 || d >= 64) return false;
  int8_t k = known[d].load();
  if (k == 0) {
    k = kernels::lora_gemm_kernels_built(d) ? 1 : -1;
    known[d].store(k);
  }
  return k == 1;
}

// The row stride of a 2-D fp16 / bf16 CUDA tensor whose rows are contiguous, 16-byte aligned and a multiple of 8
// elements apart, else 0.
int64_t kernel_ld(const at::Tensor& t) {
  if (!t.is_cuda() || t.dim() != 2 || (t.scalar_type() != at::kBFloat16 && t.scalar_type() != at::kHalf)) return 0;
  if (t.size(1) > 1 && t.stride(1) != 1) return 0;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return 0;
  const int64_t ld = t.size(0) <= 1 ? (t.size(1) + 7) / 8 * 8 : t.stride(0);
  return ld >= t.size(1) && ld % 8 == 0 ? ld : 0;
}

kernels::ElemType half_type(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? kernels::ElemType::Float16 : kernels::ElemType::BFloat16;
}
#endif

// The product in fp32: on CUDA one GEMM that writes fp32 from 16-bit operands (aten::mm.dtype: no 16-bit product
// and cast kernel after it, no rounding to 16 bits); elsewhere the product cast.
at::Tensor grad_reference(const LoraGrad& j) {
  const at::Tensor& a = j.transposed ? j.x : j.g;
  const at::Tensor& b = j.transposed ? j.g : j.x;
  const bool half = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  at::Tensor out = a.is_cuda() && half ? at::mm(a.t(), b, at::kFloat) : at::mm(a.t(), b).to(at::kFloat);
  if (j.alpha != 1.0) out.mul_(j.alpha);
  return out;
}

}  // namespace

void lora_project_reference(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a) {
  at::mm_out(const_cast<at::Tensor&>(out), x, a.t());
}

bool lora_project(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a, bool kernels, int cluster) {
  QT_CHECK(x.dim() == 2 && a.dim() == 2 && out.dim() == 2 && a.size(1) == x.size(1) && out.size(0) == x.size(0) &&
               out.size(1) == a.size(0),
           ErrorKind::Internal, "lora_project: x [M, K], a [r, K], out [M, r]");
#ifdef QT_WITH_CUDA
  if (kernels && x.is_cuda() && a.device() == x.device() && out.device() == x.device() &&
      a.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() && x.size(1) % 8 == 0 &&
      a.size(0) <= kernels::kLoraGemmMaxRank && a.size(0) >= 1 && (out.size(1) == 1 || out.stride(1) == 1) &&
      built_for(x)) {
    const int64_t ldx = kernel_ld(x), lda = kernel_ld(a);
    if (ldx > 0 && lda > 0) {
      c10::cuda::CUDAGuard guard(x.device());
      const int64_t ld_out = out.size(0) <= 1 ? out.size(1) : out.stride(0);
      kernels::lora_project_launch(x.data_ptr(), ldx, a.data_ptr(), lda, out.data_ptr(), ld_out, x.size(0), x.size(1),
                                   a.size(0), cluster, half_type(x),
                                   at::cuda::getCurrentCUDAStream(x.get_device()).stream());
      return true;
    }
  }
#else
  (void)kernels;
  (void)cluster;
#endif
  lora_project_reference(out, x, a);
  return false;
}

std::vector<at::Tensor> lora_grads_reference(const std::vector<LoraGrad>& jobs) {
  std::vector<at::Tensor> out;
  for (const LoraGrad& j : jobs) out.push_back(grad_reference(j));
  return out;
}

std::vector<at::Tensor> lora_grads(const std::vector<LoraGrad>& jobs, bool kernels, int cluster, bool* kernel_ran) {
  if (kernel_ran) *kernel_ran = false;
  for (const LoraGrad& j : jobs)
    QT_CHECK(j.g.dim() == 2 && j.x.dim() == 2 && j.g.size(0) == j.x.size(0), ErrorKind::Internal,
             "lora_grads: g [M, r], x [M, N]");
#ifdef QT_WITH_CUDA
  bool take = kernels && !jobs.empty() && jobs.size() <= static_cast<size_t>(kernels::kLoraGradMaxJobs) &&
              jobs[0].x.is_cuda() && built_for(jobs[0].x);
  std::vector<kernels::LoraGradJob> raw;
  std::vector<at::Tensor> out;
  for (size_t i = 0; take && i < jobs.size(); ++i) {
    const LoraGrad& j = jobs[i];
    const int64_t ldg = kernel_ld(j.g), ldx = kernel_ld(j.x), r = j.g.size(1), n = j.x.size(1);
    take = ldg > 0 && ldx > 0 && j.g.device() == jobs[0].x.device() && j.x.device() == jobs[0].x.device() &&
           j.g.scalar_type() == jobs[0].x.scalar_type() && j.x.scalar_type() == jobs[0].x.scalar_type() &&
           j.x.size(0) == jobs[0].x.size(0) && r >= 1 && r <= kernels::kLoraGemmMaxRank && r % 8 == 0 && n % 8 == 0;
    if (!take) break;
    at::Tensor o = at::empty(j.transposed ? std::vector<int64_t>{n, r} : std::vector<int64_t>{r, n},
                             j.x.options().dtype(at::kFloat));
    raw.push_back({j.g.data_ptr(), ldg, j.x.data_ptr(), ldx, o.data_ptr<float>(), o.size(1), n, r,
                   static_cast<float>(j.alpha), j.transposed});
    out.push_back(o);
  }
  if (take) {
    c10::cuda::CUDAGuard guard(jobs[0].x.device());
    kernels::lora_grad_launch(raw.data(), static_cast<int>(raw.size()), jobs[0].x.size(0), cluster,
                              half_type(jobs[0].x), at::cuda::getCurrentCUDAStream(jobs[0].x.get_device()).stream());
    if (kernel_ran) *kernel_ran = true;
    return out;
  }
#else
  (void)kernels;
  (void)cluster;
#endif
  return lora_grads_reference(jobs);
}

}  // namespace qt
