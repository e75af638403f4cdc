// Benchmark of the fused linear cross-entropy (lib/kernels/fused_linear_ce.h) on the lm_head shapes of
// Llama 3.2 1B-ish (8192 x 2048 x 128256) and Llama 3.1 8B (16384 x 4096 x 128256), bf16, one label in seven
// ignored. For each mode: median forward+backward time (CUDA events), extra peak memory over the inputs
// (caching-allocator stats), and next to them the floors (FLOPs over the bf16 matmul rate this run measures;
// gradient bytes), the targets of issue 11 (the fastest peer's time and Liger's memory for the default; CCE's
// time and 1.05x the gradient bytes for low-memory; ../shared/peers/ce_peers.py measures the peers) and the
// naive path, full logits + at::cross_entropy_loss. Modes: the automatic schedule (default and low-memory) and
// each schedule forced; frozen (QLoRA's lm_head) with the rule's token chunks and with 512 to 4096 rows (the plan's
// train.memory.loss_chunk_tokens), also at the 8B step's 4096 x 4096 x 128256; and the tile kernel on its persistent
// grid (resident: one CTA an SM) beside the default grid.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "lib/kernels/fused_linear_ce.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

#ifdef QT_WITH_CUDA
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Timing {
  double median_ms;
  double extra_bytes;
};

int64_t allocated_now() {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
}
int64_t allocated_peak() {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
  return s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

// `reset` runs untimed before each call (dropping last call's .grad); `run` is timed with CUDA events.
Timing measure(const std::function<void()>& run, const std::function<void()>& reset, int warmup, int iters) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int i = 0; i < warmup; ++i) {
    reset();
    run();
  }
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    reset();
    at::cuda::device_synchronize();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    cudaEventRecord(start, stream);
    run();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float t = 0;
    cudaEventElapsedTime(&t, start, stop);
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  // Memory: one more call from a reset state, peak over what was allocated before it.
  reset();
  at::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  const int64_t before = allocated_now();
  run();
  at::cuda::device_synchronize();
  return {ms[ms.size() / 2], static_cast<double>(allocated_peak() - before)};
}

// bf16 GEMM rate of this GPU, measured the way the loss's GEMMs run (at::matmul, cuBLAS).
double matmul_tflops() {
  const int64_t n = 8192;
  const at::Tensor a = at::randn({n, n}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  const at::Tensor b = at::randn({n, n}, a.options());
  at::Tensor c = at::empty({n, n}, a.options());
  const Timing t = measure([&] { at::mm_out(c, a, b); }, [] {}, 3, 20);
  return 2.0 * n * n * n / (t.median_ms * 1e-3) / 1e12;
}

struct Row {
  std::string shape, mode;
  int64_t chunk;
  double ms, floor_ms, extra_gib, floor_gib, target_ms, target_gib, loss_rel;
};

}  // namespace
#endif

