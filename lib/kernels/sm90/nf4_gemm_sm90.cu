// The NF4 GEMM for Hopper (sm_90a): y = x W^T, W dequantized from NF4 into shared memory inside the main loop.
// Interface and contract: nf4_gemm_sm90.h. Reference: nf4_linear_ref (lib/kernels/nf4_gemm.cpp), the dequantized
// weight through ATen's matmul; the [gpu] tests in tests/test_nf4_gpu.cpp hold the two together.
//
// One CTA computes a 256 x 128 tile of y in steps of 64 columns of K, with three warpgroups:
//   - warpgroup 0, the producer, fills a ring of kStages shared-memory stages. For each step it copies x's
//     256 x 64 tile with cp.async (completion reported to the stage's "full" mbarrier by
//     cp.async.mbarrier.arrive), and decodes W's 128 x 64 NF4 tile (4 KB of codes, one scale a row: the step is
//     one quantization block wide) into bf16 in registers, storing it with 16-byte stores; the codes of the
//     next two steps are loaded ahead into registers, so the decoding never waits on device memory.
//   - warpgroups 1 and 2, the consumers, each own 128 rows of the tile: two wgmma m64n128k16 chains (fp32
//     accumulators in registers, 128 a thread), both operands read from shared memory by descriptor. A stage is
//     handed back to the producer (its "empty" mbarrier) once the wgmma group that read it has completed.
// Both tiles are stored K-major in the 128-byte swizzled layout wgmma reads (each 128-byte row's 16-byte chunk c
// at c ^ (row % 8)), which also keeps the producer's 16-byte stores free of bank conflicts.
// The decoded values are those of nf4_dequant.cu bit for bit (the scale's multiply and add rounded apart, each
// value's multiply rounded, then round-to-nearest-even to bf16), so the products are the reference's; only the
// order of the fp32 sums differs.
// Variants 5-9 (below, "Variant 5") turn the product around, y^T = W x^T, so that the decoded W is wgmma's A
// operand in registers and never passes through shared memory, whose bandwidth bounds the design above (its
// wgmma reads both operands from there); 8 and 9 run on a persistent grid.
#include <cuda.h>  // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (the encoding function comes through the runtime: no link to libcuda)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lib/kernels/sm90/nf4_gemm_sm90.h"

namespace qt::kernels::sm90 {
namespace {

constexpr int kBM = kNf4GemmTileM;
constexpr int kBN = kNf4GemmTileN;
constexpr int kBK = kNf4GemmTileK;
constexpr int kStages = 4;
constexpr int kABytes = kBM * kBK * 2;         // 32 KB a stage
constexpr int kBBytes = kBN * kBK * 2;         // 16 KB a stage
constexpr int kRing = kStages * (kABytes + kBBytes);
constexpr int kTableFloats = 16 + 256;  // a weight's NF4 code table, then its nested map
constexpr int kSmemBytes = 1024 + kRing + 2 * kStages * 8 + kNf4GemmMaxWeights * kTableFloats * 4;  // +1024: alignment slack

// Threads and registers with PW producer warpgroups. One producer warpgroup: 168 registers a thread at entry
// (65536 / 384, rounded down to 8); the producer gives back to 104, the consumers take 192 (128 * 104 + 256 * 192 =
// 62464 <= 384 * 168). Two: 128 at entry, the producers 72 and the consumers 184 (256 * 72 + 256 * 184 = 65536).
template <int PW>
struct Shape;
template <>
struct Shape<1> {
  static constexpr int kThreads = 384, kProducerThreads = 128, kProducerRegs = 104, kConsumerRegs = 192;
};
template <>
struct Shape<2> {
  static constexpr int kThreads = 512, kProducerThreads = 256, kProducerRegs = 72, kConsumerRegs = 184;
};

struct Params {
  Nf4GemmArgs a;
  int32_t tile_begin[kNf4GemmMaxWeights + 1];  // first N tile of each weight; tile_begin[n_weights] = N tiles
  int32_t m_tiles;
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// 16 bytes from global to shared, zero-filled where src_bytes is 0 (rows past m).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// The stage's mbarrier receives one arrival once all of this thread's earlier cp.async have landed.
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses to the accumulators across the asynchronous wgmma instructions.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1) << 16;           // leading byte offset (unused for swizzled K-major)
  d |= static_cast<uint64_t>(1024 >> 4) << 32;   // stride byte offset: the next 8 rows
  d |= static_cast<uint64_t>(1) << 62;           // 128-byte swizzle
  return d;
}

// wgmma m64n128k16, bf16 x bf16 -> f32, both operands K-major in shared memory (descriptors): D = A B + (scale_d ? D : 0).
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63},"
      " %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a K-major 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// The codes and scale inputs of one half row (32 elements) of W's tile for one step.
struct Raw {
  uint4 codes;
  uint32_t q;     // absmax_q of the row's block
  float nested;   // nested_absmax of that block's group of 256
};

__device__ __forceinline__ Raw load_raw(const Nf4GemmWeight& w, int64_t row, int k, int kt, int half) {
  const int64_t block = row * (k / kBK) + kt;
  Raw r;
  r.codes = __ldg(reinterpret_cast<const uint4*>(w.packed + row * (k / 2) + kt * (kBK / 2) + half * 16));
  r.q = __ldg(w.absmax_q + block);
  r.nested = __ldg(w.nested_absmax + (block >> 8));
  return r;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(out) : "r"(a), "r"(b), "r"(sel));
  return out;
}

