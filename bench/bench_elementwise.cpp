// The model's elementwise kernels against the copy bandwidth, on the 8B shape's rows (2 x 2048 and 1 x 8192 tokens):
// SwiGLU forward and backward over gate / up read out of one packed [tokens, 2 I] output, each on its flat
// grid-stride loop (what the model runs) and on the [rows, runs of 256 vectors] grid (swiglu.cu's `by_rows`), and RoPE
// of q / k / v in its one launch each way (rope.cu). The limit beside each: the bytes it must read and write over the
// device's copy bandwidth (a 1 GiB device-to-device copy, read and write counted). Times: medians of 7 batches of 20
// calls timed with CUDA events, each call on another set of buffers (the sets together several times the L2 cache).
// Each pair of SwiGLU variants is checked for the same bits before it is timed.
// Usage: bench_elementwise. Results: docs/PERFORMANCE.md.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_timing.h"
#include "lib/kernels/fused_ops_kernels.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

#ifdef QT_WITH_CUDA
using qt::bench::sets_for;
using qt::bench::time_us;

int main() {
  using qt::kernels::ElemType;
  if (!at::hasCUDA()) {
    std::fprintf(stderr, "bench_elementwise: no CUDA device\n");
    return 1;
  }
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const double bw = qt::bench::copy_bytes_per_s();
  std::printf("%s; copy bandwidth %.0f GB/s\n", at::cuda::getCurrentDeviceProperties()->name, bw / 1e9);
  std::printf("| case | MB moved | limit us | flat loop us (GB/s) | rows grid us (GB/s) | flat / rows |\n");
  std::printf("|---|---|---|---|---|---|\n");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const int64_t I = 14336;
  for (int64_t tokens : {int64_t{4096}, int64_t{8192}}) {
    for (bool backward : {false, true}) {
      // forward: gate / up read, out written; backward: dy, gate / up read, dgate / dup written
      const double bytes = 2.0 * tokens * I * (backward ? 5 : 3);
      const int sets = sets_for(bytes);
      std::vector<at::Tensor> gu, dy, out;
      for (int i = 0; i < sets; ++i) {
        gu.push_back(at::randn({tokens, 2 * I}, opt));
        dy.push_back(backward ? at::randn({tokens, I}, opt) : at::Tensor());
        out.push_back(backward ? at::empty({tokens, 2 * I}, opt) : at::empty({tokens, I}, opt));
      }
      auto call = [&](int i, bool by_rows) {
        const char* g = static_cast<const char*>(gu[i].data_ptr());
        const int64_t half = I * 2;  // bytes to up's columns
        if (!backward) {
          qt::kernels::swiglu_forward_launch(g, g + half, out[i].data_ptr(), tokens, I, 2 * I, I, ElemType::BFloat16,
                                             stream, by_rows);
        } else {
          char* d = static_cast<char*>(out[i].data_ptr());
          qt::kernels::swiglu_backward_launch(dy[i].data_ptr(), g, g + half, d, d + half, tokens, I, 2 * I, I,
                                              ElemType::BFloat16, stream, by_rows);
        }
      };
      call(0, false);
      const at::Tensor flat = out[0].clone();
      call(0, true);
      const bool same = at::equal(flat, out[0]);
      const double f = time_us(sets, [&](int i) { call(i, false); });
      const double r = time_us(sets, [&](int i) { call(i, true); });
      std::printf("| SwiGLU %s, %lld x %lld%s | %.1f | %.1f | %.1f (%.0f) | %.1f (%.0f) | %.2fx |\n",
                  backward ? "backward" : "forward", static_cast<long long>(tokens), static_cast<long long>(I),
                  same ? "" : " (BITS DIFFER)", bytes / 1e6, bytes / bw * 1e6, f, bytes / (f * 1e-6) / 1e9, r,
                  bytes / (r * 1e-6) / 1e9, f / r);
    }
  }
  // RoPE of q / k / v, Llama 3 8B's heads (32 + 8 + 8 of 128), one launch each way (the model's path).
  const int64_t Hq = 32, Hkv = 8, D = 128, ld = (Hq + 2 * Hkv) * D;
  for (int64_t tokens : {int64_t{4096}, int64_t{8192}}) {
    for (bool inverse : {false, true}) {
      const double bytes = 2.0 * tokens * ld * 2;  // q, k, v read and written (cos / sin: L2)
      const int sets = sets_for(bytes);
      std::vector<at::Tensor> qkv, q, k, v;
      for (int i = 0; i < sets; ++i) {
        qkv.push_back(at::randn({tokens, ld}, opt));
        q.push_back(at::randn({tokens, Hq * D}, opt));
        k.push_back(at::randn({tokens, Hkv * D}, opt));
        v.push_back(at::randn({tokens, Hkv * D}, opt));
      }
      const at::Tensor cos = at::rand({tokens, D}, opt), sin = at::rand({tokens, D}, opt);
      const double t = time_us(sets, [&](int i) {
        char* base = static_cast<char*>(qkv[i].data_ptr());
        const int64_t e = 2;
        qt::kernels::RopeRows runs[3];
        if (!inverse) {
          runs[0] = {base, q[i].data_ptr(), ld, Hq * D, Hq, true};
          runs[1] = {base + Hq * D * e, k[i].data_ptr(), ld, Hkv * D, Hkv, true};
          runs[2] = {base + (Hq + Hkv) * D * e, v[i].data_ptr(), ld, Hkv * D, Hkv, false};
        } else {
          runs[0] = {q[i].data_ptr(), base, Hq * D, ld, Hq, true};
          runs[1] = {k[i].data_ptr(), base + Hq * D * e, Hkv * D, ld, Hkv, true};
          runs[2] = {v[i].data_ptr(), base + (Hq + Hkv) * D * e, Hkv * D, ld, Hkv, false};
        }
        qt::kernels::rope_runs_launch(runs, 3, cos.data_ptr(), sin.data_ptr(), tokens, D, inverse, ElemType::BFloat16,
                                      stream);
      });
      std::printf("| RoPE q / k / v %s, %lld tokens | %.1f | %.1f | %.1f (%.0f) | - | - |\n",
                  inverse ? "backward" : "forward", static_cast<long long>(tokens), bytes / 1e6, bytes / bw * 1e6, t,
                  bytes / (t * 1e-6) / 1e9);
    }
  }
  return 0;
}
#else
int main() {
  std::printf("bench_elementwise: built without CUDA\n");
  return 0;
}
#endif
