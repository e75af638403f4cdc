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

// SwiGLU with the gate / up projections' LoRA B terms added on the fly (swiglu_lora_forward_launch). A block
// takes a tile of 64 rows x 128 columns: t's 64 rows and the 128 columns' B rows go to shared memory (fp32,
// [k][row] and [k][col], so a thread reads its 4 rows and its 8 columns with 16-byte loads), each thread sums
// the rank-r products of its 4 x 8 gate and up elements in registers, adds them to the base values read from
// global memory, rounds as the projection's output would be, and applies swiglu_one / swiglu_grad_one.
constexpr int kLoraRows = 64, kLoraCols = 128, kLoraMaxRank = 64;

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads) swiglu_lora_kernel(
    const T* __restrict__ base, int64_t ld_base, const T* __restrict__ t, int64_t ld_t, const T* __restrict__ bg,
    const T* __restrict__ bu, int64_t ld_b, int rg, int ru, const T* __restrict__ dy, int64_t ld_dy,
    T* __restrict__ out, int64_t ld_out, int64_t rows, int64_t cols) {
  __shared__ __align__(16) float t_s[kLoraMaxRank][kLoraRows];
  __shared__ __align__(16) float b_s[kLoraMaxRank][kLoraCols];
  const int R = rg + ru;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kLoraRows, col0 = static_cast<int64_t>(blockIdx.x) * kLoraCols;
  for (int i = threadIdx.x; i < kLoraRows * R; i += kThreads) {
    const int r = i / R, k = i - r * R;
    const int64_t row = row0 + r;
    t_s[k][r] = row < rows ? to_f(t[row * ld_t + k]) : 0.0f;
  }
  for (int i = threadIdx.x; i < kLoraCols * R; i += kThreads) {
    const int c = i / R, k = i - c * R;
    const int64_t col = col0 + c;
    float v = 0.0f;
    if (col < cols) v = k < rg ? to_f(bg[col * ld_b + k]) : to_f(bu[col * ld_b + (k - rg)]);
    b_s[k][c] = v;
  }
  __syncthreads();
  const int tc = threadIdx.x % (kLoraCols / kVec), tr = threadIdx.x / (kLoraCols / kVec);  // 16 x 16 threads
  float ag[4][kVec], au[4][kVec];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < kVec; ++j) ag[i][j] = au[i][j] = 0.0f;
  // Two loops (gate's ranks, then up's) so that each accumulator array stays in registers.
  auto accumulate = [&](int k, float(&acc)[4][kVec]) {
    const float4 tv = *reinterpret_cast<const float4*>(&t_s[k][tr * 4]);
    const float4 b0 = *reinterpret_cast<const float4*>(&b_s[k][tc * kVec]);
    const float4 b1 = *reinterpret_cast<const float4*>(&b_s[k][tc * kVec + 4]);
    const float tr4[4] = {tv.x, tv.y, tv.z, tv.w};
    const float b8[kVec] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[i][j] += tr4[i] * b8[j];
  };
  for (int k = 0; k < rg; ++k) accumulate(k, ag);
  for (int k = rg; k < R; ++k) accumulate(k, au);
  const int64_t col = col0 + tc * kVec;
  if (col >= cols) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + tr * 4 + i;
    if (row >= rows) break;
    float g[kVec], u[kVec];
    load8(base + row * ld_base + col, g);
    load8(base + row * ld_base + cols + col, u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      g[j] = round_t<T>(g[j] + ag[i][j]);
      u[j] = round_t<T>(u[j] + au[i][j]);
    }
    if constexpr (kBackward) {
      float d[kVec], dg[kVec], du[kVec];
      load8(dy + row * ld_dy + col, d);
#pragma unroll
      for (int j = 0; j < kVec; ++j) swiglu_grad_one<T>(d[j], g[j], u[j], dg[j], du[j]);
      store8(out + row * ld_out + col, dg);
      store8(out + row * ld_out + cols + col, du);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) g[j] = swiglu_one<T>(g[j], u[j]);
      store8(out + row * ld_out + col, g);
    }
  }
}

