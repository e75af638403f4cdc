// The NF4 GEMM (lib/kernels/nf4_gemm.h, the fused Hopper kernel) against what the trainer runs without it: the
// weights dequantized by nf4_dequant's grouped launch into a bf16 buffer, then one cuBLAS GEMM (ATen's mm), and
// against that GEMM alone (the weights held in bf16: the matrix rate the fused kernel would have to reach to
// save the dequantization pass whole). Shapes: the projections of a Llama 3.1 8B and a 3.2 1B block at the
// token counts of issue 27's rows. Times are medians of CUDA-event batches (bench_timing.h) over two buffer sets;
// each row also prints the fused result's largest difference from the reference, relative to its largest value,
// and the kernel's other variants (lib/kernels/sm90/nf4_gemm_sm90.h: one producer warpgroup; the codes stored
// undecoded, wrong values, that design's ceiling; W decoded into registers as wgmma's A operand, alone, undecoded,
// with two wgmma groups in flight, on a persistent grid, and that loading half of x's tile, wrong values); then the
// fastest variant with right values, its rate, its ratios and its own largest difference.
// Usage: bench_nf4_gemm [--only=SUBSTRING] [--variants=N,N,...]
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"
#include "lib/kernels/nf4_gemm.h"

#ifdef QT_WITH_CUDA
#include "bench/bench_nf4.h"
#include "bench/bench_timing.h"
#endif

namespace {

#ifdef QT_WITH_CUDA
struct Shape {
  std::string name;
  int64_t m, k;
  std::vector<int64_t> rows;  // one weight each, side by side in the output (q / k / v, gate / up)
};
#endif

}  // namespace