// Decodes a half row into its four 16-byte chunks of the swizzled tile.
__device__ __forceinline__ void decode_store(const Raw& r, const float* code, const float* nmap, float offset,
                                             unsigned char* tile, int row, int half) {
  // scale = nested_map[q] * nested + offset, multiply and add rounded apart (as nf4_dequant.cu).
  const float scale = __fadd_rn(__fmul_rn(nmap[r.q], r.nested), offset);
  const uint32_t words[4] = {r.codes.x, r.codes.y, r.codes.z, r.codes.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t o[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (words[w] >> (8 * b)) & 0xFFu;  // high nibble: the earlier element
      o[b] = pack_bf16(__fmul_rn(code[byte >> 4], scale), __fmul_rn(code[byte & 0xFu], scale));
    }
    *reinterpret_cast<uint4*>(tile + swizzled(row, half * 4 + w)) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

// Stores one consumer's 64 x 128 accumulator tile (rows from r_first, columns from col0) as bf16, adding y's
// values first where the call accumulates. The accumulator fragment of m64nNk16: warp r of the warpgroup owns
// rows 16 r .. 16 r + 15; lane l rows l / 4 and l / 4 + 8, columns 8 i + 2 (l % 4) + {0, 1} in registers
// 4 i + {0, 1} and 4 i + {2, 3}.
__device__ __forceinline__ void store_tile(const float (&acc)[64], const Nf4GemmArgs& a, int64_t r_first,
                                           int64_t col0, int wt) {
  const int warp = wt >> 5, lane = wt & 31;
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y);
  const int64_t r0 = r_first + warp * 16 + (lane >> 2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = r0 + 8 * h;
    if (row >= a.m) continue;
    __nv_bfloat16* yrow = y + row * a.ldy + col0 + (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < kBN / 8; ++i) {
      float v0 = acc[4 * i + 2 * h], v1 = acc[4 * i + 2 * h + 1];
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(yrow + 8 * i);
      if (a.accumulate) {
        const float2 old = __bfloat1622float2(*dst);
        v0 += old.x;
        v1 += old.y;
      }
      *dst = __floats2bfloat162_rn(v0, v1);
    }
  }
}

// A CTA's tile and its shared memory: the ring of stages, its mbarriers (full: `full_count` arrivals a phase;
// empty: one a consumer warpgroup), the NF4 code table and nested map of the tile's weight, loaded and initialized
// before one block-wide barrier.
struct Tile {
  unsigned char* ring_a;
  unsigned char* ring_b;
  uint64_t* full;
  uint64_t* empty;
  float* tables;  // every weight's code table and nested map (kTableFloats each)
  float* code_s;  // the tile's weight's
  float* nmap_s;
  const Nf4GemmWeight* w;  // the weight whose rows the tile's columns are
  int w_index;             // its index in the call's weights
  int64_t w_row0;          // its first row in the tile
  int64_t y_col0;          // the tile's first column of y
  int64_t m0;              // the tile's first row of x and y
  int k_nf4;               // steps over the NF4 weight's columns
  int k_steps;             // then over the tail's
  int cluster_rank;        // the CTA's rank in a cluster of two sharing x's tiles (variant 11), else -1
  uint32_t peer_empty;     // the other CTA's empty barriers (a shared::cluster address), else 0
};

// Points t at tile `tile` (m tiles fastest): its weight, tables and coordinates.
__device__ __forceinline__ void locate(const Params& p, int tile, Tile& t) {
  const Nf4GemmArgs& a = p.a;
  const int m_tile = tile % p.m_tiles;
  const int n_tile = tile / p.m_tiles;
  int j = 0;
  while (j + 1 < a.n_weights && n_tile >= p.tile_begin[j + 1]) ++j;
  t.w = &a.w[j];
  t.w_index = j;
  t.code_s = t.tables + j * kTableFloats;
  t.nmap_s = t.code_s + 16;
  t.w_row0 = static_cast<int64_t>(n_tile - p.tile_begin[j]) * kBN;
  t.y_col0 = static_cast<int64_t>(n_tile) * kBN;
  t.m0 = static_cast<int64_t>(m_tile) * kBM;
  t.k_nf4 = a.k / kBK;
  t.k_steps = t.k_nf4 + (a.k_tail + kBK - 1) / kBK;
}

__device__ __forceinline__ Tile setup_tile(const Params& p, unsigned char* smem_raw, uint32_t full_count,
                                           uint32_t empty_count = 2) {
  Tile t;
  t.cluster_rank = -1;
  t.peer_empty = 0;
  // Swizzled tiles must start on 1024-byte boundaries (the swizzle is taken from address bits 7-9).
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  t.ring_a = smem;
  t.ring_b = smem + kStages * kABytes;
  t.full = reinterpret_cast<uint64_t*>(smem + kRing);
  t.empty = t.full + kStages;
  t.tables = reinterpret_cast<float*>(t.empty + kStages);
  locate(p, static_cast<int>(blockIdx.x), t);
  const Nf4GemmArgs& a = p.a;
  const int tid = threadIdx.x;
  for (int i = tid; i < a.n_weights * kTableFloats; i += static_cast<int>(blockDim.x)) {
    const int j = i / kTableFloats, e = i % kTableFloats;
    t.tables[i] = e < 16 ? __ldg(a.w[j].quant_map + e) : __ldg(a.w[j].nested_map + (e - 16));
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_addr(t.full + s), full_count);
      mbar_init(smem_addr(t.empty + s), empty_count);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  return t;
}

// A consumer warpgroup's part of a tile: rows cw * 128 .. + 127 (cw 0 or 1; wt its thread, 0..127), two wgmma
// chains over the tile's k_steps stages of the ring as they fill, each stage handed back once the group that read it has
// completed, then the tile's store.
__device__ __forceinline__ void consume(const Nf4GemmArgs& a, const Tile& t, int cw, int wt) {
  unsigned char *ring_a = t.ring_a, *ring_b = t.ring_b;
  uint64_t *full = t.full, *empty = t.empty;
  const int64_t m0 = t.m0, y_col0 = t.y_col0;
  const int k_steps = t.k_steps;
  // No initialization: the first step's first wgmma ignores D (scale_d 0). An instruction other than wgmma
  // writing the accumulators between the wgmmas would make ptxas serialize them (its warning C7515).
  float acc0[64], acc1[64];
  for (int kt = 0; kt < k_steps; ++kt) {
    const int s = kt % kStages;
    mbar_wait(smem_addr(full + s), static_cast<uint32_t>(kt / kStages) & 1u);
    fence_proxy_async();
    const uint32_t a0 = smem_addr(ring_a + s * kABytes) + cw * 128 * 128;
    const uint32_t b0 = smem_addr(ring_b + s * kBBytes);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint64_t db = smem_desc(b0 + kk * 32);
      const uint32_t scale_d = (kt > 0 || kk > 0) ? 1u : 0u;
      wgmma_m64n128k16(acc0, smem_desc(a0 + kk * 32), db, scale_d);
      wgmma_m64n128k16(acc1, smem_desc(a0 + 64 * 128 + kk * 32), db, scale_d);
    }
    wgmma_commit();
    wgmma_wait<1>();  // the previous step's group has read its stage
    if (kt > 0 && wt == 0) mbar_arrive(smem_addr(empty + (kt - 1) % kStages));
  }
  wgmma_wait<0>();
  fence_regs(acc0);
  fence_regs(acc1);
  store_tile(acc0, a, m0 + cw * 128, y_col0, wt);
  store_tile(acc1, a, m0 + cw * 128 + 64, y_col0, wt);
}