// The same on the tensor cores, for 16-bit types (swiglu_lora_mma_kernel). The CUDA-core kernel above ran at a
// sixth of the bandwidth the SwiGLU pass needs (1.14 ms a call at 8,192 x 14,336 on an H200 against 0.20 ms for
// swiglu_fwd): its shared-memory fill was bank-conflicted and serialized on scalar loads, and its epilogue waited
// on each row's loads in turn. Here a block takes 64 rows x 64 columns (8 warps of 16 rows x 32 columns, at most
// 80 registers a thread so that 3 blocks share an SM); t's rows and the columns' B rows sit in shared memory as
// 16-bit values ([row][k], gate's ranks then up's, each padded to a multiple of 16 with zeros; rows padded to
// kMmaLd elements so that the fragment loads hit 32 different banks); each warp multiplies with mma.m16n8k16
// (fp32 accumulators: the same products as the fp32 sums above, summed in another order); and the base values,
// loaded first so that their latency hides behind the fill and the products, are read in the accumulators' own
// layout (two adjacent columns per thread and row).
constexpr int kMmaLd = kLoraMaxRank + 8;  // 144 bytes a row: 36 words, so 8 rows x 4 lanes hit 32 banks
constexpr int kMmaCols = 64;              // a block's columns: 8 warps of 16 rows x 32 columns

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool kBf16 = true; };
template <> struct MmaType<__half> { static constexpr bool kBf16 = false; };

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (MmaType<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two adjacent 16-bit values as one 32-bit word, and back.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
  T v[2];
  memcpy(v, &w, sizeof(w));
  lo = to_f(v[0]);
  hi = to_f(v[1]);
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  T v[2] = {from_f<T>(lo), from_f<T>(hi)};
  uint32_t w;
  memcpy(&w, v, sizeof(w));
  return w;
}