int main() {
#ifndef QT_WITH_CUDA
  std::fprintf(stderr, "bench_fused_ce: built without CUDA kernels\n");
  return 1;
#else
  if (!at::hasCUDA()) {
    std::fprintf(stderr, "bench_fused_ce: needs a CUDA device\n");
    return 1;
  }
  at::manual_seed(0);
  const double tflops = matmul_tflops();
  std::printf("measured bf16 matmul rate (8192^3 at::mm): %.0f TFLOP/s\n", tflops);

  struct Shape {
    int64_t t, h, v;
    // Trainable targets on an H100 (issue 11, peers of 2026-11-25): default, then low-memory.
    double target_ms, target_gib, low_ms, low_gib;
    bool frozen_only = false;  // the frozen modes only (no trainable targets at this shape)
  };
  // The third: the 8B step's own (2 x 2048 tokens), where the plan's 2048-token tiles make 2 against the rule's 6.
  const std::vector<Shape> shapes = {{8192, 2048, 128256, 28.2, 0.583, 28.2, 0.547},
                                     {16384, 4096, 128256, 91.7, 1.226, 272.0, 1.159},
                                     {4096, 4096, 128256, 0, 0, 0, 0, true}};
  std::vector<Row> rows;
  for (const Shape& s : shapes) {
    const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
    at::Tensor hidden = at::randn({s.t, s.h}, opts).requires_grad_(true);
    at::Tensor weight = (at::randn({s.v, s.h}, opts) * 0.02);
    at::Tensor labels = at::randint(0, s.v, {s.t}, opts.dtype(at::kLong));
    labels.masked_fill_(at::randint(0, 7, {s.t}, labels.options()).eq(0), -100);
    char shape[64];
    std::snprintf(shape, sizeof shape, "%lldx%lldx%lld", static_cast<long long>(s.t), static_cast<long long>(s.h),
                  static_cast<long long>(s.v));
    const double gemm_flops = 2.0 * s.t * s.h * s.v;
    const double dh_bytes = 2.0 * s.t * s.h, dw_bytes = 2.0 * s.v * s.h;

    // The naive loss of the same inputs, for the loss check and the peer timing.
    double naive_loss = 0;
    auto naive = [&](bool trainable) {
      weight.requires_grad_(trainable);
      at::Tensor logits = at::matmul(hidden, weight.t()).to(at::kFloat);
      at::Tensor loss = at::cross_entropy_loss(logits, labels, {}, at::Reduction::Sum, -100);
      naive_loss = loss.item<double>();
      loss.backward();
    };
    auto reset = [&] {
      hidden.mutable_grad().reset();
      weight.mutable_grad().reset();
    };

    struct Mode {
      const char* name;
      bool fused, trainable, low_memory = false;
      qt::FusedCeSchedule schedule = qt::FusedCeSchedule::Auto;
      bool overlap_dw = true;
      int64_t vocab_tile = 0;
      int64_t chunk_tokens = 0;  // 0: the rule's (frozen: 768 rows at this vocabulary in bf16)
      int resident = 0;          // the tile kernel's persistent grid (FusedLinearCeOptions::resident_tiles)
    };
    using S = qt::FusedCeSchedule;
    const std::vector<Mode> modes = {
        {"fused trainable", true, true},
        {"fused trainable low-mem", true, true, true},
        {"  token chunks", true, true, false, S::TokenChunks},
        {"  token chunks no-overlap", true, true, false, S::TokenChunks, false},
        {"  token chunks low-mem", true, true, true, S::TokenChunks},
        {"  vocab tiles", true, true, false, S::VocabTiles},
        {"fused frozen", true, false},
        // QLoRA's lm_head is frozen: larger token chunks (more tile memory) against the rule's 768 rows
        {"  frozen chunk 512", true, false, false, S::Auto, true, 0, 512},
        {"  frozen chunk 1024", true, false, false, S::Auto, true, 0, 1024},
        {"  frozen chunk 2048", true, false, false, S::Auto, true, 0, 2048},
        {"  frozen chunk 4096", true, false, false, S::Auto, true, 0, 4096},
        // the tile kernel on its persistent grid (one CTA an SM: each row's second read from L2)
        {"  frozen resident", true, false, false, S::Auto, true, 0, 0, 1},
        {"  frozen chunk 2048 resident", true, false, false, S::Auto, true, 0, 2048, 1},
        {"  trainable resident", true, true, false, S::Auto, true, 0, 0, 1},
        {"naive trainable", false, true},
        {"naive frozen", false, false},
    };
    for (const Mode& m : modes) {
      const bool trainable = m.trainable, fused = m.fused;
      if (s.frozen_only && trainable) continue;
      qt::FusedLinearCeOptions o;
      o.low_memory = m.low_memory;
      o.schedule = m.schedule;
      o.overlap_dw = m.overlap_dw;
      o.vocab_tile = m.vocab_tile;
      o.chunk_tokens = m.chunk_tokens;
      o.resident_tiles = m.resident;
      double fused_loss = 0;
      std::function<void()> run = [&] {
        weight.requires_grad_(trainable);
        auto r = qt::fused_linear_cross_entropy(hidden, weight, labels, o);
        r.loss_sum.backward();
        fused_loss = r.loss_sum.item<double>();
      };
      if (!fused) run = [&] { naive(trainable); };
      const Timing t = measure(run, reset, 2, 10);
      Row row;
      row.shape = shape;
      const bool by_vocab =
          fused && qt::fused_linear_ce_schedule(s.t, s.h, s.v, trainable, o) == qt::FusedCeSchedule::VocabTiles;
      row.mode = std::string(m.name) + (fused && trainable ? (by_vocab ? " [V]" : " [T]") : "");
      row.chunk = fused ? std::min(s.t, qt::fused_linear_ce_chunk_tokens(s.t, s.h, s.v, trainable, o, 2)) : s.t;
      row.ms = t.median_ms;
      row.floor_ms = (trainable ? 3 : 2) * gemm_flops / (tflops * 1e12) * 1e3;
      row.extra_gib = t.extra_bytes / kGiB;
      row.floor_gib = (dh_bytes + (trainable ? dw_bytes : 0)) / kGiB;
      row.target_ms = !trainable ? 0.8 * s.target_ms : m.low_memory ? s.low_ms : s.target_ms;
      row.target_gib = !trainable ? (dh_bytes + 256.0 * 1024 * 1024) / kGiB : m.low_memory ? s.low_gib : s.target_gib;
      if (fused) {
        naive(false);  // loss of the same inputs
        reset();
        row.loss_rel = std::abs(fused_loss - naive_loss) / std::abs(naive_loss);
      } else {
        row.loss_rel = 0;
      }
      rows.push_back(row);
      std::printf("%s %s done\n", row.shape.c_str(), row.mode.c_str());
      std::fflush(stdout);
    }
  }

  std::printf("\n%-20s %-30s %6s %9s %9s %7s %9s %9s %8s %9s %10s\n", "T x H x V", "mode", "chunk", "ms", "floor ms",
              "%floor", "extra GiB", "floor GiB", "target", "tgt GiB", "loss rel");
  for (const Row& r : rows) {
    std::printf("%-20s %-30s %6lld %9.2f %9.2f %6.0f%% %9.3f %9.3f %8.1f %9.3f %10.2e\n", r.shape.c_str(),
                r.mode.c_str(), static_cast<long long>(r.chunk), r.ms, r.floor_ms, 100.0 * r.floor_ms / r.ms,
                r.extra_gib, r.floor_gib, r.mode.find("naive") != std::string::npos ? 0.0 : r.target_ms,
                r.mode.find("naive") != std::string::npos ? 0.0 : r.target_gib, r.loss_rel);
  }
  std::printf(
      "floor ms: 6THV (trainable) or 4THV (frozen) FLOPs at the measured matmul rate; floor GiB: dh (+ dW) "
      "in bf16; loss rel: fused vs naive loss sum; [T]/[V]: token chunks / vocabulary tiles (chunk: pass 1)\n");
  return 0;
#endif
}