// PW producer warpgroups (1 or 2), then the 2 consumer warpgroups. kDecode false: the producer stores the raw
// codes instead of decoding them (wrong values: bench_nf4_gemm's ceiling of the pipeline without the decoding).
template <int PW, bool kDecode>
__global__ void __launch_bounds__(Shape<PW>::kThreads, 1) nf4_gemm_kernel(const __grid_constant__ Params p) {
  using S = Shape<PW>;
  constexpr int PT = S::kProducerThreads;
  constexpr int kHalves = 256 / PT;  // half rows of W's tile a producer thread decodes (2 or 1)
  constexpr int kChunks = 2048 / PT;  // 16-byte chunks of x's tile a producer thread copies (16 or 8)
  extern __shared__ unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const Tile t = setup_tile(p, smem_raw, PT + PT / 32);  // a cp.async arrival a producer thread, a decoder a warp
  const Nf4GemmArgs& a = p.a;
  const Nf4GemmWeight& w = *t.w;

  if (tid < PT) {  // ----------------------------------------------------------------- producers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(S::kProducerRegs));
    const int half = tid & 1;
    int rows[kHalves];  // this thread's half rows of W's tile
#pragma unroll
    for (int h = 0; h < kHalves; ++h) rows[h] = (tid >> 1) + h * (PT / 2);
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);
    // x's tile: 256 rows x 8 chunks; a thread copies chunk tid % 8 of rows tid / 8 + (PT / 8) i (one swizzle row).
    const int a_row = tid >> 3, a_chunk = tid & 7;
    const uint32_t a_dst0 = swizzled(a_row, a_chunk);
    const int64_t a_step = (PT / 8) * a.ldx;
    const __nv_bfloat16* a_src0 = x + (t.m0 + a_row) * a.ldx + a_chunk * 8;
    // Rows of x this thread copies that exist (the rest of the last tile's rows are zero-filled).
    const int64_t left = a.m - t.m0 - a_row;
    const int a_rows =
        left <= 0 ? 0 : static_cast<int>(left >= int64_t{kChunks} * (PT / 8) ? kChunks : (left + PT / 8 - 1) / (PT / 8));
    Raw cur[kHalves], nxt[kHalves];
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
      cur[h] = load_raw(w, t.w_row0 + rows[h], a.k, 0, half);
      if (t.k_nf4 > 1) nxt[h] = load_raw(w, t.w_row0 + rows[h], a.k, 1, half);
    }
    const __nv_bfloat16* tail = static_cast<const __nv_bfloat16*>(a.tail);
    for (int kt = 0; kt < t.k_steps; ++kt) {
      const int s = kt % kStages;
      const uint32_t round = static_cast<uint32_t>(kt / kStages);
      Raw ahead[kHalves];
#pragma unroll
      for (int h = 0; h < kHalves; ++h)
        if (kt + 2 < t.k_nf4) ahead[h] = load_raw(w, t.w_row0 + rows[h], a.k, kt + 2, half);
      mbar_wait(smem_addr(t.empty + s), (round & 1u) ^ 1u);  // a fresh barrier's "previous phase" passes at once
      {
        uint32_t dst = smem_addr(t.ring_a + s * kABytes) + a_dst0;
        const __nv_bfloat16* src = a_src0 + static_cast<int64_t>(kt) * kBK;
        const int rows_in = kt * kBK + a_chunk * 8 < a.k + a.k_tail ? a_rows : 0;  // past the tail: zeros
#pragma unroll 4
        for (int i = 0; i < kChunks; ++i, dst += (PT / 8) * 128, src += a_step) {
          const bool in = i < rows_in;
          cp_async16(dst, in ? src : x, in ? 16u : 0u);
        }
      }
      unsigned char* b_stage = t.ring_b + s * kBBytes;
      if (kt >= t.k_nf4) {  // a tail step: its 128 x 64 bf16 tile copied as x's is (zeros past k_tail)
        const int col0 = (kt - t.k_nf4) * kBK;
#pragma unroll 2
        for (int q = 0; q < 1024 / PT; ++q) {
          const int c = tid + PT * q, row = c >> 3, chunk = c & 7;
          const bool in = col0 + chunk * 8 < a.k_tail;
          const __nv_bfloat16* src = in ? tail + (t.y_col0 + row) * a.ld_tail + col0 + chunk * 8 : tail;
          cp_async16(smem_addr(b_stage) + swizzled(row, chunk), src, in ? 16u : 0u);
        }
      }
      cp_async_arrive(smem_addr(t.full + s));
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        if (kt >= t.k_nf4) break;
        if constexpr (kDecode) {
          decode_store(cur[h], t.code_s, t.nmap_s, w.offset, b_stage, rows[h], half);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q)
            *reinterpret_cast<uint4*>(b_stage + swizzled(rows[h], half * 4 + q)) = cur[h].codes;
        }
      }
      fence_proxy_async();  // the generic-proxy stores, before wgmma (async proxy) reads them
      __syncwarp();
      if ((tid & 31) == 0) mbar_arrive(smem_addr(t.full + s));  // the warp's stores, ordered by __syncwarp
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        cur[h] = nxt[h];
        nxt[h] = ahead[h];
      }
    }
  } else {  // -------------------------------------------------------------------------- consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(S::kConsumerRegs));
    consume(a, t, (tid - PT) >> 7, tid & 127);
  }
}

template <int PW, bool kDecode>
int launch(const Params& p, int64_t blocks, cudaStream_t stream) {
  constexpr int kSmem = kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(nf4_gemm_kernel<PW, kDecode>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (attr != cudaSuccess) return static_cast<int>(attr);
  nf4_gemm_kernel<PW, kDecode><<<static_cast<unsigned>(blocks), Shape<PW>::kThreads, kSmem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// ---- TMA: the bulk tensor copy engine, one arrival with the byte count a stage.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}

// One 2-D tile (column c0, row r0) of the tensor map into shared memory, completing on `bar`'s byte count;
// elements past the tensor's bounds arrive as zeros.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int r0, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(bar)
      : "memory");
}

