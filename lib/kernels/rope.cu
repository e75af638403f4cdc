// Rotary position embedding on [tokens, heads, head_dim] rows, forward and inverse (fused_ops.h: rope_fused,
// rope_qkv; reference rope_reference): one thread rotates 8 elements of a row's first half with their partners
// in the second half. Qwen3's per-head RMSNorm before RoPE (rope_qkv with a QkNorm; reference: rms_norm_reference
// then rope_reference) in the same pass: the D / 16 threads of a row sum its squares with warp shuffles.
#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

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

// Threads of one (token, head) row: D / 16, consecutive lanes of one warp (D / 16 a power of two up to 32).
__device__ __forceinline__ float row_sum(float v, int per_row) {
  for (int o = per_row / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// y = rope(w * cast(x * rstd)), rstd = 1 / sqrt(mean(x^2) + eps) per row, rounded as transformers' Qwen3RMSNorm
// (normalise in fp32, cast, times the weight in T) then apply_rotary_pos_emb.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_norm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                             const T* __restrict__ cos, const T* __restrict__ sin,
                                                             T* __restrict__ y, int64_t tokens, int64_t heads,
                                                             int64_t D, int64_t x_ld, int64_t y_ld, float eps) {
  const int per_row = static_cast<int>(D / 2 / kVec);
  const int64_t half = D / 2, total = tokens * heads * per_row;
  // Every lane of a warp runs each round (the shuffles), lanes past the end with zeros.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < total;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < total;
    const int64_t row = active ? i / per_row : 0, j = active ? (i % per_row) * kVec : 0;
    const int64_t token = row / heads, head = row - token * heads;
    const T* xr = x + token * x_ld + head * D;
    float x1[kVec] = {}, x2[kVec] = {};
    if (active) {
      load8(xr + j, x1);
      load8(xr + half + j, x2);
    }
    float ss = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) ss += x1[k] * x1[k] + x2[k] * x2[k];
    const float r = rsqrtf(row_sum(ss, per_row) / static_cast<float>(D) + eps);
    if (!active) continue;
    float w1[kVec], w2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec], y1[kVec], y2[kVec];
    load8(w + j, w1);
    load8(w + half + j, w2);
    load8(cos + token * D + j, c1);
    load8(cos + token * D + half + j, c2);
    load8(sin + token * D + j, s1);
    load8(sin + token * D + half + j, s2);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float n1 = round_t<T>(w1[k] * round_t<T>(x1[k] * r)), n2 = round_t<T>(w2[k] * round_t<T>(x2[k] * r));
      y1[k] = round_t<T>(n1 * c1[k]) + round_t<T>(-n2 * s1[k]);
      y2[k] = round_t<T>(n2 * c2[k]) + round_t<T>(n1 * s2[k]);
    }
    T* yr = y + token * y_ld + head * D;
    store8(yr + j, y1);
    store8(yr + half + j, y2);
  }
}

