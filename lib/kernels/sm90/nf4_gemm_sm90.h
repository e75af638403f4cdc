#pragma once
// The NF4 GEMM for Hopper (sm_90a), y = x W^T with W in NF4 (nf4_format.h, blocksize 64), dequantized tile by
// tile into shared memory inside the GEMM's main loop: no 16-bit copy of W is ever written to device memory.
// Built apart from lib/kernels' other CUDA code (its own target, sm_90a only: wgmma and setmaxnreg exist
// there alone). The tensor-level entry point, its checks and its plain-ATen reference: lib/kernels/nf4_gemm.h.
// No torch and no CUDA header here: the stream is CUDA's opaque CUstream_st*, i.e. a cudaStream_t.
#include <cstdint>

struct CUstream_st;

namespace qt::kernels::sm90 {

// Tile of one CTA: kNf4GemmTileM rows of x by kNf4GemmTileN rows of W, kNf4GemmTileK columns a step.
inline constexpr int kNf4GemmTileM = 256;
inline constexpr int kNf4GemmTileN = 128;
inline constexpr int kNf4GemmTileK = 64;  // = the NF4 blocksize: one scale per W row per step
inline constexpr int kNf4GemmMaxWeights = 4;

// One NF4 weight of `rows` x k elements (row-major, blocksize 64), device pointers; rows a multiple of
// kNf4GemmTileN, packed 16-byte aligned.
struct Nf4GemmWeight {
  const uint8_t* packed = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_map = nullptr;  // [256]
  const float* quant_map = nullptr;   // [16]
  float offset = 0.0f;
  int32_t rows = 0;
};

// y[:, c_j : c_j + rows_j] (=|+=) x w_j^T for each weight j, its columns after the previous weights'.
struct Nf4GemmArgs {
  const void* x = nullptr;  // bf16 [m, k], row stride ldx (a multiple of 8), 16-byte aligned
  int64_t ldx = 0;
  void* y = nullptr;  // bf16 [m, sum rows], row stride ldy (even), 4-byte aligned
  int64_t ldy = 0;
  int32_t m = 0;
  int32_t k = 0;  // a multiple of kNf4GemmTileK
  int32_t n_weights = 0;
  Nf4GemmWeight w[kNf4GemmMaxWeights];
  // Optional bf16 columns after the NF4 ones: y (+)= x[:, :k] W^T + x[:, k : k + k_tail] tail^T in one sum, with
  // tail [sum rows, k_tail] (row stride ld_tail, a multiple of 8, 16-byte aligned) and ldx >= k + k_tail; k_tail a
  // multiple of 8 (LoRA's B terms: x's columns after k hold x A^T).
  const void* tail = nullptr;
  int64_t ld_tail = 0;
  int32_t k_tail = 0;
  bool accumulate = false;  // y += x W^T (the sum in fp32, one rounding), else y = x W^T
  // 0: the default (two producer warpgroups); 1: one producer warpgroup; 3: two, storing the codes undecoded
  // (wrong values: the pipeline's ceiling without the decoding, for bench_nf4_gemm only); 5: W decoded into
  // registers as wgmma's A operand, the product transposed (y^T = W x^T), x's tiles and W's codes by TMA; 6: 5
  // with the codes undecoded (wrong values: its ceiling, bench only); 7: 5 with two wgmma groups in flight; 8, 9: 5
  // and 7 on a persistent grid (a CTA an SM), the epilogue in registers (movmatrix) while the next tile loads; 10: 8
  // loading only half of x's tile (wrong values: the ceiling of a cluster multicasting x, bench only); 11: 8 in
  // clusters of two CTAs over adjacent tiles of W, each loading half of x's tile for both (TMA multicast); 12, 13,
  // 14, 15: 5, 8, 9 and 11 decoding by byte permutes out of each row's 16 products, which the producer writes (the
  // same bits as those).
  int32_t variant = 0;
};

// Launches the kernel on `stream`; returns the CUDA error code of the launch (0 = success). The caller checks
// the arguments (lib/kernels/nf4_gemm.cpp) and that the device is compute capability 9.0.
int nf4_gemm_sm90_launch(const Nf4GemmArgs& args, CUstream_st* stream);

}  // namespace qt::kernels::sm90
