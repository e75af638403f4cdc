// LoRA's rank-r GEMMs on the tensor cores (lora_gemm.h): memory-bound products where one side is [tokens, width]
// (read once, from HBM) and the other has r <= 128 rows (from L2). cuBLAS runs them at 35-75% of the memory
// bandwidth on an H100 (split-K with a reduce kernel, or tiles shaped for square GEMMs); these stream the wide
// operand through a cp.async pipeline and multiply with mma.sync m16n8k16 (fp32 accumulators). Measured on an H100 and
// an H200 they were slower than cuBLAS in the model, so the model calls them only when asked (lib/model/pass.h).
//   - project: out [M, r] = x [M, K] a [r, K]^T, rounded to x's dtype. A CTA takes 128 rows of x (16 a warp) and a
//     slice of K; the K slices of a row tile form one thread-block cluster, whose CTAs add their partial sums through
//     distributed shared memory in rank order.
//   - grads: out = alpha g^T x in fp32, g [M, r], x [M, N], as [r, N] or its transpose [N, r]; several jobs in one
//     launch (a LoRA node's A and B gradients, or a group's). A CTA takes 128 columns of one job's x and a slice of the
//     tokens; the slices of a column tile form one thread-block cluster, whose CTAs add their partial sums through
//     distributed shared memory in rank order (deterministic, no workspace, no second kernel).
// sm_90 (clusters); built for an older architecture the kernels are empty and lora_gemm_kernels_built says no.
#include <cooperative_groups.h>

#include <type_traits>

#include "lib/kernels/fused_ops_common.cuh"
#include "lib/kernels/lora_gemm.h"

namespace qt::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kPad = 8;  // elements of padding per staged row: ldmatrix's 8 row addresses fall in distinct banks

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, or zeros where !valid (src not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a b, m16n8k16, fp32 accumulators (a: 4 registers of the 16 x 16 row-major tile, b: 2 of the 16 x 8 column-major),
// T (bf16 or fp16) the operands' type.
#define QT_MMA_16816(TYPE)                                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                           \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                         \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
struct Mma {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) QT_MMA_16816("bf16");
    else QT_MMA_16816("f16");
  }
};
#undef QT_MMA_16816

// ---- project: out = x a^T ----
// A CTA takes 128 rows of x (16 a warp) and one slice of K; the K slices of a row tile are one thread-block cluster
// whose CTAs add their partial sums through distributed shared memory in rank order. Rows a CTA: a (r rows, from L2)
// is staged once for 128 rows of x, not for 32 (the first version's: 32 rows a CTA read 1.5 times as many bytes of a
// from L2 as of x from HBM at r 48, and ran at 35-60% of the bandwidth on an H100).
constexpr int kProjRows = 128;                 // rows of x a CTA
constexpr int kProjK = 64;                     // columns of x (and a) a stage
constexpr int kProjLd = kProjK + kPad;         // a staged row, elements (144 bytes: 9 16-byte units, odd)
constexpr int kProjThreads = 256;              // 8 warps, 16 rows each
constexpr int kProjStages = 4;
constexpr int proj_pairs(int nt) { return (nt + 1) / 2; }          // n-tile pairs (a's rows staged: 16 a pair)
constexpr int proj_red_ld(int nt) { return proj_pairs(nt) * 16 + 4; }  // a row of the partial sums (fp32)
constexpr size_t proj_stage_elems(int nt) { return size_t(kProjRows + proj_pairs(nt) * 16) * kProjLd; }
constexpr size_t proj_smem(int nt) {
  return kProjStages * proj_stage_elems(nt) * 2 > size_t(kProjRows) * proj_red_ld(nt) * 4
             ? kProjStages * proj_stage_elems(nt) * 2
             : size_t(kProjRows) * proj_red_ld(nt) * 4;
}