// The gradient of rope_norm_kernel: dn = the inverse rotation of dy, then RMSNorm's backward (fp32 inside):
// dx = rstd (g - x rstd mean(g x rstd)), g = dn w, rstd recomputed from x.
template <typename T>
__global__ void __launch_bounds__(kThreads) rope_norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ cos,
    const T* __restrict__ sin, T* __restrict__ dx, int64_t tokens, int64_t heads, int64_t D, int64_t dy_ld,
    int64_t x_ld, int64_t dx_ld, float eps) {
  const int per_row = static_cast<int>(D / 2 / kVec);
  const int64_t half = D / 2, total = tokens * heads * per_row;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < total;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < total;
    const int64_t row = active ? i / per_row : 0, j = active ? (i % per_row) * kVec : 0;
    const int64_t token = row / heads, head = row - token * heads;
    float x1[kVec] = {}, x2[kVec] = {}, g1[kVec] = {}, g2[kVec] = {};
    if (active) {
      float d1[kVec], d2[kVec], w1[kVec], w2[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec];
      const T* xr = x + token * x_ld + head * D;
      const T* dr = dy + token * dy_ld + head * D;
      load8(xr + j, x1);
      load8(xr + half + j, x2);
      load8(dr + j, d1);
      load8(dr + half + j, d2);
      load8(w + j, w1);
      load8(w + half + j, w2);
      load8(cos + token * D + j, c1);
      load8(cos + token * D + half + j, c2);
      load8(sin + token * D + j, s1);
      load8(sin + token * D + half + j, s2);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        g1[k] = (d1[k] * c1[k] + d2[k] * s2[k]) * w1[k];
        g2[k] = (d2[k] * c2[k] - d1[k] * s1[k]) * w2[k];
      }
    }
    float ss = 0, dot = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      ss += x1[k] * x1[k] + x2[k] * x2[k];
      dot += g1[k] * x1[k] + g2[k] * x2[k];
    }
    const float r = rsqrtf(row_sum(ss, per_row) / static_cast<float>(D) + eps);
    const float mean = row_sum(dot, per_row) * r / static_cast<float>(D);  // mean(g * x * rstd)
    if (!active) continue;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      g1[k] = r * (g1[k] - x1[k] * r * mean);
      g2[k] = r * (g2[k] - x2[k] * r * mean);
    }
    T* dr = dx + token * dx_ld + head * D;
    store8(dr + j, g1);
    store8(dr + half + j, g2);
  }
}

int rope_blocks(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 132 * 16 ? blocks : 132 * 16);
}

void check_norm_shape(int64_t D, int64_t x_ld, int64_t y_ld, int64_t heads) {
  const int64_t per_row = D / 2 / kVec;
  QT_CHECK(D % (2 * kVec) == 0 && per_row <= 32 && (per_row & (per_row - 1)) == 0 && x_ld % kVec == 0 &&
               y_ld % kVec == 0 && x_ld >= heads * D && y_ld >= heads * D,
           ErrorKind::Internal,
           "rope_norm kernel: head_dim must be 16 times a power of two up to 512, token strides multiples of 8");
}

}  // namespace

bool rope_norm_takes_head_dim(int64_t D) {
  const int64_t per_row = D / 2 / kVec;
  return D % (2 * kVec) == 0 && per_row >= 1 && per_row <= 32 && (per_row & (per_row - 1)) == 0;
}

void rope_norm_launch(const void* x, const void* weight, const void* cos, const void* sin, void* y, int64_t tokens,
                      int64_t heads, int64_t D, int64_t x_ld, int64_t y_ld, float eps, ElemType type,
                      CUstream_st* stream) {
  check_norm_shape(D, x_ld, y_ld, heads);
  const int64_t work = tokens * heads * (D / 2 / kVec);
  if (work == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rope_norm_kernel<T><<<static_cast<unsigned>(rope_blocks(work)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(cos), static_cast<const T*>(sin),
        static_cast<T*>(y), tokens, heads, D, x_ld, y_ld, eps);
  });
  check_launch("rope_norm");
}

void rope_norm_backward_launch(const void* dy, const void* x, const void* weight, const void* cos, const void* sin,
                               void* dx, int64_t tokens, int64_t heads, int64_t D, int64_t dy_ld, int64_t x_ld,
                               int64_t dx_ld, float eps, ElemType type, CUstream_st* stream) {
  check_norm_shape(D, x_ld, dx_ld, heads);
  QT_CHECK(dy_ld % kVec == 0 && dy_ld >= heads * D, ErrorKind::Internal, "rope_norm backward: bad dy stride");
  const int64_t work = tokens * heads * (D / 2 / kVec);
  if (work == 0) return;
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    rope_norm_backward_kernel<T><<<static_cast<unsigned>(rope_blocks(work)), kThreads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(cos),
        static_cast<const T*>(sin), static_cast<T*>(dx), tokens, heads, D, dy_ld, x_ld, dx_ld, eps);
  });
  check_launch("rope_norm backward");
}

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

}  // namespace qt::kernels
