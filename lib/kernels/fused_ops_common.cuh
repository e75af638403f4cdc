#pragma once
// What the fused elementwise kernels share (rms_norm.cu, swiglu.cu, rope.cu; declared in fused_ops_kernels.h):
// conversions through fp32, 8-element vector loads and stores, the launch shape, the dtype dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

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

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail(ErrorKind::Internal, std::string(what) + ": " + cudaGetErrorString(e));
}

inline int elementwise_blocks(int64_t n) {
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
}  // namespace qt::kernels
