// Rows copied between 2-D views whose rows are contiguous but whose row strides differ (a tensor into the first
// columns of a wider one: the LoRA nodes' widened GEMM operands). ATen's copy_ takes its generic strided kernel
// there, at about half the bandwidth of a contiguous copy (0.048 ms for [4096, 4096] bf16 on an H100); this one moves
// 16-byte vectors, a grid-stride loop over (row, vector) pairs.
// Also: many small scaled, cast copies of fp32 matrices in one launch (the LoRA factors of a whole model, remade
// after each optimizer step: some 600 copy, cast and fill kernels a step of the 8B shape before).
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

// Each block copies kScaledCopyChunk elements of one job: the last whose first_block is at most blockIdx.x.
template <typename T>
__global__ void __launch_bounds__(kThreads) scaled_copies_kernel(const ScaledCopyJob* __restrict__ jobs, int n) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].first_block <= static_cast<int64_t>(blockIdx.x)) lo = mid;
    else hi = mid - 1;
  }
  const ScaledCopyJob j = jobs[lo];
  const int64_t begin = (static_cast<int64_t>(blockIdx.x) - j.first_block) * kScaledCopyChunk;
  const int64_t total = j.rows * j.cols;
  const int64_t end = begin + kScaledCopyChunk < total ? begin + kScaledCopyChunk : total;
  T* dst = static_cast<T*>(j.dst);
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const int64_t r = e / j.cols, c = e - r * j.cols;
    dst[r * j.ld_dst + c] = from_f<T>(j.src[r * j.ld_src + c] * j.scale);
  }
}

}  // namespace

void scaled_copies_launch(const ScaledCopyJob* jobs, int64_t n, int64_t blocks, ElemType type, CUstream_st* stream) {
  if (n == 0 || blocks == 0) return;
  QT_CHECK(blocks < (int64_t{1} << 31) && n < (int64_t{1} << 31), ErrorKind::Internal,
           "scaled_copies kernel: too many jobs or blocks");
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    scaled_copies_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(jobs, static_cast<int>(n));
  });
  check_launch("scaled_copies");
}

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
