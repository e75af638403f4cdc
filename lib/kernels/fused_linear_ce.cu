// CUDA tile kernel of the fused linear cross-entropy: one block per token row of a logits tile that cuBLAS has
// just written. Pass 1 reads the row once, keeping a running max and sum-exp in fp32 (online softmax, Milakov &
// Gimelshein 2018, "Online normalizer calculation for softmax"), plus the sum of logits for label smoothing.
// Pass 2 reads it again and overwrites it with d loss / d logits, so the tile becomes the gradient tile G that
// the next GEMMs consume (dh = G W, dW += G^T h). Same idea as llm.c's fused_classifier kernel.
// Reference: fused_linear_ce_ref.cpp (same formulas in ATen).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/fused_linear_ce_kernel.h"

namespace qt::kernels {
namespace {

template <typename T>
struct Io;
template <>
struct Io<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Io<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Io<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

// Adds one logit to a running (max, sum of exp(z - max)). __expf (ex2.approx) keeps the kernel memory-bound;
// its error is a few ulp for the arguments that matter (z - max in [-20, 0]).
__device__ __forceinline__ void online_add(float& m, float& s, float z) {
  if (z > m) {
    s = s * __expf(m - z) + 1.f;  // m = -inf at start: exp(-inf) = 0, no NaN
    m = z;
  } else {
    s += __expf(z - m);
  }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty (threads that saw no element)
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

__device__ __forceinline__ void warp_reduce(float& m, float& s, float& zsum) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    zsum += __shfl_xor_sync(0xffffffffu, zsum, off);
    online_merge(m, s, m2, s2);
  }
}

struct Capper {
  float cap;
  __device__ __forceinline__ float operator()(float v) const { return cap > 0.f ? cap * tanhf(v / cap) : v; }
};

// d loss / d z_j = softmax_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]; times 1 - (z_j / cap)^2
// through the soft-cap (d/dx cap tanh(x / cap)). One definition for both passes' kernels.
struct GradOf {
  float lse, scale, smooth, hit, cap;
  int64_t y;
  __device__ GradOf(float lse_, int64_t y_, int64_t vocab, const CeTileParams& p)
      : lse(lse_),
        scale(1.f + 2.f * p.z_loss * lse_),
        smooth(p.label_smoothing / static_cast<float>(vocab)),
        hit(1.f - p.label_smoothing),
        cap(p.logit_softcap),
        y(y_) {}
  __device__ __forceinline__ float operator()(float raw, int64_t j) const {
    const float z = Capper{cap}(raw);
    float g = scale * __expf(z - lse) - smooth;
    if (j == y) g -= hit;
    if (cap > 0.f) {
      const float t = z / cap;
      g *= 1.f - t * t;
    }
    return g;
  }
};

// f(vector, its index) for a thread's 16-byte vectors of a row, tid, + kThreads, ... in that order, loaded kDepth at
// a time ahead of their calls.
template <int kThreads, int kDepth, typename F>
__device__ __forceinline__ void each_vector(const uint4* xv, int64_t nvec, int tid, F&& f) {
  int64_t i = tid;
  if constexpr (kDepth > 1)
    for (; i + (kDepth - 1) * kThreads < nvec; i += kDepth * kThreads) {
      uint4 raw[kDepth];
#pragma unroll
      for (int d = 0; d < kDepth; ++d) raw[d] = xv[i + d * kThreads];
#pragma unroll
      for (int d = 0; d < kDepth; ++d) f(raw[d], i + d * kThreads);
    }
  for (; i < nvec; i += kThreads) f(xv[i], i);
}

// Rows blockIdx.x, + gridDim.x, ... of the tile: with the default grid (a CTA a row) one row each; with the
// persistent grid (CeTileParams::resident: one 1024-thread CTA an SM, kDepth 4) each CTA takes rows in turn, each
// thread keeping kDepth 16-byte loads in flight. A 1024-thread CTA takes an SM either way (50-62 registers a thread),
// so about one row an SM is in flight (132 rows of 256 KB at a 128k vocabulary in bf16 on an H100: 33 MB, within the
// 50 MB L2: pass 2 reads its row again from L2), but the default grid keeps one load a thread in flight, 16 KB an SM:
// about 2 TB/s over 132 SMs at a microsecond's latency, where pass 1 reads DRAM. Four deep: 64 KB an SM. A thread
// visits its vectors in the same order at any kDepth and the reductions are the same: both grids give the same bits.
template <typename T, int kThreads, bool kVec, int kDepth>
__global__ void __launch_bounds__(kThreads, 1)
    ce_tile_kernel(T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t ld, const int64_t* __restrict__ labels,
                   float* __restrict__ loss_rows, float* __restrict__ lse_rows, bool write_grad, CeTileParams p) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kVecElems = 16 / sizeof(T);  // one 16-byte load
  __shared__ float smem[3 * 32 + 3];
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int64_t nvec = kVec ? vocab / kVecElems : 0;
  const Capper capped{p.logit_softcap};
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* x = logits + row * ld;
    uint4* xv = reinterpret_cast<uint4*>(x);
    const int64_t y = labels[row];
    const bool ignored = y == p.ignore_index;
    const bool bad = !ignored && (y < 0 || y >= vocab);
    if (ignored || bad) {  // (the whole CTA takes the same branch: no barrier is skipped by some threads only)
      if (write_grad) {
        if constexpr (kVec)
          for (int64_t i = tid; i < nvec; i += kThreads) xv[i] = make_uint4(0, 0, 0, 0);
        for (int64_t j = nvec * kVecElems + tid; j < vocab; j += kThreads) x[j] = Io<T>::store(0.f);
      }
      if (tid == 0) loss_rows[row] = bad ? NAN : 0.f;
      continue;
    }
    const float z_y = tid == 0 ? capped(Io<T>::load(x[y])) : 0.f;  // read before pass 2 overwrites the row

