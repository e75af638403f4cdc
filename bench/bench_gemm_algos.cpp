// The trainer's base GEMMs (the block's forward and input gradients, LoRA's columns folded in as the trainer folds
// them; the loss's lm_head tile) through ATen (cuBLAS's own pick, what the trainer runs) against every algorithm
// cuBLASLt's heuristic offers for the same problem, each timed: whether a GEMM picked by measurement instead of by
// the heuristic would move the base GEMMs (about 60% of a step) nearer the rate one 8192^3 GEMM reaches. The
// profiles ran them at 88-94% of it (docs/PERFORMANCE.md, "Twenty-first session").
// Every candidate is checked against ATen's output first (relative error 2e-2 of the output's largest magnitude: bf16
// out, fp32 accumulation in another order); the first pass times each candidate once (a batch of 10), then ATen,
// the heuristic's first and the four fastest candidates are timed interleaved over 9 rounds (median): the H100's
// clocks drift 5-10% between runs of one shape, so only variants timed in turn are compared.
// Beside them: how many candidates give the first one's bits, and lib/kernels/tuned_gemm.h's GEMM (the fastest of
// those, picked at its first call), the path the trainer takes. Usage: bench_gemm_algos [candidates=32] [8b,1b] [calls
// a timing=10: 200 for sustained load]. Results: docs/PERFORMANCE.md.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <cublasLt.h>

#include "lib/kernels/cublaslt_api.h"
#include "lib/kernels/tuned_gemm.h"

