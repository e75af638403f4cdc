// CUDA NF4 dequantization, one pass over packed codes + double-quantized statistics (nf4_format.h).
// Reference: nf4_dequant_ref (nf4_ref.cpp); the [gpu] tests hold the two to identical bits.
//
// Work split: a warp takes 32 consecutive "chunks" of one weight; a chunk is 32 elements = 16 packed bytes,
// always inside one quantization block (blocksize >= 64). Each lane reads its 16 bytes with one 16-byte load,
// computes the block scale (one byte of absmax_q, one float of nested_absmax, one nested_map lookup), turns the
// 32 nibbles into 32 values through a 16-entry table in shared memory, and writes them to a per-warp staging
// area in shared memory. The warp then writes the staged 32 * 32 values back with 16-byte stores in which
// consecutive lanes hit consecutive addresses (each store instruction covers 512 contiguous bytes), instead of
// each lane writing its own 64 or 128 bytes at a stride. Each job's warps start on a fresh warp, so a warp
// never straddles two weights.
//
// Any numel (bitsandbytes quantizes any shape, nf4_format.h): where numel is not a multiple of 32 the last chunk
// is short. Its lane reads its ceil(tail/2) packed bytes one by one (a 16-byte load would pass the end of the
// codes) and writes its elements one by one; chunks never straddle blocks because blocks start at multiples of
// 64, the short last block included.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"

namespace qt::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkElems = 32;  // elements per lane and step

struct JobTable {
  Nf4DequantJob job[kNf4MaxJobs];
  int64_t warp_begin[kNf4MaxJobs + 1];  // first warp of each job; warp_begin[n] = total warps
  int32_t log2_blocksize[kNf4MaxJobs];
  int32_t n;
};

// Two fp32 values to one 32-bit word of the output type, first value in the low half (lower address).
template <typename OutT>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);  // .x = a: round-to-nearest-even like c10::BFloat16
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename OutT>
struct OutTraits {
  static constexpr int kLaneBytes = kChunkElems * static_cast<int>(sizeof(OutT));  // 64 (16-bit) or 128 (fp32)
  // +16 bytes of padding per lane: 16-byte shared stores of 8 consecutive lanes land in distinct bank groups.
  static constexpr int kLaneStride = kLaneBytes + 16;
  static constexpr int kPieces = kLaneBytes / 16;  // 16-byte pieces per lane
};

// Decodes one 32-bit word of packed codes (4 bytes, 8 elements); in each byte the high nibble is the earlier
// element (bitsandbytes packing). fp32 multiplies with explicit rounding (__fmul_rn) so nvcc never fuses them
// with anything: the reference multiplies in a separate op.
template <typename OutT>
__device__ __forceinline__ void decode_16bit(uint32_t word, const float* code, float scale, uint4& out) {
  uint32_t r[4];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 0xFFu;
    r[b] = pack2<OutT>(__fmul_rn(code[byte >> 4], scale), __fmul_rn(code[byte & 0xFu], scale));
  }
  out = make_uint4(r[0], r[1], r[2], r[3]);
}

__device__ __forceinline__ void decode_f32(uint32_t word, const float* code, float scale, uint4& a, uint4& b) {
  float v[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t byte = (word >> (8 * k)) & 0xFFu;
    v[2 * k] = __fmul_rn(code[byte >> 4], scale);
    v[2 * k + 1] = __fmul_rn(code[byte & 0xFu], scale);
  }
  a = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  b = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7]));
}

template <typename OutT>
__global__ void __launch_bounds__(kThreads) nf4_dequant_kernel(const __grid_constant__ JobTable table) {
  using Tr = OutTraits<OutT>;
  __shared__ float code_s[kNf4MaxJobs][16];
  __shared__ __align__(16) unsigned char stage_s[kWarps][32 * Tr::kLaneStride];

  // The loads of the table, the codes and the statistics are all issued before the first wait, so a CTA pays
  // one memory latency (two for the dependent nested_map lookup), not three.
  const bool table_loader = threadIdx.x < table.n * 16;
  const float code_value = table_loader ? __ldg(table.job[threadIdx.x / 16].quant_map + threadIdx.x % 16) : 0.0f;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t gwarp = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool warp_active = gwarp < table.warp_begin[table.n];  // uniform across the warp
  int j = 0;
  while (j + 1 < table.n && gwarp >= table.warp_begin[j + 1]) ++j;
  const Nf4DequantJob& job = table.job[j];
  const int64_t full_chunks = job.numel / kChunkElems;
  const int64_t chunks = (job.numel + kChunkElems - 1) / kChunkElems;
  const int64_t first = (gwarp - table.warp_begin[j]) * 32;  // first chunk of this warp
  const int64_t c = first + lane;
  const bool active = warp_active && c < chunks;
  unsigned char* stage = stage_s[warp];

  uint4 pk = make_uint4(0, 0, 0, 0);
  float scale = 0.0f;
  if (active) {
    if (c < full_chunks) {
      pk = __ldg(reinterpret_cast<const uint4*>(job.packed) + c);
    } else {  // the short last chunk
      const int64_t bytes = (job.numel - c * kChunkElems + 1) / 2;
      uint32_t words[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < bytes; ++i)
        words[i / 4] |= static_cast<uint32_t>(__ldg(job.packed + c * 16 + i)) << (8 * (i % 4));
      pk = make_uint4(words[0], words[1], words[2], words[3]);
    }
    const int64_t block = (c * kChunkElems) >> table.log2_blocksize[j];
    const uint32_t q = __ldg(job.absmax_q + block);
    const float group = __ldg(job.nested_absmax + (block / 256));
    // scale = nested_map[q] * nested_absmax + offset, rounded after the multiply and after the add (no FMA),
    // as bitsandbytes computes it (dequantize_blockwise, then `absmax += offset`).
    scale = __fadd_rn(__fmul_rn(__ldg(job.nested_map + q), group), job.offset);
  }
  if (table_loader) code_s[threadIdx.x / 16][threadIdx.x % 16] = code_value;
  __syncthreads();           // code_s is filled
  if (!warp_active) return;  // whole warps leave together, after the only block-wide barrier

  if (active) {
    const float* code = code_s[j];
    uint4* dst = reinterpret_cast<uint4*>(stage + lane * Tr::kLaneStride);
    const uint32_t words[4] = {pk.x, pk.y, pk.z, pk.w};
    if constexpr (sizeof(OutT) == 2) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint4 o;
        decode_16bit<OutT>(words[w], code, scale, o);
        dst[w] = o;
      }
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint4 a, b;
        decode_f32(words[w], code, scale, a, b);
        dst[2 * w] = a;
        dst[2 * w + 1] = b;
      }
    }
  }
  __syncwarp();

  // Coalesced write-back: piece p of the warp's contiguous output comes from lane p / kPieces. A row-strided
  // output: the warp's 1024 elements lie in one row (cols is a multiple of 1024).
  const int64_t e0 = first * kChunkElems;
  const int64_t at = job.ld == 0 ? e0 : (e0 / job.cols) * job.ld + e0 % job.cols;
  uint4* out = reinterpret_cast<uint4*>(static_cast<unsigned char*>(job.out) + at * static_cast<int64_t>(sizeof(OutT)));
