// LoRA's rank-r GEMM kernels (lib/kernels/lora_gemm.cu: lora_project, lora_grads) against their references (ATen's
// GEMMs through cuBLAS, the calls the LoRA nodes made before) on the 8B shape's LoRA products at 2 x 2048 tokens, r 16:
// the forward pass's x A^T of each projection, and each node's A and B gradients (one kernel launch against one GEMM
// a gradient). The physical limit beside each: the bytes the case must read and write over the device's copy
// bandwidth (a 1 GiB device-to-device copy, read and write counted). Times: medians of 7 batches of 20 calls timed
// with CUDA events, each call on another set of buffers (the sets together several times the L2 cache: DRAM figures).
// Beside them cuBLAS on each product transposed (a x^T into [r, M]; a B gradient as g^T x into [r, N]): whether the
// other orientation gets cuBLAS a better kernel for the ATen path.
// Usage: bench_lora_gemm [tokens=4096] [8b|1b]: the LoRA products of Llama 3.1 8B's block (the default) or Llama 3.2
// 1B's (H 2048, I 8192, kv 512: the 1B step's profile ran its x A^T at 37-45% of the bandwidth, at 8192 tokens).
// Results: docs/PERFORMANCE.md.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_timing.h"
#include "lib/kernels/fused_ops.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

#ifdef QT_WITH_CUDA
using qt::bench::sets_for;
using qt::bench::time_us;

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? std::atoll(argv[1]) : 4096;
  const std::string model = argc > 2 ? argv[2] : "8b";
  if (model != "8b" && model != "1b") {
    std::fprintf(stderr, "bench_lora_gemm: the model is 8b or 1b (got %s)\n", model.c_str());
    return 2;
  }
  // The block's widths: hidden (= q), intermediate, k / v.
  const int64_t H = model == "8b" ? 4096 : 2048, I = model == "8b" ? 14336 : 8192, KV = model == "8b" ? 1024 : 512;
  auto name = [](const char* fmt, auto... v) {
    char buf[128];
    std::snprintf(buf, sizeof buf, fmt, static_cast<long long>(v)...);
    return std::string(buf);
  };
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  // the copy bandwidth: 1 GiB read and written
  const double bw = qt::bench::copy_bytes_per_s();
  std::printf("%s, %lld tokens, the %s block's products; copy bandwidth %.0f GB/s\n",
              at::cuda::getCurrentDeviceProperties()->name, static_cast<long long>(M), model.c_str(), bw / 1e9);
  std::printf("| case | MB moved | limit us | kernel us | reference us | reference / kernel | kernel GB/s | us with 1, 2, "
              "4, 8 CTAs a cluster | cuBLAS, the product transposed us |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  // k: the kernel's time with the cluster it picks; by_cluster: with 1, 2, 4 and 8 CTAs a cluster; flipped: cuBLAS
  // on the transposed product (out^T = a x^T; a B gradient as g^T x instead of x^T g): another kernel choice, for
  // the ATen path's orientation
  auto row = [&](const std::string& name, double bytes, double k, double ref, const std::vector<double>& by_cluster,
                 double flipped) {
    std::printf("| %s | %.1f | %.1f | %.1f | %.1f | %.2fx | %.0f | %.1f, %.1f, %.1f, %.1f | %.1f |\n", name.c_str(),
                bytes / 1e6, bytes / bw * 1e6, k, ref, ref / k, bytes / (k * 1e-6) / 1e9, by_cluster[0], by_cluster[1],
                by_cluster[2], by_cluster[3], flipped);
  };
  struct Proj {
    std::string name;
    int64_t K, r;
  };
  for (const Proj& p : {Proj{name("x A^T q/k/v (K %lld, r 48)", H), H, 48}, Proj{name("x A^T o_proj (K %lld, r 16)", H), H, 16},
                        Proj{name("x A^T gate/up (K %lld, r 32)", H), H, 32},
                        Proj{name("x A^T down_proj (K %lld, r 16)", I), I, 16}}) {
    const double bytes = 2.0 * (M * p.K + p.r * p.K + M * p.r);
    const int sets = sets_for(bytes);
    std::vector<at::Tensor> xs, outs;
    const at::Tensor a = at::randn({p.r, p.K}, opt);
    for (int i = 0; i < sets; ++i) {
      xs.push_back(at::randn({M, p.K}, opt));
      outs.push_back(at::empty({M, p.r}, opt));
    }
    const double k = time_us(sets, [&](int i) { qt::lora_project(outs[i], xs[i], a); });
    const double ref = time_us(sets, [&](int i) { qt::lora_project_reference(outs[i], xs[i], a); });
    std::vector<double> by_cluster;
    for (int c : {1, 2, 4, 8}) by_cluster.push_back(time_us(sets, [&](int i) { qt::lora_project(outs[i], xs[i], a, true, c); }));
    std::vector<at::Tensor> outs_t;
    for (int i = 0; i < sets; ++i) outs_t.push_back(at::empty({p.r, M}, opt));
    const double flipped = time_us(sets, [&](int i) { at::mm_out(outs_t[i], a, xs[i].t()); });
    row(p.name, bytes, k, ref, by_cluster, flipped);
  }
  struct Grad {
    std::string name;
    std::vector<std::pair<int64_t, int64_t>> jobs;  // (r, N): the first g^T x, the rest transposed (B gradients)
  };
  for (const Grad& gcase :
       {Grad{name("dA, dB q/k/v (x %lld; dy %lld, %lld, %lld)", H, H, KV, KV), {{48, H}, {16, H}, {16, KV}, {16, KV}}},
        Grad{name("dA, dB o_proj (x %lld; dy %lld)", H, H), {{16, H}, {16, H}}},
        Grad{name("dA, dB gate/up (x %lld; dy %lld x 2)", H, I), {{32, H}, {16, I}, {16, I}}},
        Grad{name("dA, dB down_proj (x %lld; dy %lld)", I, H), {{16, I}, {16, H}}}}) {
    double bytes = 0;
    for (const auto& [r, n] : gcase.jobs) bytes += 2.0 * (M * n + M * r) + 4.0 * r * n;
    const int sets = sets_for(bytes);
    std::vector<std::vector<qt::LoraGrad>> jobs(static_cast<size_t>(sets));
    for (int i = 0; i < sets; ++i)
      for (size_t j = 0; j < gcase.jobs.size(); ++j)
        jobs[static_cast<size_t>(i)].push_back({at::randn({M, gcase.jobs[j].first}, opt),
                                                at::randn({M, gcase.jobs[j].second}, opt), j == 0 ? 1.0 : 2.0, j > 0});
    const double k = time_us(sets, [&](int i) { qt::lora_grads(jobs[static_cast<size_t>(i)]); });
    const double ref = time_us(sets, [&](int i) { qt::lora_grads_reference(jobs[static_cast<size_t>(i)]); });
    std::vector<double> by_cluster;
    for (int c : {1, 2, 4, 8})
      by_cluster.push_back(time_us(sets, [&](int i) { qt::lora_grads(jobs[static_cast<size_t>(i)], true, c); }));
    const double flipped = time_us(sets, [&](int i) {
      for (qt::LoraGrad j : jobs[static_cast<size_t>(i)]) {
        j.transposed = !j.transposed;
        qt::lora_grads_reference({j});
      }
    });
    row(gcase.name, bytes, k, ref, by_cluster, flipped);
  }
  return 0;
}
#else
int main() {
  std::printf("bench_lora_gemm: built without CUDA\n");
  return 0;
}
#endif
