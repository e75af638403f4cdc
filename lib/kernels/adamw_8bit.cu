// AdamW with 8-bit blockwise moments (adamw_8bit.h): a CTA a block of 256 elements at a time (the CTAs striding over
// the blocks), one element a thread, the tensors of a step in one launch (a table of jobs, as scaled_copies_kernel).
// The maps in shared memory; the new block absmax by a warp shuffle and one exchange through shared memory; each new
// moment's code by a binary search of its map for the nearest value (ties to the lower code), as the CPU loop's
// std::lower_bound.
#include "lib/kernels/adamw_8bit_kernel.h"
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

constexpr int kBlock = 256;

// The nearest of 256 sorted values to x (clamped to [-1, 1]): the first not below x, or the one before it unless the
// first is strictly nearer (ties to the lower code).
__device__ __forceinline__ uint8_t nearest_code(const float* map, float x) {
  x = fminf(fmaxf(x, -1.0f), 1.0f);
  int lo = 0, hi = kBlock;  // lower_bound in [lo, hi)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (map[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  if (lo == 0) return 0;
  if (lo == kBlock) return kBlock - 1;
  const float right = map[lo] - x, left = x - map[lo - 1];
  return static_cast<uint8_t>(right < left ? lo : lo - 1);
}

__device__ __forceinline__ float block_max(float v, float* exchange) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) exchange[warp] = v;
  __syncthreads();
  float m = exchange[0];
#pragma unroll
  for (int w = 1; w < kBlock / 32; ++w) m = fmaxf(m, exchange[w]);
  return m;
}

template <typename T>
__global__ void __launch_bounds__(kBlock) adamw_8bit_kernel(const Adam8bitJob* __restrict__ jobs, int n,
                                                            int64_t blocks, const float* __restrict__ maps,
                                                            const float* __restrict__ found_inf,
                                                            Adam8bitConstants c) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  __shared__ float smap[2 * kBlock];
  __shared__ float exchange[2][kBlock / 32];
  smap[threadIdx.x] = maps[threadIdx.x];
  smap[kBlock + threadIdx.x] = maps[kBlock + threadIdx.x];
  __syncthreads();  // the maps are in (once a CTA: the CTAs stride over the blocks)
  for (int64_t blk = blockIdx.x; blk < blocks; blk += gridDim.x) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (jobs[mid].first_block <= blk) lo = mid;
      else hi = mid - 1;
    }
    const Adam8bitJob j = jobs[lo];
    const int64_t b = blk - j.first_block;
    const int64_t e = b * kBlock + threadIdx.x;
    const bool valid = e < j.n;
    float m = 0.0f, v = 0.0f;
    if (valid) {
      const float g = to_f(static_cast<const T*>(j.grad)[e]);
      // Each operation rounded on its own (no contraction into fused multiply-adds): the CPU loop's bits.
      m = __fmul_rn(smap[j.m_codes[e]], j.m_absmax[b]);
      v = __fmul_rn(smap[kBlock + j.v_codes[e]], j.v_absmax[b]);
      m = __fadd_rn(__fmul_rn(m, c.beta1), __fmul_rn(g, c.one_minus_beta1));
      v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(g, g), c.one_minus_beta2));
      T* p = static_cast<T*>(j.p);
      float x = to_f(p[e]);
      if (c.decay != 1.0f) x = __fmul_rn(x, c.decay);
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bc2_sqrt), c.eps);
      x = __fsub_rn(x, __fmul_rn(c.step_size, __fdiv_rn(m, denom)));
      p[e] = from_f<T>(x);
    }
    // Every thread read the old absmax above; the new ones are written after both reductions' exchanges.
    const float m_max = block_max(fabsf(m), exchange[0]);
    const float v_max = block_max(v, exchange[1]);
    if (threadIdx.x == 0) {
      j.m_absmax[b] = m_max;
      j.v_absmax[b] = v_max;
    }
    if (valid) {
      j.m_codes[e] = m_max == 0.0f ? 0 : nearest_code(smap, __fdiv_rn(m, m_max));
      j.v_codes[e] = v_max == 0.0f ? 0 : nearest_code(smap + kBlock, __fdiv_rn(v, v_max));
    }
    __syncthreads();  // the exchanges are read before the next block's reductions write them
  }
}

}  // namespace

void adamw_8bit_launch(const Adam8bitJob* jobs, int64_t n, int64_t blocks, const float* maps, const float* found_inf,
                       const Adam8bitConstants& c, ElemType type, CUstream_st* stream) {
  if (n == 0 || blocks == 0) return;
  QT_CHECK(blocks < (int64_t{1} << 31) && n < (int64_t{1} << 31), ErrorKind::Internal,
           "adamw_8bit kernel: too many tensors or blocks");
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    // A grid of at most 16 CTAs an SM of a 132-SM GPU, striding over the blocks: each CTA loads the maps once.
    const unsigned grid = static_cast<unsigned>(blocks < 132 * 16 ? blocks : 132 * 16);
    adamw_8bit_kernel<T><<<grid, kBlock, 0, stream>>>(jobs, static_cast<int>(n), blocks, maps, found_inf, c);
  });
  check_launch("adamw_8bit");
}

}  // namespace qt::kernels