int main(int argc, char** argv) {
#ifndef QT_WITH_CUDA
  (void)argc, (void)argv;
  std::printf("bench_nf4_gemm: this build has no CUDA kernels\n");
  return 0;
#else
  std::string only;
  // The kernel's variants timed besides the default (lib/kernels/sm90/nf4_gemm_sm90.h): 1 one producer warpgroup,
  // 3 undecoded (wrong values), 5 W in registers, 6 that undecoded (wrong values), 7 5 with two wgmma groups in
  // flight, 8 and 9 5 and 7 on a persistent grid, 10 8 loading half of x's tile (wrong values), 12, 13 and 14 5, 8
  // and 9 decoding by byte permutes; 11 and 15 (8 and 13 in clusters sharing x's tiles) only where --variants
  // names them.
  std::vector<int> variants = {1, 3, 5, 6, 7, 8, 9, 10, 12, 13, 14};
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--only=", 7) == 0) only = argv[i] + 7;
    if (std::strncmp(argv[i], "--variants=", 11) == 0) {
      variants.clear();
      for (const char* c = argv[i] + 11; *c;) {
        char* end = nullptr;
        variants.push_back(static_cast<int>(std::strtol(c, &end, 10)));
        if (end == c) {
          std::fprintf(stderr, "bench_nf4_gemm: --variants=%s: expected numbers separated by commas\n", argv[i] + 11);
          return 2;
        }
        c = *end == ',' ? end + 1 : end;
      }
    }
  }
  if (!at::hasCUDA()) {
    std::printf("bench_nf4_gemm: no CUDA device\n");
    return 1;
  }
  const std::vector<Shape> shapes = {
      {"8b qkv m4096", 4096, 4096, {4096, 1024, 1024}}, {"8b o m4096", 4096, 4096, {4096}},
      {"8b gate_up m4096", 4096, 4096, {14336, 14336}},  {"8b down m4096", 4096, 14336, {4096}},
      {"8b qkv m8192", 8192, 4096, {4096, 1024, 1024}}, {"8b gate_up m8192", 8192, 4096, {14336, 14336}},
      {"8b down m8192", 8192, 14336, {4096}},           {"1b qkv m8192", 8192, 2048, {2048, 512, 512}},
      {"1b gate_up m8192", 8192, 2048, {8192, 8192}},    {"1b down m8192", 8192, 8192, {2048}},
  };
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  std::printf(
      "| shape | m x n x k | fused us | TFLOP/s | dequant + mm us | mm alone us | fused / (dequant + mm) | max rel "
      "diff |");
  for (int v : variants) std::printf(" v%d us |", v);
  std::printf(" fastest correct variant | its TFLOP/s | its / (dequant + mm) | its / mm | its max rel diff |\n|");
  for (size_t i = 0; i < 8 + variants.size() + 5; ++i) std::printf("---|");
  std::printf("\n");
  for (const Shape& s : shapes) {
    if (!only.empty() && s.name.find(only) == std::string::npos) continue;
    int64_t n = 0;
    for (int64_t r : s.rows) n += r;
    constexpr int kSets = 2;
    std::vector<std::vector<qt::kernels::Nf4Data>> data(kSets);
    std::vector<std::vector<const qt::kernels::Nf4Data*>> ws(kSets);
    std::vector<at::Tensor> xs, ys, wbufs;
    for (int i = 0; i < kSets; ++i) {
      for (int64_t r : s.rows) data[i].push_back(qt::bench::random_nf4(r * s.k));
      for (const auto& d : data[i]) ws[i].push_back(&d);
      xs.push_back(at::randn({s.m, s.k}, bf16));
      ys.push_back(at::empty({s.m, n}, bf16));
      wbufs.push_back(at::empty({n, s.k}, bf16));
    }
    const std::string unfit = qt::kernels::nf4_gemm_unfit(xs[0], ws[0], ys[0]);
    if (!unfit.empty()) {
      std::printf("| %s | fused kernel unavailable: %s |\n", s.name.c_str(), unfit.c_str());
      continue;
    }
    // The trainer's path: the group dequantized in one launch into the rows of one buffer, then one GEMM.
    auto dequant_mm = [&](int i) {
      std::vector<at::Tensor> outs;
      int64_t r0 = 0;
      for (const auto* d : ws[i]) {
        outs.push_back(wbufs[i].narrow(0, r0, d->numel / s.k));
        r0 += d->numel / s.k;
      }
      qt::kernels::nf4_dequant_group_into(ws[i], outs);
      at::mm_out(ys[i], xs[i], wbufs[i].t());
    };
    const double t_ref = qt::bench::time_us(kSets, dequant_mm);
    const double t_mm = qt::bench::time_us(kSets, [&](int i) { at::mm_out(ys[i], xs[i], wbufs[i].t()); });
    const double t_fused =
        qt::bench::time_us(kSets, [&](int i) { qt::kernels::nf4_linear_into(xs[i], ws[i], ys[i], false); });
    std::vector<double> t_var;
    for (int v : variants)
      t_var.push_back(
          qt::bench::time_us(kSets, [&](int i) { qt::kernels::nf4_linear_into(xs[i], ws[i], ys[i], false, {}, v); }));
    dequant_mm(0);
    const at::Tensor ref0 = ys[0].to(at::kFloat);
    auto rel_diff = [&](int variant) {
      ys[0].fill_(std::nan(""));
      qt::kernels::nf4_linear_into(xs[0], ws[0], ys[0], false, {}, variant);
      return ((ys[0].to(at::kFloat) - ref0).abs().max() / ref0.abs().max().clamp_min(1e-30)).item<double>();
    };
    // The fastest of the variants with right values (not 3, 6 or 10).
    int best = 0;
    double t_best = t_fused;
    for (size_t i = 0; i < variants.size(); ++i)
      if (variants[i] != 3 && variants[i] != 6 && variants[i] != 10 && t_var[i] < t_best)
        best = variants[i], t_best = t_var[i];
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(n) * static_cast<double>(s.k);
    std::printf("| %s | %ld x %ld x %ld | %.1f | %.0f | %.1f | %.1f | %.3f | %.2e |", s.name.c_str(),
                static_cast<long>(s.m), static_cast<long>(n), static_cast<long>(s.k), t_fused,
                flops / (t_fused * 1e-6) / 1e12, t_ref, t_mm, t_fused / t_ref, rel_diff(0));
    for (double t : t_var) std::printf(" %.1f |", t);
    std::printf(" %d | %.0f | %.3f | %.3f | %.2e |\n", best, flops / (t_best * 1e-6) / 1e12, t_best / t_ref,
                t_best / t_mm, rel_diff(best));
    std::fflush(stdout);  // each row out as it is measured: a call cut short by its time limit keeps the rows before
  }
  return 0;
#endif
}
