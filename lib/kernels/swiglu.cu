// Fused SwiGLU, silu(gate) * up, forward and backward (fused_ops.h: swiglu_fused, swiglu_packed; reference
// swiglu_reference): a grid-stride loop over 8-element vectors of rows with their own strides (gate and up may be
// the two halves of one projection output).
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

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
// One thread's 8 elements at row r, column c, forward and backward:
template <typename T>
__device__ __forceinline__ void swiglu_fwd_vec(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out,
                                               int64_t r, int64_t c, int64_t ld_in, int64_t ld_out) {
  float a[kVec], b[kVec];
  load8(g + r * ld_in + c, a);
  load8(u + r * ld_in + c, b);
#pragma unroll
  for (int k = 0; k < kVec; ++k) a[k] = swiglu_one<T>(a[k], b[k]);
  store8(out + r * ld_out + c, a);
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_vec(const T* __restrict__ dy, const T* __restrict__ g,
                                               const T* __restrict__ u, T* __restrict__ dg, T* __restrict__ du,
                                               int64_t r, int64_t c, int64_t ld_in, int64_t ld_out) {
  float d[kVec], a[kVec], b[kVec], ga[kVec], gb[kVec];
  load8(dy + r * ld_out + c, d);
  load8(g + r * ld_in + c, a);
  load8(u + r * ld_in + c, b);
#pragma unroll
  for (int k = 0; k < kVec; ++k) swiglu_grad_one<T>(d[k], a[k], b[k], ga[k], gb[k]);
  store8(dg + r * ld_in + c, ga);
  store8(du + r * ld_in + c, gb);
}

// A grid-stride loop over the rows' vectors as one flat index.
template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u,
                                                       T* __restrict__ out, int64_t rows, int64_t cols,
                                                       int64_t ld_in, int64_t ld_out) {
  const int64_t per_row = cols / kVec, total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / per_row;
    swiglu_fwd_vec(g, u, out, r, (i - r * per_row) * kVec, ld_in, ld_out);
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
    const int64_t r = i / per_row;
    swiglu_bwd_vec(dy, g, u, dg, du, r, (i - r * per_row) * kVec, ld_in, ld_out);
  }
}

// The same on a two-dimensional grid: blockIdx.x a row, blockIdx.y a run of kThreads vectors of it; no division (the
// loop above divides a 64-bit index by the row's vectors for every 8 elements).
template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_fwd_rows(const T* __restrict__ g, const T* __restrict__ u,
                                                            T* __restrict__ out, int64_t cols, int64_t ld_in,
                                                            int64_t ld_out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (c < cols) swiglu_fwd_vec(g, u, out, static_cast<int64_t>(blockIdx.x), c, ld_in, ld_out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_rows(const T* __restrict__ dy, const T* __restrict__ g,
                                                            const T* __restrict__ u, T* __restrict__ dg,
                                                            T* __restrict__ du, int64_t cols, int64_t ld_in,
                                                            int64_t ld_out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (c < cols) swiglu_bwd_vec(dy, g, u, dg, du, static_cast<int64_t>(blockIdx.x), c, ld_in, ld_out);
}

// The rows grid where it fits CUDA's limits (rows < 2^31, a row's runs < 65,536).
bool rows_grid_fits(int64_t rows, int64_t cols) {
  return rows < (int64_t{1} << 31) && (cols / kVec + kThreads - 1) / kThreads < 65536;
}

dim3 rows_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((cols / kVec + kThreads - 1) / kThreads));
}

}  // namespace

void swiglu_forward_launch(const void* g, const void* u, void* out, int64_t rows, int64_t cols, int64_t ld_in,
                           int64_t ld_out, ElemType type, CUstream_st* stream, bool by_rows) {
  QT_CHECK(cols % kVec == 0 && ld_in % kVec == 0 && ld_out % kVec == 0 && ld_out >= cols, ErrorKind::Internal,
           "swiglu kernel: rows of a multiple of 8 elements, row strides multiples of 8 expected");
  if (rows * cols == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    if (by_rows && rows_grid_fits(rows, cols))
      swiglu_fwd_rows<T><<<rows_grid(rows, cols), kThreads, 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(out), cols, ld_in, ld_out);
    else
      swiglu_fwd<T><<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(out), rows, cols, ld_in, ld_out);
  });
  check_launch("swiglu forward");
}

void swiglu_backward_launch(const void* dy, const void* g, const void* u, void* dg, void* du, int64_t rows,
                            int64_t cols, int64_t ld_in, int64_t ld_out, ElemType type, CUstream_st* stream,
                            bool by_rows) {
  QT_CHECK(cols % kVec == 0 && ld_in % kVec == 0 && ld_out % kVec == 0 && ld_out >= cols, ErrorKind::Internal,
           "swiglu kernel: rows of a multiple of 8 elements, row strides multiples of 8 expected");
  if (rows * cols == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    if (by_rows && rows_grid_fits(rows, cols))
      swiglu_bwd_rows<T><<<rows_grid(rows, cols), kThreads, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(dg),
          static_cast<T*>(du), cols, ld_in, ld_out);
    else
      swiglu_bwd<T><<<elementwise_blocks(rows * cols), kThreads, 0, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(dg),
          static_cast<T*>(du), rows, cols, ld_in, ld_out);
  });
  check_launch("swiglu backward");
}

}  // namespace qt::kernels
