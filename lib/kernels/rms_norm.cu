// Fused RMSNorm, forward and backward (fused_ops.h: rms_norm_fused; reference rms_norm_reference in
// fused_ops.cpp; the [gpu] tests compare the two on random inputs). One 256-thread block per row; each thread takes
// 8-element (16-byte for 16-bit types) vectors at a stride of the block. Pass 1 sums squares in fp32 (warp
// shuffles, then one value per warp in shared memory); pass 2 re-reads the row (now in L1/L2) and writes.
// Backward: the same two passes over dy, x and the weight. Also the residual add before a norm (x = h + a, then the
// norm of x) in the same passes, and its backward adding x's other gradient (the residual stream's) as it writes.
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                                         T* __restrict__ y, float* __restrict__ rstd, int64_t H,
                                                         int64_t ld_y, float eps) {
  __shared__ float shared[kThreads / 32];
  const T* xr = x + blockIdx.x * H;
  T* yr = y + blockIdx.x * ld_y;
  float ss = 0;
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float a[kVec];
    load8(xr + j, a);
#pragma unroll
    for (int i = 0; i < kVec; ++i) ss += a[i] * a[i];
  }
  const float r = rsqrtf(block_sum(ss, shared) / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float a[kVec], g[kVec];
    load8(xr + j, a);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) a[i] = g[i] * round_t<T>(a[i] * r);
    store8(yr + j, a);
  }
}

// x = h + a (rounded to T, as ATen's add), then y as rms_norm_fwd from x; x written in the first pass and read back
// (the thread's own writes) in the second.
template <typename T>
__global__ void __launch_bounds__(kThreads) add_rms_norm_fwd(const T* __restrict__ h, const T* __restrict__ a,
                                                             const T* __restrict__ w, T* __restrict__ x,
                                                             T* __restrict__ y, float* __restrict__ rstd, int64_t H,
                                                             int64_t ld_y, float eps) {
  __shared__ float shared[kThreads / 32];
  const int64_t off = blockIdx.x * H;
  float ss = 0;
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float u[kVec], v[kVec];
    load8(h + off + j, u);
    load8(a + off + j, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      u[i] = round_t<T>(u[i] + v[i]);
      ss += u[i] * u[i];
    }
    store8(x + off + j, u);
  }
  const float r = rsqrtf(block_sum(ss, shared) / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float u[kVec], g[kVec];
    load8(x + off + j, u);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) u[i] = g[i] * round_t<T>(u[i] * r);
    store8(y + blockIdx.x * ld_y + j, u);
  }
}

// dres (nullable, rows contiguous): the gradient x has from elsewhere (the residual stream), added to the norm's
// input gradient rounded to T, as autograd's sum of the two T gradients rounds.
template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                                         const T* __restrict__ w, const float* __restrict__ rstd,
                                                         T* __restrict__ dx, int64_t H, int64_t ld_dy,
                                                         const T* __restrict__ dres) {
  __shared__ float shared[kThreads / 32];
  const int64_t off = blockIdx.x * H;
  dy += blockIdx.x * ld_dy;
  const float r = rstd[blockIdx.x];
  float dot = 0;  // sum(dn * n)
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float d[kVec], a[kVec], g[kVec];
    load8(dy + j, d);
    load8(x + off + j, a);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) dot += d[i] * g[i] * a[i] * r;
  }
  const float mean = block_sum(dot, shared) / static_cast<float>(H);
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float d[kVec], a[kVec], g[kVec];
    load8(dy + j, d);
    load8(x + off + j, a);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) d[i] = r * (d[i] * g[i] - a[i] * r * mean);
    if (dres != nullptr) {
      float e[kVec];
      load8(dres + off + j, e);
#pragma unroll
      for (int i = 0; i < kVec; ++i) d[i] = __fadd_rn(round_t<T>(d[i]), e[i]);  // (never fused into an FMA: fp32's
                                                                                // norm gradient is rounded first)
    }
    store8(dx + off + j, d);
  }
}

}  // namespace

void rms_norm_forward_launch(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t H,
                             int64_t ld_y, float eps, ElemType type, CUstream_st* stream) {
  QT_CHECK(H % kVec == 0 && ld_y >= H && ld_y % kVec == 0, ErrorKind::Internal,
           "rms_norm kernel: the row length and y's row stride must be multiples of 8");
  if (rows == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rms_norm_fwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(y), rstd, H, ld_y, eps);
  });
  check_launch("rms_norm forward");
}

void rms_norm_backward_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                              int64_t rows, int64_t H, int64_t ld_dy, ElemType type, CUstream_st* stream) {
  add_rms_norm_backward_launch(dy, nullptr, x, weight, rstd, dx, rows, H, ld_dy, type, stream);
}

void add_rms_norm_forward_launch(const void* h, const void* a, const void* weight, void* x, void* y, float* rstd,
                                 int64_t rows, int64_t H, int64_t ld_y, float eps, ElemType type, CUstream_st* stream) {
  QT_CHECK(H % kVec == 0 && ld_y >= H && ld_y % kVec == 0, ErrorKind::Internal,
           "add_rms_norm kernel: the row length and y's row stride must be multiples of 8");
  if (rows == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    add_rms_norm_fwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(a), static_cast<const T*>(weight), static_cast<T*>(x),
        static_cast<T*>(y), rstd, H, ld_y, eps);
  });
  check_launch("add_rms_norm forward");
}

void add_rms_norm_backward_launch(const void* dy, const void* dres, const void* x, const void* weight,
                                  const float* rstd, void* dx, int64_t rows, int64_t H, int64_t ld_dy, ElemType type,
                                  CUstream_st* stream) {
  QT_CHECK(H % kVec == 0 && ld_dy >= H && ld_dy % kVec == 0, ErrorKind::Internal,
           "rms_norm kernel: the row length and dy's row stride must be multiples of 8");
  if (rows == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rms_norm_bwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight), rstd, static_cast<T*>(dx), H, ld_dy,
        static_cast<const T*>(dres));
  });
  check_launch(dres ? "add_rms_norm backward" : "rms_norm backward");
}

}  // namespace qt::kernels
