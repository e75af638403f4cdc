#pragma once
// The trainer's large GEMMs (the base GEMMs of the blocks, lm_head's tiles) with the cuBLASLt algorithm measured
// fastest for each problem, instead of the one cuBLAS's heuristic picks: at the trainer's shapes the heuristic's
// first choice ran 1-14% slower than another of its own candidates on an H100 (bench_gemm_algos,
// docs/PERFORMANCE.md, "Twenty-second session"). A problem (shapes, strides, alignment, dtype, accumulation) is
// timed once, at its first call: the heuristic's candidates that give the same output bits as its first one, each
// timed in turn over three rounds; the fastest is kept for the process. Only candidates with the first one's bits
// are taken, so that the choice, which timing noise may change from run to run, never changes a result (a resumed
// run gives the bits of one never stopped).
// Where tuning is not possible (CPU, dtypes other than bf16, strides without a unit inner one, unaligned rows, small
// problems, stream capture, CUDA's sync debug mode on, the tuning budget of a process spent) the GEMM runs as before:
// ATen's at::mm_out / addmm_ (or, for a problem seen before, its kept algorithm).
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qt::kernels {

// out = a b (accumulate false) or out += a b (true). a [M, K], b [K, N], out [M, N], one dtype, 2-D, any strides
// ATen takes (b is often a weight's transpose view, out often the first columns of a wider buffer).
void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// a b into a new contiguous [M, N] of a's dtype.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b);

// What the tuner did in this process (for tests and logs).
struct GemmTunerCounts {
  int64_t problems_tuned = 0;         // problems timed over their candidates
  int64_t candidates_timed = 0;       // candidates with the first one's bits, timed
  int64_t candidates_other_bits = 0;  // candidates dropped: other output bits than the heuristic's first
  int64_t picked_other = 0;           // problems whose fastest was not the heuristic's first
  int64_t lt_calls = 0;               // GEMMs run through cuBLASLt with a kept algorithm
  int64_t aten_calls = 0;             // GEMMs run through ATen (CPU, not tunable, or tuning off)
};
GemmTunerCounts gemm_tuner_counts();

// 1: tune (the default), 0: ATen for every GEMM, as before 2026-12-06. The environment's QT_GEMM_TUNE=0 sets 0 at
// the first call (read once, for A/B measurements); tests set it here. Kept algorithms stay kept.
void set_gemm_tuning(bool on);
bool gemm_tuning();

// While one lives (in any thread), a problem not seen before runs ATen's GEMM and is neither timed nor recorded;
// kept algorithms are still used. Generation's shapes change with every batch and step: timing each would cost
// more than it saves (on an H100 the uncached generation of a prompt took 1.90 s at 8B and 1.89 at 1B with it, 1.46
// and 1.03 without) and spend the process's tuning budget before training's own problems are seen (the exact-match
// metric generates before the first step).
class GemmTuningPause {
 public:
  GemmTuningPause();
  ~GemmTuningPause();
  GemmTuningPause(const GemmTuningPause&) = delete;
  GemmTuningPause& operator=(const GemmTuningPause&) = delete;
};

}  // namespace qt::kernels