// NT: n-tiles of 8 columns of out (r <= 8 NT). blockIdx.x: the row tile; blockIdx.y: the K slice (k_slice columns,
// a multiple of kProjK), the cluster rank.
template <typename T, int NT>
__global__ void __launch_bounds__(kProjThreads) lora_project_kernel(const T* __restrict__ x, int64_t ld_x,
                                                                    const T* __restrict__ a, int64_t ld_a,
                                                                    T* __restrict__ out, int64_t ld_out, int64_t M,
                                                                    int64_t K, int r, int64_t k_slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int NP = proj_pairs(NT), AR = NP * 16, RL = proj_red_ld(NT);
  constexpr int kVecs = kProjK / 8;  // 16-byte vectors a staged row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kProjRows;
  const int64_t kb = static_cast<int64_t>(blockIdx.y) * k_slice;
  const int64_t ke = kb + k_slice < K ? kb + k_slice : K;
  const int64_t chunks = ke > kb ? (ke - kb + kProjK - 1) / kProjK : 0;

  auto load = [&](int stage, int64_t chunk) {
    T* xs = smem + stage * proj_stage_elems(NT);
    T* as = xs + kProjRows * kProjLd;
    const int64_t k0 = kb + chunk * kProjK;
    for (int c = tid; c < kProjRows * kVecs; c += kProjThreads) {
      const int rr = c / kVecs, cc = (c % kVecs) * 8;
      const bool ok = row0 + rr < M && k0 + cc < ke;
      cp_async16(xs + rr * kProjLd + cc, ok ? x + (row0 + rr) * ld_x + k0 + cc : x, ok);
    }
    for (int c = tid; c < AR * kVecs; c += kProjThreads) {
      const int rr = c / kVecs, cc = (c % kVecs) * 8;
      const bool ok = rr < r && k0 + cc < ke;
      cp_async16(as + rr * kProjLd + cc, ok ? a + rr * ld_a + k0 + cc : a, ok);
    }
  };

  float acc[2 * NP][4];
#pragma unroll
  for (int i = 0; i < 2 * NP; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

#pragma unroll
  for (int s = 0; s < kProjStages - 1; ++s) {
    if (s < chunks) load(s, s);
    cp_async_commit();
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    cp_async_wait<kProjStages - 2>();
    __syncthreads();  // chunk's stage landed for every thread; the stage read in the last iteration is free
    if (chunk + kProjStages - 1 < chunks)
      load(static_cast<int>((chunk + kProjStages - 1) % kProjStages), chunk + kProjStages - 1);
    cp_async_commit();
    const T* xs = smem + static_cast<int>(chunk % kProjStages) * proj_stage_elems(NT);
    const T* as = xs + kProjRows * kProjLd;
#pragma unroll
    for (int ks = 0; ks < kProjK / 16; ++ks) {
      const int kk = ks * 16;
      uint32_t af[4];
      ldmatrix_x4(af, xs + (warp * 16 + lane % 16) * kProjLd + kk + (lane / 16) * 8);
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        uint32_t bf[4];
        ldmatrix_x4(bf, as + (p * 16 + (lane / 16) * 8 + lane % 8) * kProjLd + kk + ((lane / 8) % 2) * 8);
        Mma<T>::run(acc[2 * p], af, bf[0], bf[1]);
        Mma<T>::run(acc[2 * p + 1], af, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  // This CTA's partial sums, [kProjRows][RL]; the cluster's ranks add theirs in rank order.
  float* red = reinterpret_cast<float*>(smem_raw);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < 2 * NP; ++n) {
    float* base = red + (warp * 16 + g) * RL + n * 8 + 2 * t;
    base[0] = acc[n][0];
    base[1] = acc[n][1];
    base[8 * RL] = acc[n][2];
    base[8 * RL + 1] = acc[n][3];
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every rank's partial sums written
  const int ranks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  for (int e = rank * kProjThreads + tid; e < kProjRows * AR; e += ranks * kProjThreads) {
    const int rr = e / AR, cc = e % AR;
    if (row0 + rr >= M || cc >= r) continue;
    float v = 0.f;
    for (int q = 0; q < ranks; ++q) v += cluster.map_shared_rank(red, q)[rr * RL + cc];
    out[(row0 + rr) * ld_out + cc] = from_f<T>(v);
  }
  cluster.sync();  // no rank's shared memory released while another reads it
#else
  __trap();
#endif
}

// ---- grads: out = alpha g^T x (fp32) ----
constexpr int kGradTokens = 64;               // tokens a stage
constexpr int kGradCols = 128;                // columns of x a CTA (16 a warp)
constexpr int kGradLd = kGradCols + kPad;     // a staged row of x, elements
constexpr int kGradRedLd = kGradCols + 1;     // a row of the partial sums (fp32): column reads conflict-free
constexpr int kGradThreads = 256;
constexpr int kGradStages = 4;
constexpr int grad_gld(int mt) { return mt * 16 + kPad; }  // a staged row of g
constexpr size_t grad_stage_elems(int mt) { return size_t(kGradTokens) * (kGradLd + grad_gld(mt)); }
constexpr size_t grad_smem(int mt) {
  return kGradStages * grad_stage_elems(mt) * 2 > size_t(mt) * 16 * kGradRedLd * 4
             ? kGradStages * grad_stage_elems(mt) * 2
             : size_t(mt) * 16 * kGradRedLd * 4;
}

struct GradParams {
  LoraGradJob jobs[kLoraGradMaxJobs];
  int first_tile[kLoraGradMaxJobs + 1];  // each job's first column tile (blockIdx.x), and the total
  int njobs;
  int64_t M, slice;  // tokens, and tokens a cluster rank (blockIdx.y) takes
};

// MT: m-tiles of 16 rows of g^T (every job's r <= 16 MT).
template <typename T, int MT>
__global__ void __launch_bounds__(kGradThreads) lora_grad_kernel(const __grid_constant__ GradParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int GL = grad_gld(MT), kXVecs = kGradCols / 8, kGVecs = MT * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  int j = 0;
  while (j + 1 < p.njobs && p.first_tile[j + 1] <= static_cast<int>(blockIdx.x)) ++j;
  const LoraGradJob& job = p.jobs[j];
  const T* x = static_cast<const T*>(job.x);
  const T* g = static_cast<const T*>(job.g);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x - p.first_tile[j]) * kGradCols;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * p.slice;
  const int64_t t1 = t0 + p.slice < p.M ? t0 + p.slice : p.M;
  const int64_t chunks = t1 > t0 ? (t1 - t0 + kGradTokens - 1) / kGradTokens : 0;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int r = static_cast<int>(job.r);
  const int64_t n = job.n;

  auto load = [&](int stage, int64_t chunk) {
    T* xs = smem + stage * grad_stage_elems(MT);
    T* gs = xs + kGradTokens * kGradLd;
    const int64_t tb = t0 + chunk * kGradTokens;
    for (int c = tid; c < kGradTokens * kXVecs; c += kGradThreads) {
      const int rr = c / kXVecs, cc = (c % kXVecs) * 8;
      const bool ok = tb + rr < t1 && c0 + cc < n;
      cp_async16(xs + rr * kGradLd + cc, ok ? x + (tb + rr) * job.ld_x + c0 + cc : x, ok);
    }
    for (int c = tid; c < kGradTokens * kGVecs; c += kGradThreads) {
      const int rr = c / kGVecs, cc = (c % kGVecs) * 8;
      const bool ok = tb + rr < t1 && cc < r;
      cp_async16(gs + rr * GL + cc, ok ? g + (tb + rr) * job.ld_g + cc : g, ok);
    }
  };

  float acc[MT][2][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][q][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kGradStages - 1; ++s) {
    if (s < chunks) load(s, s);
    cp_async_commit();
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    cp_async_wait<kGradStages - 2>();
    __syncthreads();
    if (chunk + kGradStages - 1 < chunks) load(static_cast<int>((chunk + kGradStages - 1) % kGradStages), chunk + kGradStages - 1);
    cp_async_commit();
    const T* xs = smem + static_cast<int>(chunk % kGradStages) * grad_stage_elems(MT);
    const T* gs = xs + kGradTokens * kGradLd;
#pragma unroll
    for (int ks = 0; ks < kGradTokens / 16; ++ks) {
      const int kk = ks * 16;
      uint32_t bf[4];  // x's 16 tokens x this warp's 16 columns: b0, b1 of its two n-tiles
      ldmatrix_x4_trans(bf, xs + (kk + lane % 8 + ((lane / 8) % 2) * 8) * kGradLd + warp * 16 + (lane / 16) * 8);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        uint32_t af[4];  // g^T's rows 16 m.., the same 16 tokens
        ldmatrix_x4_trans(af, gs + (kk + lane % 8 + (lane / 16) * 8) * GL + m * 16 + ((lane / 8) % 2) * 8);
        Mma<T>::run(acc[m][0], af, bf[0], bf[1]);
        Mma<T>::run(acc[m][1], af, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem_raw);  // [MT * 16][kGradRedLd]: this CTA's partial sums
  const int gr = lane / 4, t = lane % 4;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int row = m * 16 + gr, col = warp * 16 + q * 8 + 2 * t;
      red[row * kGradRedLd + col] = acc[m][q][0];
      red[row * kGradRedLd + col + 1] = acc[m][q][1];
      red[(row + 8) * kGradRedLd + col] = acc[m][q][2];
      red[(row + 8) * kGradRedLd + col + 1] = acc[m][q][3];
    }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every rank's partial sums written
  const int ranks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  constexpr int kElems = MT * 16 * kGradCols;
  for (int e = rank * kGradThreads + tid; e < kElems; e += ranks * kGradThreads) {
    // transposed output ([N, r]): consecutive threads take consecutive rows of g^T (out's contiguous index)
    const int i = job.transposed ? e % (MT * 16) : e / kGradCols;
    const int c = job.transposed ? e / (MT * 16) : e % kGradCols;
    if (i >= r || c0 + c >= n) continue;
    float v = 0.f;
    for (int q = 0; q < ranks; ++q) v += cluster.map_shared_rank(red, q)[i * kGradRedLd + c];
    v *= job.alpha;
    if (job.transposed) job.out[(c0 + c) * job.ld_out + i] = v;
    else job.out[i * job.ld_out + c0 + c] = v;
  }
  cluster.sync();  // no rank's shared memory released while another reads it
#else
  __trap();
#endif
}

template <typename F>
void dispatch_half(ElemType type, F&& f) {
  switch (type) {
    case ElemType::Float16: f(__half{}); break;
    case ElemType::BFloat16: f(__nv_bfloat16{}); break;
    default: fail(ErrorKind::Internal, "lora_gemm kernels: fp16 or bf16 only");
  }
}

// f(std::integral_constant<int, N>) for N = n in 1..kMax.
template <int N, int kMax, typename F>
void dispatch_tiles(int n, F&& f) {
  if constexpr (N <= kMax) {
    if (n == N) f(std::integral_constant<int, N>{});
    else dispatch_tiles<N + 1, kMax>(n, std::forward<F>(f));
  } else {
    fail(ErrorKind::Internal, "lora_gemm kernels: rank out of range");
  }
}

// The ranks a cluster (a power of two, at most 8) that split `extent` (K or the tokens) over `tiles` tiles: the most that
// keep every CTA resident at once, each rank with at least `min_per_rank` of the extent.
template <typename K>
int resident_ranks(K* kernel, int threads, size_t smem, int64_t tiles, int64_t extent, int64_t min_per_rank) {
  int device = 0, sms = 0, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  const int64_t resident = static_cast<int64_t>(sms) * std::max(per_sm, 1);
  int ranks = 1;
  while (ranks < 8 && tiles * ranks * 2 <= resident && extent >= 2 * ranks * min_per_rank) ranks *= 2;
  return ranks;
}

// kernel<<<grid, threads, smem, stream>>>(args...) with thread-block clusters of `ranks` CTAs along y.
template <typename... KArgs, typename... Args>
void launch_cluster(void (*kernel)(KArgs...), dim3 grid, int threads, size_t smem, int ranks, CUstream_st* stream,
                    Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = static_cast<unsigned>(ranks);
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace

bool lora_gemm_kernels_built(int device) {
  cudaFuncAttributes attr{};
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (cudaFuncGetAttributes(&attr, lora_project_kernel<__nv_bfloat16, 2>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9 && attr.binaryVersion >= 90;
}

int lora_project_launch(const void* x, int64_t ld_x, const void* a, int64_t ld_a, void* out, int64_t ld_out,
                        int64_t M, int64_t K, int64_t r, int cluster, ElemType type, CUstream_st* stream) {
  QT_CHECK(r >= 1 && r <= kLoraGemmMaxRank && K % 8 == 0 && ld_x % 8 == 0 && ld_a % 8 == 0 &&
               reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0,
           ErrorKind::Internal, "lora_project kernel: r <= 128, K and strides multiples of 8, 16-byte aligned");
  QT_CHECK(cluster >= 0 && cluster <= 8 && (cluster & (cluster - 1)) == 0, ErrorKind::Internal,
           "lora_project kernel: a cluster of 1, 2, 4 or 8");
  if (M == 0) return 0;
  const int64_t tiles = (M + kProjRows - 1) / kProjRows;
  QT_CHECK(tiles < (int64_t{1} << 31), ErrorKind::Internal, "lora_project kernel: too many rows");
  dispatch_half(type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_tiles<1, kLoraGemmMaxRank / 8>(static_cast<int>((r + 7) / 8), [&](auto nt) {
      constexpr int NT = decltype(nt)::value;
      auto* k = lora_project_kernel<T, NT>;
      const size_t smem = proj_smem(NT);
      cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      // K split over the ranks where the row tiles alone leave SMs idle: at least 16 stages a rank.
      if (cluster == 0) cluster = resident_ranks(k, kProjThreads, smem, tiles, K, 16 * kProjK);
      const int64_t slice = ((K + cluster - 1) / cluster + kProjK - 1) / kProjK * kProjK;
      launch_cluster(k, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cluster), 1), kProjThreads, smem,
                     cluster, stream, static_cast<const T*>(x), ld_x, static_cast<const T*>(a), ld_a,
                     static_cast<T*>(out), ld_out, M, K, static_cast<int>(r), slice);
    });
  });
  check_launch("lora_project");
  return cluster;
}

int lora_grad_launch(const LoraGradJob* jobs, int njobs, int64_t M, int cluster, ElemType type, CUstream_st* stream) {
  QT_CHECK(njobs >= 1 && njobs <= kLoraGradMaxJobs, ErrorKind::Internal, "lora_grad kernel: 1 to 4 jobs");
  GradParams p{};
  int64_t max_r = 1, tiles = 0;
  for (int i = 0; i < njobs; ++i) {
    const LoraGradJob& j = jobs[i];
    QT_CHECK(j.r >= 1 && j.r <= kLoraGemmMaxRank && j.r % 8 == 0 && j.n % 8 == 0 && j.ld_g % 8 == 0 &&
                 j.ld_x % 8 == 0 && reinterpret_cast<uintptr_t>(j.g) % 16 == 0 &&
                 reinterpret_cast<uintptr_t>(j.x) % 16 == 0,
             ErrorKind::Internal, "lora_grad kernel: r <= 128, r, N and strides multiples of 8, 16-byte aligned");
    p.jobs[i] = j;
    p.first_tile[i] = static_cast<int>(tiles);
    tiles += (j.n + kGradCols - 1) / kGradCols;
    max_r = std::max(max_r, j.r);
  }
  QT_CHECK(tiles < (int64_t{1} << 30), ErrorKind::Internal, "lora_grad kernel: too many columns");
  p.first_tile[njobs] = static_cast<int>(tiles);
  p.njobs = njobs;
  p.M = M;
  const int mt = static_cast<int>((max_r + 15) / 16);
  QT_CHECK(cluster >= 0 && cluster <= 8 && (cluster & (cluster - 1)) == 0, ErrorKind::Internal,
           "lora_grad kernel: a cluster of 1, 2, 4 or 8");
  dispatch_half(type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_tiles<1, kLoraGemmMaxRank / 16>(mt, [&](auto m) {
      constexpr int MT = decltype(m)::value;
      auto* k = lora_grad_kernel<T, MT>;
      const size_t smem = grad_smem(MT);
      cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      // Tokens split over the ranks where the column tiles alone leave SMs idle: at least 4 stages a rank.
      if (cluster == 0) cluster = resident_ranks(k, kGradThreads, smem, tiles, M, 4 * kGradTokens);
      const int64_t slice = (M + cluster - 1) / cluster;
      p.slice = (slice + kGradTokens - 1) / kGradTokens * kGradTokens;
      launch_cluster(k, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cluster), 1), kGradThreads, smem,
                     cluster, stream, p);
    });
  });
  check_launch("lora_grad");
  return cluster;
}

}  // namespace qt::kernels
