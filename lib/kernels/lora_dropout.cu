// LoRA dropout without a stored mask (fused_ops.h: lora_dropout_apply, lora_dropout_rank_update; references beside
// them in fused_ops.cpp; the masks: dropout_hash.h).
//   - apply: y = x * mask * scale, a grid-stride loop over 8-element vectors (x's rows may be strided): the dropped
//     input a LoRA A reads, 2 bytes an element read and 2 written (at::dropout also writes the bool mask, which the
//     backward pass then reads twice).
//   - rank update: dx += mask * scale * (g a), g [rows, r], a [r, cols]: the input gradient's LoRA term, the rank-r
//     product formed in registers (fp32) and added under its mask, dx read and written once. ATen's composition wrote
//     g a, read it with the mask, wrote that masked and added it: 13 bytes an element against 4.
//     A block owns a 32 x 256 tile of dx: 8 warps of 4 rows, a thread 4 rows by two runs of 4 columns 128 apart (the
//     shared-memory reads of a warp's 4-column runs are contiguous: no bank conflicts); g and a come through shared
//     memory in fp32, 16 of r at a time; three blocks an SM (80 registers, a few spilled: two blocks of 112-127
//     registers measured the same). On an H100 it moves dx at about 1.3 TB/s, not the 3 TB/s of apply: latency-bound
//     still (docs/PERFORMANCE.md, fifteenth session).
#include "lib/kernels/dropout_hash.h"
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

using dropout_hash::bits4;
using dropout_hash::kept;

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_apply_kernel(const T* __restrict__ x, int64_t ld_x,
                                                                 T* __restrict__ y, int64_t ld_y, int64_t rows,
                                                                 int64_t cols, uint64_t key, uint32_t threshold,
                                                                 float scale) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / per_row, c = (i - r * per_row) * kVec;
    float v[kVec];
    load8(x + r * ld_x + c, v);
    const uint64_t j = static_cast<uint64_t>(r * cols + c) >> 2;
    const uint64_t b0 = bits4(key, j), b1 = bits4(key, j + 1);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = kept(b0, k, threshold) ? v[k] * scale : 0.0f;
      v[k + 4] = kept(b1, k, threshold) ? v[k + 4] * scale : 0.0f;
    }
    store8(y + r * ld_y + c, v);
  }
}

constexpr int kTileRows = 32, kTileCols = 256, kChunk = 16, kRowsPerThread = 4;