    float m = -INFINITY, s = 0.f, zsum = 0.f;
    auto add = [&](float z) {
      online_add(m, s, z);
      zsum += z;
    };
    if constexpr (kVec) {
      auto add_vec = [&](const uint4& raw) {
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < kVecElems; ++k) add(capped(Io<T>::load(e[k])));
      };
      each_vector<kThreads, kDepth>(xv, nvec, tid, [&](const uint4& raw, int64_t) { add_vec(raw); });
    }
    for (int64_t j = nvec * kVecElems + tid; j < vocab; j += kThreads) add(capped(Io<T>::load(x[j])));

    // The block's (max, sum-exp, sum). A row's first write to smem comes after its first barrier, which every thread
    // reaches only after reading the previous row's results.
    warp_reduce(m, s, zsum);
    if (lane == 0) {
      smem[warp] = m;
      smem[32 + warp] = s;
      smem[64 + warp] = zsum;
    }
    __syncthreads();
    if (warp == 0) {
      m = lane < kWarps ? smem[lane] : -INFINITY;
      s = lane < kWarps ? smem[32 + lane] : 0.f;
      zsum = lane < kWarps ? smem[64 + lane] : 0.f;
      warp_reduce(m, s, zsum);
      if (lane == 0) {
        smem[3 * 32] = m;
        smem[3 * 32 + 1] = s;
        smem[3 * 32 + 2] = zsum;
      }
    }
    __syncthreads();
    m = smem[3 * 32];
    s = smem[3 * 32 + 1];
    zsum = smem[3 * 32 + 2];

    const float eps = p.label_smoothing;
    const float lse = m + logf(s);
    if (tid == 0) {
      loss_rows[row] = lse - (1.f - eps) * z_y - eps / static_cast<float>(vocab) * zsum + p.z_loss * lse * lse;
      if (lse_rows != nullptr) lse_rows[row] = lse;
    }
    if (!write_grad) continue;

    const GradOf grad(lse, y, vocab, p);
    if constexpr (kVec) {
      auto out = [&](const uint4& raw, int64_t v) {
        const T* e = reinterpret_cast<const T*>(&raw);
        uint4 packed;
        T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int k = 0; k < kVecElems; ++k) o[k] = Io<T>::store(grad(Io<T>::load(e[k]), v * kVecElems + k));
        return packed;
      };
      each_vector<kThreads, kDepth>(xv, nvec, tid, [&](const uint4& raw, int64_t v) { xv[v] = out(raw, v); });
    }
    for (int64_t j = nvec * kVecElems + tid; j < vocab; j += kThreads) x[j] = Io<T>::store(grad(Io<T>::load(x[j]), j));
  }
}

// The SMs of the current device (the resident grid's size), read once per device.
int sm_count() {
  static int counts[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
    counts[device] = n;
  }
  return counts[device];
}

template <typename T, int kThreads>
void launch_threads(T* logits, int64_t rows, int64_t vocab, int64_t ld, const int64_t* labels, float* loss_rows,
                    float* lse_rows, bool write_grad, const CeTileParams& params, cudaStream_t stream) {
  constexpr int kVecElems = 16 / sizeof(T);
  // 16-byte accesses need every row start 16-byte aligned: base pointer and row stride.
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && ld % kVecElems == 0;
  const dim3 grid(static_cast<unsigned>(rows));
  if constexpr (kThreads == 1024) {
    if (vec && params.resident) {
      const dim3 resident(static_cast<unsigned>(std::min<int64_t>(rows, sm_count())));
      ce_tile_kernel<T, kThreads, true, 4>
          <<<resident, kThreads, 0, stream>>>(logits, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params);
      return;
    }
  }
  if (vec) {
    ce_tile_kernel<T, kThreads, true, 1>
        <<<grid, kThreads, 0, stream>>>(logits, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params);
  } else {
    ce_tile_kernel<T, kThreads, false, 1>
        <<<grid, kThreads, 0, stream>>>(logits, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params);
  }
}

