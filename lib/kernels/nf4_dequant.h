#pragma once
// NF4 dequantization (format: nf4_format.h): a CUDA kernel that reads packed codes and double-quantized
// statistics in one pass and writes fp32 / fp16 / bf16 into a caller-provided buffer, and tensor-level entry
// points that run it on CUDA tensors and the plain-ATen reference (nf4_ref.h) on CPU tensors.
// No CUDA header here: the stream is CUDA's opaque CUstream_st*, i.e. a cudaStream_t.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "lib/kernels/nf4_ref.h"

struct CUstream_st;

namespace qt::kernels {

enum class Nf4OutType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Raw device pointers of one weight to dequantize.
struct Nf4DequantJob {
  const uint8_t* packed = nullptr;       // [ceil(numel/2)], 16-byte aligned
  const uint8_t* absmax_q = nullptr;     // [ceil(numel/blocksize)]
  const float* nested_absmax = nullptr;  // [ceil(ceil(numel/blocksize)/256)]
  const float* nested_map = nullptr;     // [256]
  const float* quant_map = nullptr;      // [16]
  float offset = 0.0f;
  int64_t numel = 0;       // any positive count (a short last block)
  int32_t blocksize = 64;  // power of two in [64, 4096]
  void* out = nullptr;     // [numel] of the output type, 16-byte aligned
  // Row-strided output: element e at out[(e / cols) * ld + e % cols]; 0 = contiguous. cols a multiple of
  // kNf4StridedCols (a warp's 1024 elements never straddle two rows), ld >= cols, rows of 16-byte multiples.
  int64_t cols = 0;
  int64_t ld = 0;
};

// Columns of a row-strided output must be a multiple of this.
inline constexpr int64_t kNf4StridedCols = 1024;

// Weights one launch can take (q, k, v of a block; gate, up).
inline constexpr int kNf4MaxJobs = 4;

// Dequantizes `n_jobs` (1..kNf4MaxJobs) weights in one kernel launch on `stream`, all to one output type.
// Preconditions are checked (qt::Error Internal): alignment, numel, blocksize. Asynchronous.
void nf4_dequant_launch(const Nf4DequantJob* jobs, int n_jobs, Nf4OutType type, CUstream_st* stream);

// True when this build compiled the CUDA kernel (QT_WITH_CUDA).
bool nf4_cuda_compiled();

// Dequantizes `d` into `out` (contiguous, numel == d.numel, float32/bfloat16/float16, on d's device; any
// shape; or a 2-D row-strided view, stride(1) == 1, such as the first columns of a wider matrix, whose columns
// are a multiple of kNf4StridedCols on CUDA; a contiguous output not 16-byte aligned is written through an
// aligned temporary). CUDA: the kernel on the current CUDA stream (set it with a
// c10::cuda::CUDAStreamGuard). CPU: the reference. Either way the bits are those of nf4_dequant_ref.
void nf4_dequant_into(const Nf4Data& d, const at::Tensor& out);

// Several weights in one launch on CUDA (at most kNf4MaxJobs, one output dtype); one after another on CPU.
void nf4_dequant_group_into(const std::vector<const Nf4Data*>& ds, const std::vector<at::Tensor>& outs);

}  // namespace qt::kernels