#pragma unroll
  for (int k = 0; k < Tr::kPieces; ++k) {
    const int p = k * 32 + lane;
    const int src = p / Tr::kPieces;
    if (first + src < full_chunks) {
      out[p] = *reinterpret_cast<const uint4*>(stage + src * Tr::kLaneStride + (p % Tr::kPieces) * 16);
    }
  }
  // The short last chunk, element by element (only a contiguous output has one: a row-strided output's numel
  // is a multiple of kNf4StridedCols).
  if (active && c == full_chunks) {
    const OutT* staged = reinterpret_cast<const OutT*>(stage + lane * Tr::kLaneStride);
    OutT* dst = static_cast<OutT*>(job.out) + c * kChunkElems;
    for (int64_t i = 0; i < job.numel - c * kChunkElems; ++i) dst[i] = staged[i];
  }
}

template <typename OutT>
void launch(const JobTable& table, cudaStream_t stream) {
  const int64_t warps = table.warp_begin[table.n];
  const int64_t blocks = (warps + kWarps - 1) / kWarps;
  QT_CHECK(blocks < (int64_t{1} << 31), ErrorKind::Internal, "nf4_dequant: tensor too large for one launch");
  nf4_dequant_kernel<OutT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) fail(ErrorKind::Device, std::string("nf4_dequant kernel launch: ") + cudaGetErrorString(err));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

bool nf4_cuda_compiled() { return true; }

void nf4_dequant_launch(const Nf4DequantJob* jobs, int n_jobs, Nf4OutType type, CUstream_st* stream) {
  QT_CHECK(n_jobs >= 1 && n_jobs <= kNf4MaxJobs, ErrorKind::Internal,
           "nf4_dequant_launch: 1.." + std::to_string(kNf4MaxJobs) + " jobs per launch, got " + std::to_string(n_jobs));
  JobTable table{};
  table.n = n_jobs;
  table.warp_begin[0] = 0;
  for (int j = 0; j < n_jobs; ++j) {
    const Nf4DequantJob& job = jobs[j];
    const int bs = job.blocksize;
    QT_CHECK(bs >= 64 && bs <= 4096 && (bs & (bs - 1)) == 0, ErrorKind::Internal,
             "nf4_dequant_launch: blocksize must be a power of two in [64, 4096], got " + std::to_string(bs));
    QT_CHECK(job.numel > 0, ErrorKind::Internal, "nf4_dequant_launch: numel " + std::to_string(job.numel));
    QT_CHECK(aligned16(job.packed) && aligned16(job.out), ErrorKind::Internal,
             "nf4_dequant_launch: packed codes and output must be 16-byte aligned");
    QT_CHECK(job.ld == 0 || (job.cols > 0 && job.cols % kNf4StridedCols == 0 && job.ld >= job.cols &&
                             job.numel % job.cols == 0),
             ErrorKind::Internal, "nf4_dequant_launch: a row-strided output needs columns a multiple of " +
                                      std::to_string(kNf4StridedCols) + " and a row stride >= the columns");
    QT_CHECK(job.absmax_q && job.nested_absmax && job.nested_map && job.quant_map, ErrorKind::Internal,
             "nf4_dequant_launch: null statistics pointer");
    table.job[j] = job;
    int lg = 0;
    while ((1 << lg) < bs) ++lg;
    table.log2_blocksize[j] = lg;
    const int64_t chunks = (job.numel + kChunkElems - 1) / kChunkElems;
    table.warp_begin[j + 1] = table.warp_begin[j] + (chunks + 31) / 32;
  }
  switch (type) {
    case Nf4OutType::BFloat16:
      launch<__nv_bfloat16>(table, stream);
      break;
    case Nf4OutType::Float16:
      launch<__half>(table, stream);
      break;
    case Nf4OutType::Float32:
      launch<float>(table, stream);
      break;
  }
}

}  // namespace qt::kernels