template <typename T>
void launch(void* logits, int64_t rows, int64_t vocab, int64_t ld, const int64_t* labels, float* loss_rows,
            float* lse_rows, bool write_grad, const CeTileParams& params, cudaStream_t stream) {
  // A 128k-vocab row is 16k 16-byte vectors: 1024 threads give each 16 loads per pass. Small vocabularies
  // (tests, small models) would leave most of a 1024-thread block idle.
  T* x = static_cast<T*>(logits);
  if (vocab >= 16384) {
    launch_threads<T, 1024>(x, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params, stream);
  } else {
    launch_threads<T, 256>(x, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params, stream);
  }
}

// Pass 2: a [rows, cols] slice, one block per (row, 2048 columns); every element independent. 16-byte accesses
// when the slice allows them (memory-bound: one read and one write of the slice).
template <typename T, bool kVec>
__global__ void __launch_bounds__(256)
    ce_slice_kernel(T* __restrict__ logits, int64_t rows, int64_t cols, int64_t ld, int64_t col0, int64_t vocab,
                    const int64_t* __restrict__ labels, const float* __restrict__ lse_rows, CeTileParams p) {
  constexpr int kVecElems = kVec ? 16 / sizeof(T) : 1;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x) * kVecElems;
  if (c >= cols) return;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    T* x = logits + row * ld + c;
    const int64_t y = labels[row];
    const bool counted = y != p.ignore_index && y >= 0 && y < vocab;
    if constexpr (kVec) {
      uint4 packed = make_uint4(0, 0, 0, 0);
      if (counted) {
        const GradOf grad(lse_rows[row], y, vocab, p);
        const uint4 raw = *reinterpret_cast<const uint4*>(x);
        const T* e = reinterpret_cast<const T*>(&raw);
        T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int k = 0; k < kVecElems; ++k) o[k] = Io<T>::store(grad(Io<T>::load(e[k]), col0 + c + k));
      }
      *reinterpret_cast<uint4*>(x) = packed;
    } else {
      *x = counted ? Io<T>::store(GradOf(lse_rows[row], y, vocab, p)(Io<T>::load(*x), col0 + c)) : Io<T>::store(0.f);
    }
  }
}

template <typename T>
void launch_slice(void* logits, int64_t rows, int64_t cols, int64_t ld, int64_t col0, int64_t vocab,
                  const int64_t* labels, const float* lse_rows, const CeTileParams& params, cudaStream_t stream) {
  constexpr int kVecElems = 16 / sizeof(T);
  T* x = static_cast<T*>(logits);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && ld % kVecElems == 0 && cols % kVecElems == 0;
  const int64_t per_block = 256 * (vec ? kVecElems : 1);
  const dim3 grid(static_cast<unsigned>((cols + per_block - 1) / per_block),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  if (vec) {
    ce_slice_kernel<T, true><<<grid, 256, 0, stream>>>(x, rows, cols, ld, col0, vocab, labels, lse_rows, params);
  } else {
    ce_slice_kernel<T, false><<<grid, 256, 0, stream>>>(x, rows, cols, ld, col0, vocab, labels, lse_rows, params);
  }
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    fail(ErrorKind::Device, std::string("fused linear cross-entropy kernel launch: ") + cudaGetErrorString(err));
  }
}

}  // namespace

// f(T{}) for the tile's element type.
template <typename F>
void dispatch_ce(CeTileDtype dtype, F&& f) {
  switch (dtype) {
    case CeTileDtype::F32: f(float{}); break;
    case CeTileDtype::BF16: f(__nv_bfloat16{}); break;
    case CeTileDtype::F16: f(__half{}); break;
  }
}

void ce_tile_loss_grad(void* logits, CeTileDtype dtype, int64_t rows, int64_t vocab, int64_t ld, const int64_t* labels,
                       float* loss_rows, bool write_grad, const CeTileParams& params, void* stream, float* lse_rows) {
  if (rows <= 0) return;
  QT_CHECK(rows <= INT32_MAX && vocab > 0 && ld >= vocab, ErrorKind::Internal, "ce_tile_loss_grad: bad tile shape");
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_ce(dtype, [&](auto t) {
    launch<decltype(t)>(logits, rows, vocab, ld, labels, loss_rows, lse_rows, write_grad, params, s);
  });
  check_launch();
}

void ce_slice_grad(void* logits, CeTileDtype dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col0, int64_t vocab,
                   const int64_t* labels, const float* lse_rows, const CeTileParams& params, void* stream) {
  if (rows <= 0 || cols <= 0) return;
  QT_CHECK(ld >= cols && col0 >= 0 && col0 + cols <= vocab, ErrorKind::Internal, "ce_slice_grad: bad slice shape");
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_ce(dtype, [&](auto t) {
    launch_slice<decltype(t)>(logits, rows, cols, ld, col0, vocab, labels, lse_rows, params, s);
  });
  check_launch();
}

}  // namespace qt::kernels
