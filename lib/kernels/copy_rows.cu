// Rows copied between 2-D views whose rows are contiguous but whose row strides differ (a tensor into the first
// columns of a wider one: the LoRA nodes' widened GEMM operands). ATen's copy_ takes its generic strided kernel
// there, at about half the bandwidth of a contiguous copy (0.048 ms for [4096, 4096] bf16 on an H100); this one moves
// 16-byte vectors, a grid-stride loop over (row, vector) pairs.
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

__global__ void __launch_bounds__(kThreads) copy_rows_kernel(uint4* __restrict__ dst, int64_t ld_dst,
                                                             const uint4* __restrict__ src, int64_t ld_src,
                                                             int64_t rows, int64_t vecs) {
  const int64_t n = rows * vecs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs, c = i - r * vecs;
    dst[r * ld_dst + c] = src[r * ld_src + c];
  }
}

}  // namespace

void copy_rows_launch(void* dst, int64_t ld_dst_bytes, const void* src, int64_t ld_src_bytes, int64_t rows,
                      int64_t row_bytes, CUstream_st* stream) {
  QT_CHECK(row_bytes % 16 == 0 && ld_dst_bytes % 16 == 0 && ld_src_bytes % 16 == 0 &&
               reinterpret_cast<uintptr_t>(dst) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0,
           ErrorKind::Internal, "copy_rows kernel: rows, strides and pointers must be 16-byte multiples");
  if (rows == 0 || row_bytes == 0) return;
  const int64_t vecs = row_bytes / 16;
  int64_t blocks = (rows * vecs + kThreads - 1) / kThreads;
  blocks = blocks < 132 * 16 ? blocks : 132 * 16;
  copy_rows_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<uint4*>(dst), ld_dst_bytes / 16, static_cast<const uint4*>(src), ld_src_bytes / 16, rows, vecs);
  check_launch("copy_rows");
}

}  // namespace qt::kernels
