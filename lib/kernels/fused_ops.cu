// Fused RMSNorm and SwiGLU kernels (fused_ops.h). References: rms_norm_reference / swiglu_reference
// (fused_ops.cpp); the [gpu] tests compare the two on random inputs.
//
// RMSNorm: one 256-thread block per row; each thread takes 8-element (16-byte for 16-bit types) vectors at a
// stride of the block. Pass 1 sums squares in fp32 (warp shuffles, then one value per warp in shared memory);
// pass 2 re-reads the row (now in L1/L2) and writes. Backward: the same two passes over dy, x and the weight.
// SwiGLU: a grid-stride loop over 8-element vectors of rows with their own strides (gate and up may be the two
// halves of one projection output).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "lib/core/error.h"
#include "lib/kernels/fused_ops_kernels.h"

namespace qt::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// Rounds through T and back (the casts the ATen reference makes between its ops).
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

// 8 elements of T, loaded and stored as whole vectors.
template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};
template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[kVec]) {
  Vec<T> a = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_f(a.v[i]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float in[kVec]) {
  Vec<T> a;
#pragma unroll
  for (int i = 0; i < kVec; ++i) a.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec<T>*>(p) = a;
}

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
                                                         float eps) {
  __shared__ float shared[kThreads / 32];
  const T* xr = x + blockIdx.x * H;
  T* yr = y + blockIdx.x * H;
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

template <typename T>
__global__ void __launch_bounds__(kThreads) rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                                         const T* __restrict__ w, const float* __restrict__ rstd,
                                                         T* __restrict__ dx, int64_t H) {
  __shared__ float shared[kThreads / 32];
  const int64_t off = blockIdx.x * H;
  const float r = rstd[blockIdx.x];
  float dot = 0;  // sum(dn * n)
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float d[kVec], a[kVec], g[kVec];
    load8(dy + off + j, d);
    load8(x + off + j, a);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) dot += d[i] * g[i] * a[i] * r;
  }
  const float mean = block_sum(dot, shared) / static_cast<float>(H);
  for (int64_t j = threadIdx.x * kVec; j < H; j += kThreads * kVec) {
    float d[kVec], a[kVec], g[kVec];
    load8(dy + off + j, d);
    load8(x + off + j, a);
    load8(w + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) d[i] = r * (d[i] * g[i] - a[i] * r * mean);
    store8(dx + off + j, d);
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

template <typename T>
__device__ __forceinline__ float swiglu_one(float g, float u) {
  return u * round_t<T>(g * sigmoid(g));
}

template <typename T>
__device__ __forceinline__ void swiglu_grad_one(float d, float g, float u, float& dg, float& du) {
  const float s = sigmoid(g);
  du = d * round_t<T>(g * s);
  dg = round_t<T>(d * u) * (s * (1.0f + g * (1.0f - s)));
}

// Rows of `cols` elements (a multiple of 8); gate and up rows start `ld_in` elements apart from row to row (the
// two halves of one [rows, 2 * cols] projection output, or two tensors of [rows, cols]), dy / out rows `ld_out`.
template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u,
                                                       T* __restrict__ out, int64_t rows, int64_t cols,
                                                       int64_t ld_in, int64_t ld_out) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / per_row, c = (i - r * per_row) * kVec;
    float a[kVec], b[kVec];
    load8(g + r * ld_in + c, a);
    load8(u + r * ld_in + c, b);
#pragma unroll
    for (int k = 0; k < kVec; ++k) a[k] = swiglu_one<T>(a[k], b[k]);
    store8(out + r * ld_out + c, a);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_bwd(const T* __restrict__ dy, const T* __restrict__ g,
                                                       const T* __restrict__ u, T* __restrict__ dg,
                                                       T* __restrict__ du, int64_t rows, int64_t cols, int64_t ld_in,
                                                       int64_t ld_out) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / per_row, c = (i - r * per_row) * kVec;
    float d[kVec], a[kVec], b[kVec], ga[kVec], gb[kVec];
    load8(dy + r * ld_out + c, d);
    load8(g + r * ld_in + c, a);
    load8(u + r * ld_in + c, b);
#pragma unroll
    for (int k = 0; k < kVec; ++k) swiglu_grad_one<T>(d[k], a[k], b[k], ga[k], gb[k]);
    store8(dg + r * ld_in + c, ga);
    store8(du + r * ld_in + c, gb);
  }
}