// ---- Variant 5: W as wgmma's A operand, decoded into registers. The product is computed transposed, y^T = W x^T:
// the CTA's 128 rows of W are the M of two consumer warpgroups' wgmma m64n256k16 (64 rows each), x's 256 rows of
// the tile their N, so the decoded weight never passes through shared memory (there the default stores 16 KB a
// step and wgmma reads it back twice): x's 32 KB tile and W's 4 KB of codes arrive by TMA, each row's scale is
// computed by the producer warpgroup, and each consumer thread decodes its own A fragments (rows g and g + 8 of its
// warp's 16, 32 elements a step) straight from the codes. A tail step (LoRA's B terms, bf16) reads its tile from
// shared memory instead (wgmma with both operands by descriptor). The accumulators, W's rows by x's, go out
// through shared memory transposed (fp32), then to y in coalesced rows.
constexpr int kRsThreads = 384;
// Registers: 168 a thread at entry (65536 / 384, rounded down to 8); the producer gives back to 40, the consumers
// take 232 (128 * 40 + 256 * 232 = 64512).
constexpr int kRsProducerRegs = 40;
constexpr int kRsConsumerRegs = 232;
constexpr int kCodesBytes = kBN * kBK / 2;  // a step's codes: 128 rows x 32 bytes, then 128 fp32 scales
constexpr int kStagePitch = kBN + 4;        // fp32 words a row of x in the epilogue's transposed tile (no bank conflicts)
static_assert(kBM * kStagePitch * 4 <= kRing, "the epilogue's tile fits in the ring");

struct RsParams {
  CUtensorMap map_x;     // x [m, k + k_tail] bf16, boxes of 256 rows x 64 columns, 128-byte swizzle
  CUtensorMap map_tail;  // the tail [sum rows, k_tail] bf16, boxes of 128 x 64 (unused without a tail)
  CUtensorMap map_codes[kNf4GemmMaxWeights];  // each weight's codes, uint8 [rows, k / 2], boxes of 128 x 32
  Params p;
  int32_t x_box_rows;  // rows of map_x's box: 256, or 128 (variant 10's half tile; variant 11's half a CTA loads)
  int32_t cluster;     // 1: clusters of two CTAs, each loading half of x's tile for both (variant 11)
};

// ---- Clusters of two CTAs (variant 11): adjacent tiles of W's rows over the same rows of x, each CTA loading half
// of x's tile into both CTAs' shared memory (TMA multicast). A stage is free once both CTAs' consumers have handed
// it back: each consumer warpgroup arrives on its own CTA's empty barrier and on the other's.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// The shared::cluster address of `addr` (a shared::cta address) in the CTA of rank `rank`.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}

__device__ __forceinline__ void mbar_arrive_remote(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}

// Hands stage s back: the CTA's own empty barrier and, in a cluster, the other CTA's.
__device__ __forceinline__ void release_stage(const Tile& t, uint32_t s) {
  mbar_arrive(smem_addr(t.empty + s));
  if (t.peer_empty) mbar_arrive_remote(t.peer_empty + 8 * s);
}

// tma_load_2d into the same offset of both CTAs of the cluster, completing on each one's barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, int c0, int r0, uint32_t bar) {
  const uint16_t mask = 0x3;
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(bar), "h"(mask)
      : "memory");
}

// The 128 accumulator operands of a m64n256 wgmma: their place in the instruction, then their constraints.
#define QT_WGMMA_D128 \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define QT_WGMMA_D128_OPERANDS(d) \
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// wgmma m64n256k16, bf16 x bf16 -> f32: A (64 x 16, K-major) from four registers a thread (the m16n8k16 A
// fragment of each warp's 16 rows), B by descriptor from shared memory: D = A B + (scale_d ? D : 0).
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                    uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      QT_WGMMA_D128
      "},"
      " {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
      "}\n"
      :
      QT_WGMMA_D128_OPERANDS(d)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(scale_d));
}

// wgmma m64n256k16 with both operands K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b, uint32_t scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      QT_WGMMA_D128
      "},"
      " %128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      :
      QT_WGMMA_D128_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// The two elements of byte `sh / 8` of a code word (high nibble the earlier) as a bf16x2 A register.
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, int sh, const float* code, float scale) {
  const uint32_t hi = (word >> (sh + 4)) & 0xFu, lo = (word >> sh) & 0xFu;
  return pack_bf16(__fmul_rn(code[hi], scale), __fmul_rn(code[lo], scale));
}

// How a consumer turns W's codes into A fragments. kRaw: the code words themselves (wrong values:
// bench_nf4_gemm's ceiling without the decoding); kLut: each value looked up in the code table in shared memory
// and multiplied by its row's scale (variants 5, 7-11); kPlanes: the producer writes each row's 16 products of
// the step, bf16(code[q] * scale), as two 16-byte planes (their low bytes, their high bytes), and a consumer picks
// four values at a time out of them with byte permutes in registers (variants 12-15): no table lookup in shared
// memory and no multiply a value, the same bits as kLut.
enum Decode : int { kRaw = 0, kLut = 1, kPlanes = 2 };

// kPlanes: where row r's 16-byte chunk c (0, 1) of a 32-byte row lies, in the 32-byte swizzle (chunk c ^ bit 2 of
// r) in which TMA writes the codes: the rows g and g + 4 a warp reads together fall in different banks.
__device__ __forceinline__ int chunk32(int r, int c) { return r * 32 + ((c ^ ((r >> 2) & 1)) << 4); }

// kPlanes, one row's four values: `codes` holds in its low 16 bits the two code bytes of two pairs (the high
// nibble of a byte the pair's first value), lo / hi the row's planes (4 words each: the low and the high bytes of
// the products of codes 0-15). Returns the two pairs as bf16x2 registers (first value in the low half) in f0, f1.
__device__ __forceinline__ void decode_planes4(uint32_t codes, const uint32_t (&lo)[4], const uint32_t (&hi)[4],
                                               uint32_t& f0, uint32_t& f1) {
  // Nibbles n0..n3 of `codes`: the second and first value of pair 0, then of pair 1. A permute's selector nibble
  // picks one of 8 bytes (its bit 3 asks for the picked byte's sign instead), so codes 0-7 come from planes' words
  // 0-1, 8-15 from words 2-3, and the mask m (byte j 0xff where n_j >= 8, the signs of bits 3, 7, 11 and 15 moved
  // to bytes' top bits) chooses between them.
  const uint32_t sel = codes & 0x7777u;
  const uint32_t m = prmt(codes << 4, codes, 0xD9C8u);
  const uint32_t l = (prmt(lo[2], lo[3], sel) & m) | (prmt(lo[0], lo[1], sel) & ~m);
  const uint32_t u = (prmt(hi[2], hi[3], sel) & m) | (prmt(hi[0], hi[1], sel) & ~m);
  f0 = prmt(l, u, 0x4051u);  // value n1 (low half), then n0
  f1 = prmt(l, u, 0x6273u);  // n3, then n2
}

