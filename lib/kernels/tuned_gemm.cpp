// The tuned GEMM (tuned_gemm.h): cuBLASLt with the fastest of its heuristic's candidates that give the first one's
// bits, picked by timing at a problem's first call; ATen everywhere else.
#include "lib/kernels/tuned_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lib/core/error.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <dlfcn.h>

#include "lib/kernels/cublaslt_api.h"
#endif

namespace qt::kernels {
namespace {

std::atomic<int64_t> n_tuned{0}, n_timed{0}, n_other_bits{0}, n_picked_other{0}, n_lt{0}, n_aten{0};

// -1: not yet read from the environment.
std::atomic<int> tuning_mode{-1};
std::atomic<int> tuning_paused{0};  // live GemmTuningPause objects

void aten_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  ++n_aten;
  if (accumulate)
    const_cast<at::Tensor&>(out).addmm_(a, b);
  else
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
}

#ifdef QT_WITH_CUDA

// One operand as cuBLAS sees it: column-major, op applied.
struct LtOperand {
  cublasOperation_t op;
  int64_t rows, cols, ld;
};

// A row-major [R, C] view with strides (s0, s1) as the column-major operand cuBLAS multiplies, X^T: with contiguous
// rows its memory is X^T itself (op N, ld s0), with contiguous columns X (op T, ld s1). False where neither stride is
// 1 or the leading dimension is not a 16-byte multiple.
bool transposed_operand(const at::Tensor& x, LtOperand& o) {
  const int64_t R = x.size(0), C = x.size(1), s0 = x.stride(0), s1 = x.stride(1), e = x.element_size();
  if (s1 == 1 && s0 >= C && (s0 * e) % 16 == 0) {
    o = {CUBLAS_OP_N, C, R, s0};
    return true;
  }
  if (s0 == 1 && s1 >= R && (s1 * e) % 16 == 0) {
    o = {CUBLAS_OP_T, R, C, s1};
    return true;
  }
  return false;
}

int alignment(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int, int, int64_t, int64_t, int64_t, int, int, int, bool>;

// RAII holders of cuBLASLt's descriptors.
struct LtProblem {
  LtProblem(const LtProblem&) = delete;
  LtProblem& operator=(const LtProblem&) = delete;
  const CublasLtApi* api;
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  explicit LtProblem(const CublasLtApi* a) : api(a) {}
  ~LtProblem() {
    if (pref) api->pref_destroy(pref);
    if (lc) api->layout_destroy(lc);
    if (lb) api->layout_destroy(lb);
    if (la) api->layout_destroy(la);
    if (desc) api->desc_destroy(desc);
  }
};

bool ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }

// A problem's decision, kept for the process: its descriptors and algorithm, or ATen (`p` null: no candidate, an
// accumulating output too large to copy for timing, or the tuning budget spent).
struct Kept {
  std::shared_ptr<LtProblem> p;
  cublasLtMatmulAlgo_t algo{};
};

std::mutex cache_mutex;
std::map<Key, Kept> cache;
constexpr int64_t kMaxTunedProblems = 256;
constexpr int kCandidates = 16;
constexpr int64_t kMaxScratchBytes = int64_t{64} << 20;  // an accumulating problem's copy of its output, to time on

// A candidate's output taken to have the first candidate's bits: the same 32-bit sum of its 16-bit words (in
// int32, wrapping: at::sum promoted to int64 would first copy the whole output in int64, 2 GB for an lm_head tile),
// the same first 64 rows and the same rows at a stride of M / 64 (a rounding difference moves the sum, and a kernel
// of other tiles differs in every tile).
struct Fingerprint {
  int64_t sum = 0;
  at::Tensor rows;
  bool same(const Fingerprint& o) const { return sum == o.sum && at::equal(rows, o.rows); }
};
Fingerprint fingerprint(const at::Tensor& y) {
  Fingerprint f;
  const at::Tensor words = y.view(at::kShort);
  f.sum = at::sum(words, at::kShort).item<int64_t>();
  if (y.size(1) % 2 == 0 && y.stride(0) % 2 == 0 && y.storage_offset() % 2 == 0) {
    const at::Tensor pairs = y.view(at::kInt);
    f.sum = f.sum * 65536 + at::sum(pairs, at::kInt).item<int64_t>();
  }
  const int64_t M = y.size(0), step = std::max<int64_t>(1, M / 64);
  f.rows = at::cat({y.narrow(0, 0, std::min<int64_t>(M, 64)), y.slice(0, 0, M, step)});
  return f;
}

bool tuning_possible() {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return false;
  if (c10::cuda::warning_state().get_sync_debug_mode() != c10::cuda::SyncDebugMode::L_DISABLED) return false;
  return true;
}

// Runs out (=|+=) a b through cuBLASLt where the problem allows; false: the caller runs ATen.
bool lt_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const CublasLtApi* api = cublaslt_api();
  if (api == nullptr) return false;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M < 64 || N < 64 || K < 64) return false;
  // C^T [N, M] = op(X) [N, K] op(Y) [K, M] with X from b (b^T wanted), Y from a (a^T wanted); D = C^T.
  LtOperand x, y;
  if (!transposed_operand(b, x) || !transposed_operand(a, y)) return false;
  if (out.stride(1) != 1 || out.stride(0) < N || (out.stride(0) * out.element_size()) % 16 != 0) return false;
  const int al_a = alignment(a.data_ptr()), al_b = alignment(b.data_ptr()), al_c = alignment(out.data_ptr());
  if (al_a < 16 || al_b < 16 || al_c < 16) return false;
  const Key key{
      a.get_device(), M,    N,    K,         static_cast<int>(x.op), static_cast<int>(y.op), x.ld, y.ld, out.stride(0),
      al_a,           al_b, al_c, accumulate};

  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  void* ws = at::cuda::getCUDABlasLtWorkspace();
  const size_t ws_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  auto run_on = [&](const LtProblem& p, const cublasLtMatmulAlgo_t& algo, const at::Tensor& c) {
    return api->matmul(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, &alpha, b.data_ptr(), p.la, a.data_ptr(), p.lb,
                       &beta, c.data_ptr(), p.lc, c.data_ptr(), p.lc, &algo, ws, ws_bytes, stream);
  };

  std::unique_lock<std::mutex> lock(cache_mutex);
  if (auto it = cache.find(key); it != cache.end()) {
    const Kept kept = it->second;
    lock.unlock();
    if (!kept.p || !ok(run_on(*kept.p, kept.algo, out))) return false;
    ++n_lt;
    return true;
  }
  if (tuning_paused.load() > 0) return false;  // ATen now, the problem left for a later call to time
  auto keep_aten = [&] {
    cache[key] = Kept{};
    return false;
  };
  const cudaDataType_t ct = CUDA_R_16BF;  // (gemm_out sends bf16 only)
  auto owned = std::make_shared<LtProblem>(api);
  LtProblem& p = *owned;
  if (!ok(api->desc_create(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) ||
      !ok(api->desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &x.op, sizeof x.op)) ||
      !ok(api->desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &y.op, sizeof y.op)) ||
      !ok(api->layout_create(&p.la, ct, x.rows, x.cols, x.ld)) ||
      !ok(api->layout_create(&p.lb, ct, y.rows, y.cols, y.ld)) ||
      !ok(api->layout_create(&p.lc, ct, N, M, out.stride(0))))
    return keep_aten();
  auto run = [&](const cublasLtMatmulAlgo_t& algo, const at::Tensor& c) { return run_on(p, algo, c); };
  // First call: the heuristic's candidates (the preference names the operands' real alignment, as ATen's does).
  if (!ok(api->pref_create(&p.pref)) ||
      !ok(api->pref_set(p.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes)))
    return keep_aten();
  const uint32_t aa = static_cast<uint32_t>(al_b), ab = static_cast<uint32_t>(al_a), ac = static_cast<uint32_t>(al_c);
  api->pref_set(p.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
  api->pref_set(p.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
  api->pref_set(p.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
  api->pref_set(p.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
  std::vector<cublasLtMatmulHeuristicResult_t> res(kCandidates);
  int got = 0;
  if (!ok(api->heuristic(at::cuda::getCurrentCUDABlasLtHandle(), p.desc, p.la, p.lb, p.lc, p.lc, p.pref, kCandidates,
                         res.data(), &got)))
    got = 0;
  std::vector<cublasLtMatmulAlgo_t> cands;
  for (int i = 0; i < got; ++i)
    if (ok(res[i].state) && res[i].workspaceSize <= ws_bytes) cands.push_back(res[i].algo);
  const bool scratch_fits = !accumulate || M * N * out.element_size() <= kMaxScratchBytes;
  if (cands.empty() || !scratch_fits || n_tuned.load() >= kMaxTunedProblems) return keep_aten();
  if (!tuning_possible()) return false;  // ATen now; timed at a later call where it can be
  // Timed on `out` itself (its value is written again below) or, accumulating, on a copy reset before each run.
  const at::Tensor target = accumulate ? at::empty({M, N}, out.options()) : out;
  auto reset = [&] {
    if (accumulate) const_cast<at::Tensor&>(target).copy_(out);
  };
  reset();
  if (!ok(run(cands[0], target))) return keep_aten();
  const Fingerprint first = fingerprint(target);
  std::vector<size_t> same = {0};
  for (size_t i = 1; i < cands.size(); ++i) {
    reset();
    if (!ok(run(cands[i], target))) continue;
    if (fingerprint(target).same(first)) {
      same.push_back(i);
    } else {
      ++n_other_bits;
    }
  }
  std::vector<std::vector<float>> ms(same.size());
  for (int round = 0; round < 3; ++round) {
    for (size_t j = 0; j < same.size(); ++j) {
      reset();
      at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
      start.record();
      (void)run(cands[same[j]], target);
      stop.record();
      stop.synchronize();
      ms[j].push_back(start.elapsed_time(stop));
    }
  }
  size_t best = 0;
  float best_ms = 0;
  for (size_t j = 0; j < same.size(); ++j) {
    std::sort(ms[j].begin(), ms[j].end());
    const float med = ms[j][1];
    // another candidate only when it is at least 1% faster than the first (timing noise is about that)
    if (j == 0 || (med < best_ms && med < ms[0][1] * 0.99f)) {
      best = j;
      best_ms = med;
    }
  }
  ++n_tuned;
  n_timed += static_cast<int64_t>(same.size());
  if (best != 0) ++n_picked_other;
  Kept kept;
  kept.p = owned;
  kept.algo = cands[same[best]];
  cache[key] = kept;
  lock.unlock();
  if (!ok(run(kept.algo, out))) return false;
  ++n_lt;
  return true;
}

#endif

}  // namespace

#ifdef QT_WITH_CUDA
const CublasLtApi* cublaslt_api() {
  static const CublasLtApi* api = []() -> const CublasLtApi* {
    void* h = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_NOLOAD);
    if (h == nullptr) h = dlopen("libcublasLt.so", RTLD_NOW | RTLD_NOLOAD);
    if (h == nullptr) h = RTLD_DEFAULT;
    static CublasLtApi a;
    bool all = true;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      all = all && fn != nullptr;
    };
    get(a.desc_create, "cublasLtMatmulDescCreate");
    get(a.desc_destroy, "cublasLtMatmulDescDestroy");
    get(a.desc_set, "cublasLtMatmulDescSetAttribute");
    get(a.layout_create, "cublasLtMatrixLayoutCreate");
    get(a.layout_destroy, "cublasLtMatrixLayoutDestroy");
    get(a.pref_create, "cublasLtMatmulPreferenceCreate");
    get(a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    get(a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    get(a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    get(a.algo_get, "cublasLtMatmulAlgoConfigGetAttribute");
    get(a.matmul, "cublasLtMatmul");
    return all ? &a : nullptr;
  }();
  return api;
}
#endif

bool gemm_tuning() {
  int m = tuning_mode.load();
  if (m < 0) {
    const char* v = std::getenv("QT_GEMM_TUNE");
    m = (v != nullptr && std::string(v) == "0") ? 0 : 1;
    int expected = -1;
    if (!tuning_mode.compare_exchange_strong(expected, m)) m = expected;
  }
  return m == 1;
}

void set_gemm_tuning(bool on) { tuning_mode.store(on ? 1 : 0); }

GemmTuningPause::GemmTuningPause() { ++tuning_paused; }
GemmTuningPause::~GemmTuningPause() { --tuning_paused; }

void gemm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  QT_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) && out.size(0) == a.size(0) &&
               out.size(1) == b.size(1),
           ErrorKind::Internal, "gemm_out: shapes do not chain");
#ifdef QT_WITH_CUDA
  const auto t = a.scalar_type();
  // bf16 only: the dtype timed and tested on a GPU (fp16's GEMMs stay ATen's, with its reduced-precision settings).
  if (a.is_cuda() && t == at::kBFloat16 && b.scalar_type() == t && out.scalar_type() == t && b.device() == a.device() &&
      out.device() == a.device() && gemm_tuning() && lt_gemm(out, a, b, accumulate))
    return;
#endif
  aten_gemm(out, a, b, accumulate);
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_out(out, a, b, false);
  return out;
}

GemmTunerCounts gemm_tuner_counts() {
  GemmTunerCounts c;
  c.problems_tuned = n_tuned.load();
  c.candidates_timed = n_timed.load();
  c.candidates_other_bits = n_other_bits.load();
  c.picked_other = n_picked_other.load();
  c.lt_calls = n_lt.load();
  c.aten_calls = n_aten.load();
  return c;
}

}  // namespace qt::kernels