// One thread: 8 consecutive elements of the first half of one (token, head) row and their 8 partners in the
// second half.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_kernel(const T* __restrict__ x, const T* __restrict__ cos,
                                                        const T* __restrict__ sin, T* __restrict__ y,
                                                        int64_t tokens, int64_t heads, int64_t D, int64_t x_ld,
                                                        int64_t y_ld, bool inverse) {
  const int64_t half = D / 2, per_row = half / kVec;
  const int64_t total = tokens * heads * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / per_row, j = (i % per_row) * kVec;  // row = token * heads + head
    const int64_t token = row / heads;
    const int64_t head = row - token * heads;
    const T* xr = x + token * x_ld + head * D;
    const T* cr = cos + token * D;
    const T* sr = sin + token * D;
    float x1[kVec], x2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec], y1[kVec], y2[kVec];
    load8(xr + j, x1);
    load8(xr + half + j, x2);
    load8(cr + j, c1);
    load8(cr + half + j, c2);
    load8(sr + j, s1);
    load8(sr + half + j, s2);
    if (!inverse) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        y1[k] = round_t<T>(x1[k] * c1[k]) + round_t<T>(-x2[k] * s1[k]);
        y2[k] = round_t<T>(x2[k] * c2[k]) + round_t<T>(x1[k] * s2[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
        y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
      }
    }
    T* yr = y + token * y_ld + head * D;
    store8(yr + j, y1);
    store8(yr + half + j, y2);
  }
}

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail(ErrorKind::Internal, std::string(what) + ": " + cudaGetErrorString(e));
}

int elementwise_blocks(int64_t n) {
  int64_t blocks = (n / kVec + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < 132 * 16 ? blocks : 132 * 16);  // a grid-stride loop beyond ~16 waves
}

template <typename F>
void dispatch(ElemType type, F&& f) {
  switch (type) {
    case ElemType::Float32: f(float{}); break;
    case ElemType::Float16: f(__half{}); break;
    case ElemType::BFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace

void rope_launch(const void* x, const void* cos, const void* sin, void* y, int64_t tokens, int64_t heads, int64_t D,
                 int64_t x_ld, int64_t y_ld, bool inverse, ElemType type, CUstream_st* stream) {
  QT_CHECK(D % (2 * kVec) == 0 && x_ld % kVec == 0 && y_ld % kVec == 0 && x_ld >= heads * D && y_ld >= heads * D,
           ErrorKind::Internal, "rope kernel: head_dim must be a multiple of 16, token strides multiples of 8 and rows apart");
  const int64_t work = tokens * heads * (D / 2 / kVec);
  if (work == 0) return;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 132 * 16) blocks = 132 * 16;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rope_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(cos), static_cast<const T*>(sin), static_cast<T*>(y), tokens,
        heads, D, x_ld, y_ld, inverse);
  });
  check_launch("rope");
}

void rms_norm_forward_launch(const void* x, const void* weight, void* y, float* rstd, int64_t rows, int64_t H,
                             float eps, ElemType type, CUstream_st* stream) {
  QT_CHECK(H % kVec == 0, ErrorKind::Internal, "rms_norm kernel: the row length must be a multiple of 8");
  if (rows == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rms_norm_fwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(y), rstd, H, eps);
  });
  check_launch("rms_norm forward");
}

void rms_norm_backward_launch(const void* dy, const void* x, const void* weight, const float* rstd, void* dx,
                              int64_t rows, int64_t H, ElemType type, CUstream_st* stream) {
  QT_CHECK(H % kVec == 0, ErrorKind::Internal, "rms_norm kernel: the row length must be a multiple of 8");
  if (rows == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rms_norm_bwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight), rstd, static_cast<T*>(dx), H);
  });
  check_launch("rms_norm backward");
}

void swiglu_forward_launch(const void* g, const void* u, void* out, int64_t rows, int64_t cols, int64_t ld_in,
                           int64_t ld_out, ElemType type, CUstream_st* stream) {
  QT_CHECK(cols % kVec == 0 && ld_in % kVec == 0 && ld_out % kVec == 0 && ld_out >= cols, ErrorKind::Internal,
           "swiglu kernel: rows of a multiple of 8 elements, row strides multiples of 8 expected");
  if (rows * cols == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    swiglu_fwd<T><<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(out), rows, cols, ld_in, ld_out);
  });
  check_launch("swiglu forward");
}

void swiglu_backward_launch(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t rows,
                            int64_t cols, int64_t ld_in, int64_t ld_out, ElemType type, CUstream_st* stream) {
  QT_CHECK(cols % kVec == 0 && ld_in % kVec == 0 && ld_out % kVec == 0 && ld_out >= cols, ErrorKind::Internal,
           "swiglu kernel: rows of a multiple of 8 elements, row strides multiples of 8 expected");
  if (rows * cols == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    swiglu_bwd<T><<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(dg),
        static_cast<T*>(du), rows, cols, ld_in, ld_out);
  });
  check_launch("swiglu backward");
}

}  // namespace qt::kernels