// A thread's A fragments of one step: rows r and r + 8 of the stage's codes (32 bytes a row), k16 chunk kk in
// registers 4 kk .. 4 kk + 3: (r, 2t..2t+1), (r + 8, 2t..), (r, 8 + 2t..), (r + 8, 8 + 2t..), t = lane % 4, whose
// bytes are byte t of the row's words 2 kk and 2 kk + 1 (sh = 8 t).
// kDecode: kRaw, kLut or kPlanes (above).
template <int kDecode>
__device__ __forceinline__ void decode_fragments(const unsigned char* stage, int r, int sh, const float* code,
                                                 uint32_t (&frag)[16]) {
  if constexpr (kDecode == kPlanes) {
    const unsigned char* planes = stage + kCodesBytes;
    uint32_t w[2][8], lo[2][4], hi[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r + 8 * h;
      const uint4 c0 = *reinterpret_cast<const uint4*>(stage + chunk32(row, 0));
      const uint4 c1 = *reinterpret_cast<const uint4*>(stage + chunk32(row, 1));
      const uint4 l = *reinterpret_cast<const uint4*>(planes + chunk32(row, 0));
      const uint4 u = *reinterpret_cast<const uint4*>(planes + chunk32(row, 1));
      w[h][0] = c0.x, w[h][1] = c0.y, w[h][2] = c0.z, w[h][3] = c0.w;
      w[h][4] = c1.x, w[h][5] = c1.y, w[h][6] = c1.z, w[h][7] = c1.w;
      lo[h][0] = l.x, lo[h][1] = l.y, lo[h][2] = l.z, lo[h][3] = l.w;
      hi[h][0] = u.x, hi[h][1] = u.y, hi[h][2] = u.z, hi[h][3] = u.w;
    }
    // Byte sh / 8 of words 2 kk and 2 kk + 1: the pairs (2 t, 2 t + 1) and (8 + 2 t, 9 + 2 t) of chunk kk.
    const uint32_t gather = static_cast<uint32_t>(sh / 8) | static_cast<uint32_t>(sh / 8 + 4) << 4;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        decode_planes4(prmt(w[h][2 * kk], w[h][2 * kk + 1], gather), lo[h], hi[h], frag[4 * kk + h],
                       frag[4 * kk + 2 + h]);
    return;
  }
  const uint4 p0 = *reinterpret_cast<const uint4*>(stage + r * 32);
  const uint4 p1 = *reinterpret_cast<const uint4*>(stage + r * 32 + 16);
  const uint4 q0 = *reinterpret_cast<const uint4*>(stage + (r + 8) * 32);
  const uint4 q1 = *reinterpret_cast<const uint4*>(stage + (r + 8) * 32 + 16);
  const float* scales = reinterpret_cast<const float*>(stage + kCodesBytes);
  const float s0 = scales[r], s1 = scales[r + 8];
  const uint32_t w0[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
  const uint32_t w1[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
  if constexpr (kDecode == kRaw) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      frag[4 * kk + 0] = w0[2 * kk] ^ __float_as_uint(s0);
      frag[4 * kk + 1] = w1[2 * kk] ^ __float_as_uint(s1);
      frag[4 * kk + 2] = w0[2 * kk + 1];
      frag[4 * kk + 3] = w1[2 * kk + 1];
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      frag[4 * kk + 0] = decode_pair(w0[2 * kk], sh, code, s0);
      frag[4 * kk + 1] = decode_pair(w1[2 * kk], sh, code, s1);
      frag[4 * kk + 2] = decode_pair(w0[2 * kk + 1], sh, code, s0);
      frag[4 * kk + 3] = decode_pair(w1[2 * kk + 1], sh, code, s1);
    }
  }
}

// One NF4 step of a consumer warpgroup (kt within the tile, g over the CTA's tiles: the ring's stage and phase):
// wait for the stage, decode, four wgmma, then hand back the stage of the group kDepth steps back once it has
// completed (kDepth groups stay in flight). `frag` must not be read by a wgmma still in flight: the caller rotates
// kDepth + 1 of them.
template <int kDecode, int kDepth>
__device__ __forceinline__ void rs_step(const Tile& t, int kt, uint32_t g, int r, int sh, int wt, uint32_t (&frag)[16],
                                        float (&acc)[128]) {
  const uint32_t s = g % kStages;
  mbar_wait(smem_addr(t.full + s), (g / kStages) & 1u);
  decode_fragments<kDecode>(t.ring_b + s * kBBytes, r, sh, t.code_s, frag);
  const uint32_t x0 = smem_addr(t.ring_a + s * kABytes);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk)
    wgmma_m64n256k16_rs(acc, frag[4 * kk], frag[4 * kk + 1], frag[4 * kk + 2], frag[4 * kk + 3],
                        smem_desc(x0 + kk * 32), (kt > 0 || kk > 0) ? 1u : 0u);
  wgmma_commit();
  wgmma_wait<kDepth>();
  if (kt >= kDepth && wt == 0) release_stage(t, (g - kDepth) % kStages);
}

// A tail step: the bf16 tile of the tail's 128 rows in the stage, this warpgroup's 64 of them by descriptor.
template <int kDepth>
__device__ __forceinline__ void ss_step(const Tile& t, int kt, uint32_t g, int cw, int wt, float (&acc)[128]) {
  const uint32_t s = g % kStages;
  mbar_wait(smem_addr(t.full + s), (g / kStages) & 1u);
  const uint32_t x0 = smem_addr(t.ring_a + s * kABytes);
  const uint32_t w0 = smem_addr(t.ring_b + s * kBBytes) + cw * 64 * 128;
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk)
    wgmma_m64n256k16_ss(acc, smem_desc(w0 + kk * 32), smem_desc(x0 + kk * 32), (kt > 0 || kk > 0) ? 1u : 0u);
  wgmma_commit();
  wgmma_wait<kDepth>();
  if (kt >= kDepth && wt == 0) release_stage(t, (g - kDepth) % kStages);
}