// 4 elements of T as one vector (8 bytes in 16 bits, 16 in fp32).
template <typename T>
struct alignas(sizeof(T) * 4) Vec4 {
  T v[4];
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) dropout_rank_update_kernel(T* __restrict__ dx, int64_t ld_dx,
                                                                       const T* __restrict__ g, int64_t ld_g,
                                                                       const T* __restrict__ a, int64_t ld_a,
                                                                       int64_t rows, int64_t cols, int64_t rank,
                                                                       uint64_t key, uint32_t threshold, float scale) {
  // sg: the chunk of g transposed, [j][row] (a row stride of 36: float4 reads stay aligned, writes conflict 2-way).
  __shared__ __align__(16) float sg[kChunk][kTileRows + 4];
  __shared__ __align__(16) float sa[kChunk][kTileCols];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows, col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  float acc[kRowsPerThread][8];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[i][k] = 0.0f;
  for (int64_t j0 = 0; j0 < rank; j0 += kChunk) {
    // Every load of the chunk issued before the first store to shared memory (a store waits for its load: one at a
    // time, each an L2 round trip, the staging took longer than the tile's products).
    constexpr int kGLoads = kChunk * kTileRows / kThreads, kAVecs = kChunk * kTileCols / 4 / kThreads;
    float vg[kGLoads];
    Vec4<T> va[kAVecs];
#pragma unroll
    for (int it = 0; it < kGLoads; ++it) {
      const int i = threadIdx.x + it * kThreads, jj = i % kChunk, rr = i / kChunk;
      const int64_t row = row0 + rr, j = j0 + jj;
      vg[it] = row < rows && j < rank ? to_f(g[row * ld_g + j]) : 0.0f;
    }
#pragma unroll
    for (int it = 0; it < kAVecs; ++it) {
      const int i = threadIdx.x + it * kThreads, jj = i / (kTileCols / 4), cc = (i % (kTileCols / 4)) * 4;
      const int64_t col = col0 + cc, j = j0 + jj;
      if (col < cols && j < rank) {
        va[it] = *reinterpret_cast<const Vec4<T>*>(a + j * ld_a + col);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) va[it].v[k] = from_f<T>(0.0f);
      }
    }
#pragma unroll
    for (int it = 0; it < kGLoads; ++it) {
      const int i = threadIdx.x + it * kThreads;
      sg[i % kChunk][i / kChunk] = vg[it];
    }
#pragma unroll
    for (int it = 0; it < kAVecs; ++it) {
      const int i = threadIdx.x + it * kThreads, jj = i / (kTileCols / 4), cc = (i % (kTileCols / 4)) * 4;
      *reinterpret_cast<float4*>(&sa[jj][cc]) =
          make_float4(to_f(va[it].v[0]), to_f(va[it].v[1]), to_f(va[it].v[2]), to_f(va[it].v[3]));
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kChunk; ++jj) {
      const float4 g0 = *reinterpret_cast<const float4*>(&sg[jj][ty * kRowsPerThread]);
      const float4 a0 = *reinterpret_cast<const float4*>(&sa[jj][tx * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&sa[jj][kTileCols / 2 + tx * 4]);
      const float gv[4] = {g0.x, g0.y, g0.z, g0.w};
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[i][k] = fmaf(gv[i], av[k], acc[i][k]);
    }
    __syncthreads();
  }
  // The thread's dx: every load issued before the first sum (the first version loaded, summed and stored one run at
  // a time, each load waited for: about 1.1 TB/s on an H100).
  Vec4<T> d[kRowsPerThread][2];
  bool in[kRowsPerThread][2];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = row0 + ty * kRowsPerThread + i, col = col0 + half * (kTileCols / 2) + tx * 4;
      in[i][half] = row < rows && col < cols;  // (cols % 8 == 0: a run of 4 lies wholly inside or outside)
      if (in[i][half]) d[i][half] = *reinterpret_cast<const Vec4<T>*>(dx + row * ld_dx + col);
    }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (!in[i][half]) continue;
      const int64_t row = row0 + ty * kRowsPerThread + i, col = col0 + half * (kTileCols / 2) + tx * 4;
      const uint64_t bits = bits4(key, static_cast<uint64_t>(row * cols + col) >> 2);
      Vec4<T> o = d[i][half];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (kept(bits, k, threshold)) o.v[k] = from_f<T>(to_f(o.v[k]) + scale * acc[i][half * 4 + k]);
      *reinterpret_cast<Vec4<T>*>(dx + row * ld_dx + col) = o;
    }
}

}  // namespace

void dropout_apply_launch(const void* x, int64_t ld_x, void* y, int64_t ld_y, int64_t rows, int64_t cols,
                          uint64_t key, uint32_t threshold, float scale, ElemType type, CUstream_st* stream) {
  QT_CHECK(cols % kVec == 0 && ld_x % kVec == 0 && ld_y % kVec == 0, ErrorKind::Internal,
           "dropout_apply kernel: columns and row strides must be multiples of 8");
  if (rows == 0 || cols == 0) return;
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    dropout_apply_kernel<T><<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(x), ld_x, static_cast<T*>(y), ld_y, rows, cols, key, threshold, scale);
  });
  check_launch("dropout_apply");
}

void dropout_rank_update_launch(void* dx, int64_t ld_dx, const void* g, int64_t ld_g, const void* a, int64_t ld_a,
                                int64_t rows, int64_t cols, int64_t rank, uint64_t key, uint32_t threshold,
                                float scale, ElemType type, CUstream_st* stream) {
  QT_CHECK(cols % kVec == 0 && ld_dx % kVec == 0 && ld_a % 4 == 0, ErrorKind::Internal,
           "dropout_rank_update kernel: dx's columns and row stride must be multiples of 8, a's row stride of 4");
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  QT_CHECK(row_tiles <= 65535, ErrorKind::Internal, "dropout_rank_update kernel: more than 2,097,120 rows");
  if (rows == 0 || cols == 0 || rank == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(row_tiles));
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    dropout_rank_update_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(dx), ld_dx, static_cast<const T*>(g),
                                                                 ld_g, static_cast<const T*>(a), ld_a, rows, cols, rank,
                                                                 key, threshold, scale);
  });
  check_launch("dropout_rank_update");
}

}  // namespace qt::kernels