// Fills rows [0, n) of s ([n][kMmaLd]) with gate's ranks of src row r at [0, rg) and up's at [RG, RG + ru), zeros in
// between and after (up to RG + RU), and zero rows past `valid`. vec: 16-byte loads (ranks, strides and pointers
// multiples of 8 elements); else one element per thread and step, consecutive threads on consecutive ranks.
template <typename T>
__device__ __forceinline__ void fill_lora_rows(T (*s)[kMmaLd], int n, int64_t valid, const T* g, int64_t ld_g,
                                               const T* u, int64_t ld_u, int rg, int ru, int RG, int RU, bool vec) {
  const int K = RG + RU;
  if (vec) {
    const int kv = K / 8;
    for (int i = threadIdx.x; i < n * kv; i += kThreads) {
      const int r = i / kv, k = (i - r * kv) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < valid) {
        if (k < RG) {
          if (k < rg) v = *reinterpret_cast<const uint4*>(g + r * ld_g + k);
        } else if (k - RG < ru) {
          v = *reinterpret_cast<const uint4*>(u + r * ld_u + (k - RG));
        }
      }
      *reinterpret_cast<uint4*>(&s[r][k]) = v;
    }
  } else {
    for (int i = threadIdx.x; i < n * K; i += kThreads) {
      const int r = i / K, k = i - r * K;
      T v = from_f<T>(0.0f);
      if (r < valid) {
        if (k < RG) {
          if (k < rg) v = g[r * ld_g + k];
        } else if (k - RG < ru) {
          v = u[r * ld_u + (k - RG)];
        }
      }
      s[r][k] = v;
    }
  }
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads, 3) swiglu_lora_mma_kernel(
    const T* __restrict__ base, int64_t ld_base, const T* __restrict__ t, int64_t ld_t, const T* __restrict__ bg,
    const T* __restrict__ bu, int64_t ld_b, int rg, int ru, const T* __restrict__ dy, int64_t ld_dy,
    T* __restrict__ out, int64_t ld_out, int64_t rows, int64_t cols, bool vec) {
  __shared__ __align__(16) T t_s[kLoraRows][kMmaLd];
  __shared__ __align__(16) T b_s[kMmaCols][kMmaLd];
  const int RG = (rg + 15) / 16 * 16, RU = (ru + 15) / 16 * 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kLoraRows, col0 = static_cast<int64_t>(blockIdx.x) * kMmaCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, tq = lane % 4;
  const int wr = (warp % 4) * 16, wc = (warp / 4) * 32;  // the warp's 16 rows and 32 columns in the tile

  // Offsets inside the block's tile fit 32 bits (64 rows of a row stride under 2^25).
  const T* base_b = base + row0 * ld_base + col0;
  const int nrows = static_cast<int>(rows - row0 < kLoraRows ? rows - row0 : kLoraRows);
  const int ncols = static_cast<int>(cols - col0 < kMmaCols ? cols - col0 : kMmaCols);
  const int ldb = static_cast<int>(ld_base), up = static_cast<int>(cols);
  // This thread's base values (gate and up, 4 column pairs x 2 rows), loaded first.
  uint32_t bgv[4][2], buv[4][2];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wr + grp + h * 8, c = wc + j * 8 + tq * 2;
      bgv[j][h] = buv[j][h] = 0;
      if (r < nrows && c < ncols) {
        bgv[j][h] = *reinterpret_cast<const uint32_t*>(base_b + r * ldb + c);
        buv[j][h] = *reinterpret_cast<const uint32_t*>(base_b + r * ldb + up + c);
      }
    }

  fill_lora_rows<T>(t_s, kLoraRows, rows - row0, t + row0 * ld_t, ld_t, t + row0 * ld_t + rg, ld_t, rg, ru, RG, RU,
                    vec);
  fill_lora_rows<T>(b_s, kMmaCols, cols - col0, bg + col0 * ld_b, ld_b, bu + col0 * ld_b, ld_b, rg, ru, RG, RU, vec);
  __syncthreads();

  float ag[4][4], au[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) ag[j][i] = au[j][i] = 0.0f;
  auto products = [&](int k0, int k1, float(&acc)[4][4]) {
    for (int k = k0; k < k1; k += 16) {
      const T* pa = &t_s[wr + grp][k + tq * 2];
      const uint32_t a[4] = {*reinterpret_cast<const uint32_t*>(pa), *reinterpret_cast<const uint32_t*>(pa + 8 * kMmaLd),
                             *reinterpret_cast<const uint32_t*>(pa + 8),
                             *reinterpret_cast<const uint32_t*>(pa + 8 * kMmaLd + 8)};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const T* pb = &b_s[wc + j * 8 + grp][k + tq * 2];
        mma_16816<T>(acc[j], a, *reinterpret_cast<const uint32_t*>(pb), *reinterpret_cast<const uint32_t*>(pb + 8));
      }
    }
  };
  products(0, RG, ag);
  products(RG, RG + RU, au);

  const T* dy_b = kBackward ? dy + row0 * ld_dy + col0 : nullptr;
  T* out_b = out + row0 * ld_out + col0;
  const int ldd = static_cast<int>(ld_dy), ldo = static_cast<int>(ld_out);
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wr + grp + h * 8, c = wc + j * 8 + tq * 2;
      if (r >= nrows || c >= ncols) continue;
      float g[2], u[2];
      unpack2<T>(bgv[j][h], g[0], g[1]);
      unpack2<T>(buv[j][h], u[0], u[1]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        g[e] = round_t<T>(g[e] + ag[j][h * 2 + e]);
        u[e] = round_t<T>(u[e] + au[j][h * 2 + e]);
      }
      if constexpr (kBackward) {
        float d[2], dg[2], du[2];
        unpack2<T>(*reinterpret_cast<const uint32_t*>(dy_b + r * ldd + c), d[0], d[1]);
#pragma unroll
        for (int e = 0; e < 2; ++e) swiglu_grad_one<T>(d[e], g[e], u[e], dg[e], du[e]);
        *reinterpret_cast<uint32_t*>(out_b + r * ldo + c) = pack2<T>(dg[0], dg[1]);
        *reinterpret_cast<uint32_t*>(out_b + r * ldo + up + c) = pack2<T>(du[0], du[1]);
      } else {
        *reinterpret_cast<uint32_t*>(out_b + r * ldo + c) =
            pack2<T>(swiglu_one<T>(g[0], u[0]), swiglu_one<T>(g[1], u[1]));
      }
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

