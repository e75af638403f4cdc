#pragma once
// Raw launches of LoRA's rank-r GEMM kernels (lora_gemm.cu; the tensor-level API and its references: fused_ops.h,
// lora_project and lora_grads). Callers pass device pointers and the CUDA stream.
#include <cstdint>

#include "lib/kernels/fused_ops_kernels.h"

struct CUstream_st;

namespace qt::kernels {

constexpr int64_t kLoraGemmMaxRank = 128;
constexpr int kLoraGradMaxJobs = 4;

// Whether the kernels were built for `device` (sm_90 or later: they use thread-block clusters).
bool lora_gemm_kernels_built(int device);

// out[m, j] = sum_k x[m, k] a[j, k], fp32 accumulators rounded to `type` (fp16 / bf16): x [M, K] rows ld_x apart,
// a [r, K] rows ld_a apart, out [M, r] rows ld_out apart (elements). r <= 128; K, ld_x, ld_a multiples of 8; x and a
// 16-byte aligned. `cluster`: the CTAs (1, 2, 4 or 8) that split a row tile's K and add their sums; 0 picks it from
// the device's SMs. Returns the cluster size used.
int lora_project_launch(const void* x, int64_t ld_x, const void* a, int64_t ld_a, void* out, int64_t ld_out,
                        int64_t M, int64_t K, int64_t r, int cluster, ElemType type, CUstream_st* stream);

// out = alpha g^T x in fp32: g [M, r] rows ld_g apart, x [M, n] rows ld_x apart; out [r, n] (rows ld_out apart) or,
// transposed, [n, r] (rows ld_out apart). r, n, ld_g, ld_x multiples of 8 (r <= 128); g and x 16-byte aligned.
struct LoraGradJob {
  const void* g;
  int64_t ld_g;
  const void* x;
  int64_t ld_x;
  float* out;
  int64_t ld_out;
  int64_t n, r;
  float alpha;
  bool transposed;
};
// Up to kLoraGradMaxJobs jobs over the same M tokens in one launch. `cluster`: the CTAs (1, 2, 4 or 8) that split a
// column tile's tokens and add their sums; 0 picks it from the device's SMs. Returns the cluster size used.
int lora_grad_launch(const LoraGradJob* jobs, int njobs, int64_t M, int cluster, ElemType type, CUstream_st* stream);

}  // namespace qt::kernels