namespace {

#define LT_CHECK(expr)                                                                                \
  do {                                                                                                \
    const cublasStatus_t st_ = (expr);                                                                \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                               \
      std::fprintf(stderr, "bench_gemm_algos: %s failed: status %d\n", #expr, static_cast<int>(st_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

// One GEMM of the trainer, row-major as ATen sees it: C[M, N] (+)= A[M, K] x (nt ? B[N, K]^T : B[K, N]).
struct Gemm {
  std::string model, label;
  int64_t M, N, K;
  bool nt;    // B stored [N, K] (a weight [out, in] in the forward pass); else [K, N] (the input gradient)
  bool onto;  // beta 1: accumulating onto C (o_proj's and down_proj's rank-r term written first)
};

int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }

// Median time (us) of `reps`-call batches over `rounds` rounds.
template <typename F>
double time_us(F&& fn, int reps, int rounds) {
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    for (int i = 0; i < reps; ++i) fn();
    stop.record();
    stop.synchronize();
    t.push_back(start.elapsed_time(stop) * 1000.0 / reps);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::string describe(const qt::kernels::CublasLtApi* api, const cublasLtMatmulAlgo_t& algo) {
  int id = 0, tile = 0, stages = 0, splitk = 0, swizzle = 0, cluster = 0;
  size_t w = 0;
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &w);
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &w);
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &w);
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk, &w);
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle, sizeof swizzle, &w);
  api->algo_get(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof cluster, &w);
  char buf[96];
  std::snprintf(buf, sizeof buf, "algo %d tile %d stages %d splitK %d swizzle %d cluster %d", id, tile, stages, splitk,
                swizzle, cluster);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  if (!at::hasCUDA()) {
    std::fprintf(stderr, "bench_gemm_algos: no CUDA device\n");
    return 1;
  }
  const int want = argc > 1 ? std::atoi(argv[1]) : 32;
  const std::string models = argc > 2 ? argv[2] : "8b,1b";
  // Calls a timing in the interleaved rounds: 10 lasts 1-30 ms; 200 keeps the GPU busy long enough (0.02-0.6 s) to
  // reach the clock its power cap allows under that kernel (whether a candidate's lead survives sustained load).
  const int reps = argc > 3 ? std::max(1, std::atoi(argv[3])) : 10;
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  at::manual_seed(0);
  double rate = 0;
  {
    at::Tensor a = at::randn({8192, 8192}, opt), c = at::empty({8192, 8192}, opt);
    for (int i = 0; i < 3; ++i) at::mm_out(c, a, a);
    rate = 2.0 * 8192.0 * 8192.0 * 8192.0 / (time_us([&] { at::mm_out(c, a, a); }, 10, 5) * 1e-6);
  }
  std::printf(
      "%s: one 8192^3 bf16 GEMM through ATen %.0f TFLOP/s; cuBLASLt's heuristic asked for %d candidates; %d "
      "calls a timing\n",
      at::cuda::getCurrentDeviceProperties()->name, rate / 1e12, want, reps);

  struct Dims {
    int64_t H, I, Q, KV, T, V;
  };
  const std::map<std::string, Dims> dims = {{"8b", {4096, 14336, 4096, 1024, 4096, 128256}},
                                            {"1b", {2048, 8192, 2048, 512, 8192, 128256}}};
  std::vector<Gemm> gemms;
  size_t pos = 0;
  while (pos <= models.size()) {
    const size_t end = std::min(models.find(',', pos), models.size());
    const std::string m = models.substr(pos, end - pos);
    pos = end + 1;
    if (!dims.count(m)) continue;
    const Dims d = dims.at(m);
    const int64_t qkv = d.Q + 2 * d.KV, r = 16;
    gemms.push_back({m, "q/k/v forward", d.T, qkv, d.H + pad8(3 * r), true, false});
    gemms.push_back({m, "o_proj forward (onto)", d.T, d.H, d.Q, true, true});
    gemms.push_back({m, "gate/up forward", d.T, 2 * d.I, d.H + pad8(2 * r), true, false});
    gemms.push_back({m, "down_proj forward (onto)", d.T, d.H, d.I, true, true});
    gemms.push_back({m, "q/k/v input gradient", d.T, d.H + pad8(3 * r), qkv, false, false});
    gemms.push_back({m, "o_proj input gradient (onto)", d.T, d.Q, d.H, false, true});
    gemms.push_back({m, "gate/up input gradient", d.T, d.H + pad8(2 * r), 2 * d.I, false, false});
    gemms.push_back({m, "down_proj input gradient", d.T, d.I, d.H + pad8(r), false, false});
    gemms.push_back({m, "lm_head tile forward", 2048, d.V, d.H, true, false});
    gemms.push_back({m, "lm_head tile input gradient", 2048, d.H, d.V, false, false});
  }

  const qt::kernels::CublasLtApi* api = qt::kernels::cublaslt_api();
  if (api == nullptr) {
    std::fprintf(stderr, "bench_gemm_algos: cuBLASLt's entry points not found\n");
    return 1;
  }
  cublasLtHandle_t lt = at::cuda::getCurrentCUDABlasLtHandle();
  const size_t ws_bytes = size_t{64} << 20;
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, opt.dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  std::printf(
      "\n| model | GEMM | M x N x K | ATen us (TFLOP/s, %% of 8192^3) | heuristic's first us | fastest candidate us "
      "(its rank, config) | ATen / fastest | candidates run, wrong, with the first's bits | tuned_gemm us | ATen / "
      "tuned |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Gemm& g : gemms) {
    at::Tensor A = at::randn({g.M, g.K}, opt);
    at::Tensor B = g.nt ? at::randn({g.N, g.K}, opt).mul_(0.05) : at::randn({g.K, g.N}, opt).mul_(0.05);
    at::Tensor C0 = at::randn({g.M, g.N}, opt);  // the term accumulated onto (beta 1)
    at::Tensor C = at::empty_like(C0), ref = at::empty_like(C0);
    const at::Tensor Bop = g.nt ? B.t() : B;
    auto aten = [&] {
      if (g.onto) {
        C.copy_(C0);  // outside the GEMM's time below: subtracted as its own copy
        C.addmm_(A, Bop);
      } else {
        at::mm_out(C, A, Bop);
      }
    };
    aten();
    ref.copy_(C);
    const double scale = ref.abs().max().item<float>();

    // Column-major view: C'[N, M] = op(B') A' with B' = B as stored, A' = A [K, M] (ld K).
    cublasLtMatmulDesc_t desc;
    LT_CHECK(api->desc_create(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = g.nt ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    LT_CHECK(api->desc_set(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_CHECK(api->desc_set(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtMatrixLayout_t la, lb, lc;
    if (g.nt)
      LT_CHECK(api->layout_create(&la, CUDA_R_16BF, g.K, g.N, g.K));
    else
      LT_CHECK(api->layout_create(&la, CUDA_R_16BF, g.N, g.K, g.N));
    LT_CHECK(api->layout_create(&lb, CUDA_R_16BF, g.K, g.M, g.K));
    LT_CHECK(api->layout_create(&lc, CUDA_R_16BF, g.N, g.M, g.N));
    cublasLtMatmulPreference_t pref;
    LT_CHECK(api->pref_create(&pref));
    LT_CHECK(api->pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes));
    std::vector<cublasLtMatmulHeuristicResult_t> res(want);
    int got = 0;
    LT_CHECK(api->heuristic(lt, desc, la, lb, lc, lc, pref, want, res.data(), &got));
    const float alpha = 1.0f, beta = g.onto ? 1.0f : 0.0f;
    auto run_lt = [&](int i) {
      if (g.onto) C.copy_(C0);
      return api->matmul(lt, desc, &alpha, B.data_ptr(), la, A.data_ptr(), lb, &beta, C.data_ptr(), lc, C.data_ptr(),
                         lc, &res[i].algo, ws.data_ptr(), ws_bytes, stream);
    };
    // correctness, then one quick timing each; how many give the first candidate's bits (the tuner's condition)
    std::vector<std::pair<double, int>> quick;
    int wrong = 0, same_bits = 0;
    at::Tensor first_bits;
    for (int i = 0; i < got; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > ws_bytes) continue;
      C.fill_(std::nan(""));
      if (run_lt(i) != CUBLAS_STATUS_SUCCESS) continue;
      const double err = (C.to(at::kFloat) - ref.to(at::kFloat)).abs().max().item<float>() / scale;
      if (!(err <= 2e-2)) {
        ++wrong;
        continue;
      }
      if (i == 0) first_bits = C.clone();
      if (first_bits.defined() && at::equal(C, first_bits)) ++same_bits;
      for (int w = 0; w < 2; ++w) run_lt(i);
      quick.push_back({time_us([&] { run_lt(i); }, 10, 1), i});
    }
    if (quick.empty()) {
      std::printf("| %s | %s | %lld x %lld x %lld | no candidate ran |\n", g.model.c_str(), g.label.c_str(),
                  static_cast<long long>(g.M), static_cast<long long>(g.N), static_cast<long long>(g.K));
      continue;
    }
    std::sort(quick.begin(), quick.end());
    std::vector<int> finalists = {0};  // the heuristic's first (index 0 when it ran)
    for (size_t q = 0; q < quick.size() && finalists.size() < 5; ++q)
      if (quick[q].second != 0) finalists.push_back(quick[q].second);
    // interleaved rounds: ATen, the copy (onto's), the tuned GEMM (tuned_gemm.h: its first call times the
    // candidates), each finalist
    auto tuned = [&] {
      if (g.onto) C.copy_(C0);
      qt::kernels::gemm_out(C, A, Bop, g.onto);
    };
    tuned();
    std::vector<std::vector<double>> t(finalists.size() + 3);
    for (int round = 0; round < 9; ++round) {
      t.back().push_back(time_us(tuned, reps, 1));
      t[0].push_back(time_us(aten, reps, 1));
      t[1].push_back(g.onto ? time_us([&] { C.copy_(C0); }, reps, 1) : 0.0);
      for (size_t f = 0; f < finalists.size(); ++f) t[f + 2].push_back(time_us([&] { run_lt(finalists[f]); }, reps, 1));
    }
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const double copy = med(t[1]);
    const double aten_us = med(t[0]) - copy;
    const double first_us = med(t[2]) - copy;
    const double tuned_us = med(t.back()) - copy;
    double best_us = first_us;
    int best = finalists[0];
    for (size_t f = 1; f < finalists.size(); ++f) {  // (t's last row is the tuned GEMM's)
      const double us = med(t[f + 2]) - copy;
      if (us < best_us) best_us = us, best = finalists[f];
    }
    const double flops = 2.0 * g.M * g.N * g.K;
    std::printf(
        "| %s | %s | %lld x %lld x %lld | %.1f (%.0f, %.0f%%) | %.1f | %.1f (%d, %s) | %.3f | %d, %d, %d | %.1f | "
        "%.3f |\n",
        g.model.c_str(), g.label.c_str(), static_cast<long long>(g.M), static_cast<long long>(g.N),
        static_cast<long long>(g.K), aten_us, flops / (aten_us * 1e-6) / 1e12, 100.0 * flops / (aten_us * 1e-6) / rate,
        first_us, best_us, best, describe(api, res[best].algo).c_str(), aten_us / best_us, got, wrong, same_bits,
        tuned_us, aten_us / tuned_us);
    std::fflush(stdout);
    api->pref_destroy(pref);
    api->layout_destroy(la);
    api->layout_destroy(lb);
    api->layout_destroy(lc);
    api->desc_destroy(desc);
  }
  return 0;
}
#else
int main() {
  std::fprintf(stderr, "bench_gemm_algos: built without CUDA\n");
  return 1;
}
#endif