namespace {
template <bool kBackward>
void swiglu_lora_launch(const void* dy, int64_t ld_dy, const void* base, int64_t ld_base, const void* t, int64_t ld_t,
                        const void* bg, const void* bu, int64_t ld_b, int rg, int ru, void* out, int64_t ld_out,
                        int64_t rows, int64_t cols, ElemType type, CUstream_st* stream) {
  QT_CHECK(cols % kVec == 0 && ld_base % kVec == 0 && ld_out % kVec == 0 && (!kBackward || ld_dy % kVec == 0) &&
               rg > 0 && ru > 0 && rg + ru <= kLoraMaxRank && ld_t >= rg + ru && ld_b >= std::max(rg, ru),
           ErrorKind::Internal,
           "swiglu_lora kernel: columns and row strides multiples of 8, ranks summing to at most 64 expected");
  if (rows * cols == 0) return;
  const int64_t row_tiles = (rows + kLoraRows - 1) / kLoraRows, col_tiles = (cols + kLoraCols - 1) / kLoraCols;
  QT_CHECK(row_tiles < 65536 && col_tiles < (int64_t{1} << 31), ErrorKind::Internal, "swiglu_lora kernel: too many rows");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  // The tensor-core kernel for 16-bit types whose padded ranks fit its shared rows; 16-byte fills where ranks,
  // strides and pointers allow.
  const int RG = (rg + 15) / 16 * 16, RU = (ru + 15) / 16 * 16;
  const auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = rg % 8 == 0 && ru % 8 == 0 && ld_t % 8 == 0 && ld_b % 8 == 0 && a16(t) && a16(bg) && a16(bu) &&
                   a16(static_cast<const char*>(t) + rg * 2);
  const int64_t ld_max = std::max({ld_base, ld_out, ld_dy});
  if (type != ElemType::Float32 && RG + RU <= kLoraMaxRank && ld_max < (int64_t{1} << 25)) {
    const dim3 mma_grid(static_cast<unsigned>((cols + kMmaCols - 1) / kMmaCols), static_cast<unsigned>(row_tiles));
    dispatch(type, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, float>) {
        swiglu_lora_mma_kernel<T, kBackward><<<mma_grid, kThreads, 0, stream>>>(
            static_cast<const T*>(base), ld_base, static_cast<const T*>(t), ld_t, static_cast<const T*>(bg),
            static_cast<const T*>(bu), ld_b, rg, ru, static_cast<const T*>(dy), ld_dy, static_cast<T*>(out), ld_out,
            rows, cols, vec);
      }
    });
    check_launch(kBackward ? "swiglu_lora backward (tensor cores)" : "swiglu_lora forward (tensor cores)");
    return;
  }
  dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    swiglu_lora_kernel<T, kBackward><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(base), ld_base, static_cast<const T*>(t), ld_t, static_cast<const T*>(bg),
        static_cast<const T*>(bu), ld_b, rg, ru, static_cast<const T*>(dy), ld_dy, static_cast<T*>(out), ld_out, rows,
        cols);
  });
  check_launch(kBackward ? "swiglu_lora backward" : "swiglu_lora forward");
}
}  // namespace

void swiglu_lora_forward_launch(const void* base, int64_t ld_base, const void* t, int64_t ld_t, const void* bg,
                                const void* bu, int64_t ld_b, int rg, int ru, void* out, int64_t ld_out, int64_t rows,
                                int64_t cols, ElemType type, CUstream_st* stream) {
  swiglu_lora_launch<false>(nullptr, 0, base, ld_base, t, ld_t, bg, bu, ld_b, rg, ru, out, ld_out, rows, cols, type,
                            stream);
}

void swiglu_lora_backward_launch(const void* dy, int64_t ld_dy, const void* base, int64_t ld_base, const void* t,
                                 int64_t ld_t, const void* bg, const void* bu, int64_t ld_b, int rg, int ru, void* dgu,
                                 int64_t ld_dgu, int64_t rows, int64_t cols, ElemType type, CUstream_st* stream) {
  swiglu_lora_launch<true>(dy, ld_dy, base, ld_base, t, ld_t, bg, bu, ld_b, rg, ru, dgu, ld_dgu, rows, cols, type,
                           stream);
}

}  // namespace qt::kernels
