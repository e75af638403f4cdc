// Rotary position embedding on [tokens, heads, head_dim] rows, forward and inverse (fused_ops.h: rope_fused,
// rope_qkv; reference rope_reference): one thread rotates 8 elements of a row's first half with their partners
// in the second half. Qwen3's per-head RMSNorm before RoPE (rope_qkv with a QkNorm; reference: rms_norm_reference
// then rope_reference) in the same pass: the D / 16 threads of a row sum its squares with warp shuffles.
#include <algorithm>

#include "lib/kernels/fused_ops_common.cuh"

namespace qt::kernels {
namespace {

// Up to three runs of heads one launch rotates or copies (RopeRows in fused_ops_kernels.h), typed; the runs side by
// side make a token's heads: run 0's first, then run 1's, then run 2's.
template <typename T>
struct RopeRuns {
  const T* src[3];
  T* dst[3];
  int64_t src_ld[3], dst_ld[3], heads[3];
  bool rotate[3];
  int64_t all_heads;
};

// One thread: 8 consecutive elements of the first half of one (token, head) row and their 8 partners in the
// second half, rotated or (a run without `rotate`: v beside q and k) copied as they are. A CTA takes a token at a time
// and its threads the token's (head, 8 columns) items, in 32-bit arithmetic (the 64-bit divisions of a flat index ran
// this kernel at two thirds of the copy bandwidth).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(RopeRuns<T> runs, const T* __restrict__ cos, const T* __restrict__ sin, int64_t tokens, int D,
                bool inverse) {
  const int half = D / 2, per_row = half / kVec;
  const int h0 = static_cast<int>(runs.heads[0]), h01 = h0 + static_cast<int>(runs.heads[1]);
  const int items = static_cast<int>(runs.all_heads) * per_row;
  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    for (int item = static_cast<int>(threadIdx.x); item < items; item += static_cast<int>(blockDim.x)) {
      int head = item / per_row;
      const int j = (item - head * per_row) * kVec;
      // (selects, not an indexed parameter array: that would go through local memory)
      const bool in0 = head < h0, in1 = !in0 && head < h01;
      head -= in0 ? 0 : in1 ? h0 : h01;
      const T* src = in0 ? runs.src[0] : in1 ? runs.src[1] : runs.src[2];
      T* dst = in0 ? runs.dst[0] : in1 ? runs.dst[1] : runs.dst[2];
      const int64_t src_ld = in0 ? runs.src_ld[0] : in1 ? runs.src_ld[1] : runs.src_ld[2];
      const int64_t dst_ld = in0 ? runs.dst_ld[0] : in1 ? runs.dst_ld[1] : runs.dst_ld[2];
      const bool rotate = in0 ? runs.rotate[0] : in1 ? runs.rotate[1] : runs.rotate[2];
      const T* xr = src + token * src_ld + head * D;
      float x1[kVec], x2[kVec], y1[kVec], y2[kVec];
      load8(xr + j, x1);
      load8(xr + half + j, x2);
      if (!rotate) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) y1[k] = x1[k], y2[k] = x2[k];  // exact: T's values are floats
      } else {
        const T* cr = cos + token * D;
        const T* sr = sin + token * D;
        float c1[kVec], c2[kVec], s1[kVec], s2[kVec];
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
      }
      T* yr = dst + token * dst_ld + head * D;
      store8(yr + j, y1);
      store8(yr + half + j, y2);
    }
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

void rope_runs_launch(const RopeRows* runs, int count, const void* cos, const void* sin, int64_t tokens, int64_t D,
                      bool inverse, ElemType type, CUstream_st* stream) {
  QT_CHECK(count >= 1 && count <= 3 && D % (2 * kVec) == 0, ErrorKind::Internal,
           "rope kernel: 1 to 3 runs of heads, head_dim a multiple of 16");
  int64_t all_heads = 0;
  for (int r = 0; r < count; ++r) {
    const RopeRows& run = runs[r];
    QT_CHECK(run.heads >= 0 && run.src_ld % kVec == 0 && run.dst_ld % kVec == 0 && run.src_ld >= run.heads * D &&
                 run.dst_ld >= run.heads * D && reinterpret_cast<uintptr_t>(run.src) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(run.dst) % 16 == 0,
             ErrorKind::Internal, "rope kernel: token strides multiples of 8, rows apart, 16-byte aligned");
    all_heads += run.heads;
  }
  QT_CHECK(all_heads * D < (int64_t{1} << 30), ErrorKind::Internal, "rope kernel: too many heads a token");
  if (tokens * all_heads == 0) return;
  // A token a CTA, its items spread evenly over the fewest rounds of at most kThreads threads (Llama 3 8B's q / k / v:
  // 384 items, two rounds of 192), at most 64 CTAs an SM's worth in the grid.
  const int64_t items = all_heads * (D / 2 / kVec), rounds = (items + kThreads - 1) / kThreads;
  const unsigned threads = static_cast<unsigned>(((items + rounds - 1) / rounds + 31) / 32 * 32);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(tokens, int64_t{132} * 64));
  dispatch(type, [&](auto t) {
    using T = decltype(t);
    RopeRuns<T> typed{};
    for (int r = 0; r < 3; ++r) {
      const RopeRows& run = runs[r < count ? r : count - 1];
      typed.src[r] = static_cast<const T*>(run.src);
      typed.dst[r] = static_cast<T*>(run.dst);
      typed.src_ld[r] = run.src_ld;
      typed.dst_ld[r] = run.dst_ld;
      typed.heads[r] = r < count ? run.heads : 0;
      typed.rotate[r] = run.rotate;
    }
    typed.all_heads = all_heads;
    rope_kernel<T><<<blocks, threads, 0, stream>>>(typed, static_cast<const T*>(cos), static_cast<const T*>(sin),
                                                   tokens, static_cast<int>(D), inverse);
  });
  check_launch("rope");
}

void rope_launch(const void* x, const void* cos, const void* sin, void* y, int64_t tokens, int64_t heads, int64_t D,
                 int64_t x_ld, int64_t y_ld, bool inverse, ElemType type, CUstream_st* stream) {
  const RopeRows run{x, y, x_ld, y_ld, heads, /*rotate=*/true};
  rope_runs_launch(&run, 1, cos, sin, tokens, D, inverse, type, stream);
}

}  // namespace qt::kernels