// A consumer warpgroup's main loop over one tile whose first step is the ring's g0-th; on return every wgmma has
// completed and the tile's last stages are handed back.
template <int kDecode, int kDepth>
__device__ __forceinline__ void rs_mainloop(const Tile& t, uint32_t g0, int cw, int r, int sh, int wt,
                                            float (&acc)[128]) {
  uint32_t frag0[16], frag1[16];
  int kt = 0;
  if constexpr (kDepth == 1) {
    for (; kt + 1 < t.k_nf4; kt += 2) {
      rs_step<kDecode, 1>(t, kt, g0 + kt, r, sh, wt, frag0, acc);
      rs_step<kDecode, 1>(t, kt + 1, g0 + kt + 1, r, sh, wt, frag1, acc);
    }
    if (kt < t.k_nf4) rs_step<kDecode, 1>(t, kt, g0 + kt, r, sh, wt, frag0, acc), ++kt;
  } else {
    uint32_t frag2[16];
    for (; kt + 2 < t.k_nf4; kt += 3) {
      rs_step<kDecode, 2>(t, kt, g0 + kt, r, sh, wt, frag0, acc);
      rs_step<kDecode, 2>(t, kt + 1, g0 + kt + 1, r, sh, wt, frag1, acc);
      rs_step<kDecode, 2>(t, kt + 2, g0 + kt + 2, r, sh, wt, frag2, acc);
    }
    if (kt < t.k_nf4) rs_step<kDecode, 2>(t, kt, g0 + kt, r, sh, wt, frag0, acc), ++kt;
    if (kt < t.k_nf4) rs_step<kDecode, 2>(t, kt, g0 + kt, r, sh, wt, frag1, acc), ++kt;
  }
  for (; kt < t.k_steps; ++kt) ss_step<kDepth>(t, kt, g0 + kt, cw, wt, acc);
  wgmma_wait<0>();
  fence_regs(acc);
  if (wt == 0)
    for (int d = t.k_steps > kDepth ? t.k_steps - kDepth : 0; d < t.k_steps; ++d)
      release_stage(t, (g0 + d) % kStages);
}

// The producer warpgroup's part of one tile: for each step, once its stage is free, x's tile and W's codes (or
// the tail's tile) by TMA from thread 0, and row tid's scale from each thread (its inputs loaded two steps ahead).
// With x_box_rows 128 and no cluster, only the first 128 of x's 256 rows of the tile are loaded (variant 10:
// wrong values, bench_nf4_gemm's ceiling of loading x's tile once for two CTAs); in a cluster each CTA loads its
// half of x's rows for both.
template <int kDecode>
__device__ __forceinline__ void rs_produce(const RsParams& rp, const Tile& t, uint32_t g0, int tid) {
  const Nf4GemmArgs& a = rp.p.a;
  const Nf4GemmWeight& w = *t.w;
  const int64_t block0 = (t.w_row0 + tid) * (a.k / kBK);
  uint32_t q_cur = __ldg(w.absmax_q + block0), q_nxt = 0;
  float n_cur = __ldg(w.nested_absmax + (block0 >> 8)), n_nxt = 0.f;
  if (t.k_nf4 > 1) {
    q_nxt = __ldg(w.absmax_q + block0 + 1);
    n_nxt = __ldg(w.nested_absmax + ((block0 + 1) >> 8));
  }
  const CUtensorMap* map_codes = &rp.map_codes[t.w_index];
  for (int kt = 0; kt < t.k_steps; ++kt) {
    const uint32_t g = g0 + kt, s = g % kStages;
    uint32_t q_ahead = 0;
    float n_ahead = 0.f;
    if (kt + 2 < t.k_nf4) {
      q_ahead = __ldg(w.absmax_q + block0 + kt + 2);
      n_ahead = __ldg(w.nested_absmax + ((block0 + kt + 2) >> 8));
    }
    mbar_wait(smem_addr(t.empty + s), ((g / kStages) & 1u) ^ 1u);
    const uint32_t bar = smem_addr(t.full + s);
    const bool tail_step = kt >= t.k_nf4;
    unsigned char* b_stage = t.ring_b + s * kBBytes;
    if (tid == 0) {
      // TMA (the async proxy) overwrites bytes an earlier round's scales were stored to (the generic proxy).
      fence_proxy_async();
      const uint32_t x_bytes = rp.cluster ? kABytes : rp.x_box_rows * kBK * 2;
      mbar_arrive_expect_tx(bar, x_bytes + (tail_step ? kBBytes : kCodesBytes));
      if (rp.cluster) {
        const int half = t.cluster_rank * (kBM / 2);
        tma_load_2d_multicast(smem_addr(t.ring_a + s * kABytes) + half * 128, &rp.map_x, kt * kBK,
                              static_cast<int>(t.m0) + half, bar);
      } else {
        tma_load_2d(smem_addr(t.ring_a + s * kABytes), &rp.map_x, kt * kBK, static_cast<int>(t.m0), bar);
      }
      if (tail_step)
        tma_load_2d(smem_addr(b_stage), &rp.map_tail, (kt - t.k_nf4) * kBK, static_cast<int>(t.y_col0), bar);
      else
        tma_load_2d(smem_addr(b_stage), map_codes, kt * (kBK / 2), static_cast<int>(t.w_row0), bar);
    }
    if (!tail_step) {  // scale = nested_map[q] * nested + offset, multiply and add rounded apart (as nf4_dequant.cu)
      const float scale = __fadd_rn(__fmul_rn(t.nmap_s[q_cur], n_cur), w.offset);
      if constexpr (kDecode == kPlanes) {
        // Row tid's 16 products bf16(code[q] * scale) (each multiply rounded, as nf4_dequant.cu), as two planes.
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float4 c = reinterpret_cast<const float4*>(t.code_s)[j];
          const uint32_t v0 = pack_bf16(__fmul_rn(c.x, scale), __fmul_rn(c.y, scale));
          const uint32_t v1 = pack_bf16(__fmul_rn(c.z, scale), __fmul_rn(c.w, scale));
          lo[j] = prmt(v0, v1, 0x6420u);
          hi[j] = prmt(v0, v1, 0x7531u);
        }
        unsigned char* planes = b_stage + kCodesBytes;
        *reinterpret_cast<uint4*>(planes + chunk32(tid, 0)) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
        *reinterpret_cast<uint4*>(planes + chunk32(tid, 1)) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
      } else {
        reinterpret_cast<float*>(b_stage + kCodesBytes)[tid] = scale;
      }
    }
    __syncwarp();
    if ((tid & 31) == 0) mbar_arrive(bar);
    q_cur = q_nxt;
    n_cur = n_nxt;
    q_nxt = q_ahead;
    n_nxt = n_ahead;
  }
}

__device__ __forceinline__ void consumer_barrier() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// The epilogue through shared memory: D (W's rows r, r + 8 by x's rows 8 i + 2 tq + {0, 1}) as y's tile [x row]
// [column] in fp32 over the ring, once both warpgroups have read their last stages; then rows of y (ct: the
// thread among the two warpgroups' 256).
__device__ __forceinline__ void store_staged(const float (&acc)[128], const Nf4GemmArgs& a, const Tile& t, int r,
                                             int tq, int ct) {
  consumer_barrier();
  float* tile = reinterpret_cast<float*>(t.ring_a);
#pragma unroll
  for (int i = 0; i < 32; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 2; ++j) tile[(8 * i + 2 * tq + j) * kStagePitch + r + 8 * h] = acc[4 * i + 2 * h + j];
  consumer_barrier();
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y);
#pragma unroll 4
  for (int it = 0; it < kBM * kBN / 2 / 256; ++it) {
    const int idx = it * 256 + ct, row = idx / (kBN / 2), pair = idx % (kBN / 2);
    if (t.m0 + row >= a.m) continue;
    float2 v = *reinterpret_cast<const float2*>(tile + row * kStagePitch + 2 * pair);
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(y + (t.m0 + row) * a.ldy + t.y_col0 + 2 * pair);
    if (a.accumulate) {
      const float2 old = __bfloat1622float2(*dst);
      v.x += old.x;
      v.y += old.y;
    }
    *dst = __floats2bfloat162_rn(v.x, v.y);
  }
}

__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t v) {
  uint32_t out;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(out) : "r"(v));
  return out;
}

// The epilogue in registers, no shared memory (the ring is already filling with the next tile): each 8 x 8 block
// of D (W's rows 16 warp + 8 h + 0..7 by x's rows 8 i + 0..7) transposed across the warp by movmatrix, after which
// lane (g, tq) holds x's row 8 i + g at W's rows 8 h + 2 tq, + 1: two adjacent columns of y, one 4-byte store. With
// +=, the fp32 values move as their two 16-bit halves (two movmatrix), so the sum is rounded once, as elsewhere.
__device__ __forceinline__ void store_transposed(const float (&acc)[128], const Nf4GemmArgs& a, const Tile& t, int cw,
                                                 int warp, int g, int tq) {
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(a.y);
  const int64_t col = t.y_col0 + cw * 64 + warp * 16 + 2 * tq;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int64_t row = t.m0 + 8 * i + g;
    const bool in = row < a.m;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(y + row * a.ldy + col + 8 * h);
      const float v0 = acc[4 * i + 2 * h], v1 = acc[4 * i + 2 * h + 1];
      if (!a.accumulate) {
        const uint32_t tr = movmatrix_trans(pack_bf16(v0, v1));
        if (in) *dst = tr;
      } else {
        const uint32_t hi = movmatrix_trans(prmt(__float_as_uint(v0), __float_as_uint(v1), 0x7632));
        const uint32_t lo = movmatrix_trans(prmt(__float_as_uint(v0), __float_as_uint(v1), 0x5410));
        if (in) {
          const float e0 = __uint_as_float(prmt(lo, hi, 0x5410)), e1 = __uint_as_float(prmt(lo, hi, 0x7632));
          const float2 old = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dst));
          *dst = pack_bf16(e0 + old.x, e1 + old.y);
        }
      }
    }
  }
}

// kDecode: how W's codes become A fragments (Decode); kDepth: wgmma groups a consumer keeps in flight;
// kPersistent: one CTA an SM, each taking tiles gridDim.x apart, the ring running on across its tiles and the
// epilogue in registers while the producer fills the next tile's stages. In clusters (rp.cluster) the CTA pairs
// take pairs of tiles: the same rows of x, adjacent rows of W.
template <int kDecode, int kDepth, bool kPersistent>
__global__ void __launch_bounds__(kRsThreads, 1) nf4_gemm_rs_kernel(const __grid_constant__ RsParams rp) {
  const Params& p = rp.p;
  extern __shared__ unsigned char smem_raw[];
  const int tid = threadIdx.x;
  // Full: the copying thread's arrival (with the bytes), one a producer warp; empty: each consumer warpgroup of the
  // CTA, and of the other CTA in a cluster.
  Tile t = setup_tile(p, smem_raw, 1 + 4, rp.cluster ? 4 : 2);
  const int n_tiles = p.m_tiles * p.tile_begin[p.a.n_weights];
  // The tiles this CTA takes: i-th tile first + i * stride (in a cluster, over pairs of tiles).
  int first = static_cast<int>(blockIdx.x), stride = static_cast<int>(gridDim.x), count = n_tiles;
  if (rp.cluster) {
    t.cluster_rank = static_cast<int>(cluster_rank());
    t.peer_empty = map_to_rank(smem_addr(t.empty), static_cast<uint32_t>(t.cluster_rank ^ 1));
    first = static_cast<int>(blockIdx.x) / 2;
    stride = static_cast<int>(gridDim.x) / 2;
    count = n_tiles / 2;
    cluster_sync();  // both CTAs' barriers initialized before either's multicast or remote arrivals
  }
  auto tile_at = [&](int i) {
    if (!rp.cluster) return i;
    const int n_pair = i / p.m_tiles, m_tile = i % p.m_tiles;
    return (2 * n_pair + t.cluster_rank) * p.m_tiles + m_tile;
  };

  if (tid < 128) {  // ------------------------------------------------------------------ the producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRsProducerRegs));
    uint32_t g = 0;
    for (int i = first; i < count; i += stride) {
      locate(p, tile_at(i), t);
      rs_produce<kDecode>(rp, t, g, tid);
      g += static_cast<uint32_t>(t.k_steps);
      if (!kPersistent) break;
    }
  } else {  // --------------------------------------------------------------------------- consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRsConsumerRegs));
    const int ct = tid - 128, cw = ct >> 7, wt = ct & 127;
    const int warp = wt >> 5, lane = wt & 31, g = lane >> 2, tq = lane & 3;
    const int r = cw * 64 + warp * 16 + g;  // this thread's first row of W in the tile (and r + 8)
    const int sh = 8 * tq;
    // No initialization: each tile's first wgmma ignores D (scale_d 0).
    float acc[128];
    uint32_t g0 = 0;
    for (int i = first; i < count; i += stride) {
      locate(p, tile_at(i), t);
      rs_mainloop<kDecode, kDepth>(t, g0, cw, r, sh, wt, acc);
      g0 += static_cast<uint32_t>(t.k_steps);
      if constexpr (kPersistent) {
        store_transposed(acc, p.a, t, cw, warp, g, tq);
      } else {
        store_staged(acc, p.a, t, r, tq, ct);
        break;
      }
    }
  }
  // Neither CTA of a cluster leaves while the other may still multicast into it or arrive on its barriers.
  if (rp.cluster) cluster_sync();
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (none of libcuda linked), looked up once.
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 2-D tensor map of `rows` rows of `cols` elements (`ld_bytes` apart), boxes of box_rows x box_cols elements.
// False where the driver refuses it.
bool encode_map(CUtensorMap* map, CUtensorMapDataType type, const void* base, int64_t cols,
                int64_t rows, int64_t ld_bytes, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  PFN_cuTensorMapEncodeTiled_v12000 fn = encode_tiled();
  if (!fn) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  return fn(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// A 2-D bf16 tensor map: `cols` x `rows` elements, rows `ld` elements apart, boxes of box_rows x 64 columns in
// the 128-byte swizzle wgmma reads.
bool encode_2d(CUtensorMap* map, const void* base, int64_t cols, int64_t rows, int64_t ld, int box_rows) {
  return encode_map(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, base, cols, rows, ld * 2, kBK, box_rows,
                    CU_TENSOR_MAP_SWIZZLE_128B);
}

// x_box_rows: 256, or 128 with half_x (variant 10) or a cluster (variant 11, persistent only).
template <int kDecode, int kDepth, bool kPersistent>
int launch_rs(const Params& p, int64_t blocks, cudaStream_t stream, bool half_x = false, bool cluster = false) {
  RsParams rp{};
  rp.p = p;
  rp.x_box_rows = half_x || cluster ? kBM / 2 : kBM;
  rp.cluster = cluster ? 1 : 0;
  const Nf4GemmArgs& a = p.a;
  int64_t rows = 0;
  for (int j = 0; j < a.n_weights; ++j) {
    rows += a.w[j].rows;
    if (!encode_map(&rp.map_codes[j], CU_TENSOR_MAP_DATA_TYPE_UINT8, a.w[j].packed, a.k / 2, a.w[j].rows, a.k / 2,
                    kBK / 2, kBN, kDecode == kPlanes ? CU_TENSOR_MAP_SWIZZLE_32B : CU_TENSOR_MAP_SWIZZLE_NONE))
      return static_cast<int>(cudaErrorInvalidValue);
  }
  if (!encode_2d(&rp.map_x, a.x, int64_t{a.k} + a.k_tail, a.m, a.ldx, rp.x_box_rows))
    return static_cast<int>(cudaErrorInvalidValue);
  if (a.k_tail > 0 && !encode_2d(&rp.map_tail, a.tail, a.k_tail, rows, a.ld_tail, kBN))
    return static_cast<int>(cudaErrorInvalidValue);
  auto kernel = nf4_gemm_rs_kernel<kDecode, kDepth, kPersistent>;
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (attr != cudaSuccess) return static_cast<int>(attr);
  if (!cluster) {
    if (kPersistent) {
      int device = 0, sms = 0;
      if (cudaGetDevice(&device) != cudaSuccess ||
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return static_cast<int>(cudaErrorInvalidValue);
      if (blocks > sms) blocks = sms;
    }
    kernel<<<static_cast<unsigned>(blocks), kRsThreads, kSmemBytes, stream>>>(rp);
    return static_cast<int>(cudaGetLastError());
  }
  // Clusters of two along the grid, as many as fit at once (a persistent grid), at most one a pair of tiles.
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attrs[1];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = 2;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  config.blockDim = dim3(kRsThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 1;
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  int clusters = 0;
  const cudaError_t occ = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (occ != cudaSuccess) return static_cast<int>(occ);
  if (clusters < 1) return static_cast<int>(cudaErrorInvalidConfiguration);
  config.gridDim = dim3(static_cast<unsigned>(2 * std::min<int64_t>(clusters, blocks / 2)));
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, rp));
}

}  // namespace

int nf4_gemm_sm90_launch(const Nf4GemmArgs& args, CUstream_st* stream) {
  Params p{};
  p.a = args;
  p.tile_begin[0] = 0;
  for (int j = 0; j < args.n_weights; ++j) p.tile_begin[j + 1] = p.tile_begin[j] + args.w[j].rows / kBN;
  p.m_tiles = (args.m + kBM - 1) / kBM;
  const int64_t blocks = static_cast<int64_t>(p.m_tiles) * p.tile_begin[args.n_weights];
  if (blocks == 0) return 0;
  if (blocks >= (int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  switch (args.variant) {
    case 1:
      return launch<1, true>(p, blocks, stream);
    case 3:
      return launch<2, false>(p, blocks, stream);
    case 5:
      return launch_rs<kLut, 1, false>(p, blocks, stream);
    case 6:
      return launch_rs<kRaw, 1, false>(p, blocks, stream);
    case 7:
      return launch_rs<kLut, 2, false>(p, blocks, stream);
    case 8:
      return launch_rs<kLut, 1, true>(p, blocks, stream);
    case 9:
      return launch_rs<kLut, 2, true>(p, blocks, stream);
    case 10:
      return launch_rs<kLut, 1, true>(p, blocks, stream, /*half_x=*/true);
    case 11:
      // Pairs of tiles need an even count of W's row tiles; else variant 8.
      return launch_rs<kLut, 1, true>(p, blocks, stream, false, /*cluster=*/p.tile_begin[args.n_weights] % 2 == 0);
    case 12:
      return launch_rs<kPlanes, 1, false>(p, blocks, stream);
    case 13:
      return launch_rs<kPlanes, 1, true>(p, blocks, stream);
    case 14:
      return launch_rs<kPlanes, 2, true>(p, blocks, stream);
    case 15:  // 11 decoding as 12; variant 13 where W's row tiles are odd in number
      return launch_rs<kPlanes, 1, true>(p, blocks, stream, false, /*cluster=*/p.tile_begin[args.n_weights] % 2 == 0);
    default:
      return launch<2, true>(p, blocks, stream);
  }
}

}  // namespace qt::kernels::sm90
