// NF4 dequantization benchmark: the CUDA kernel (lib/kernels/nf4_dequant.cu) against the plain-ATen reference
// on the same GPU, and against the device's measured device-to-device copy bandwidth (the physical limit for
// a kernel that reads a little and writes a lot). Times are medians of batches timed with CUDA events; each
// launch in a batch uses a different set of buffers, and the sets together exceed the L2 cache several times,
// so the figures are DRAM figures. Bytes moved = packed codes (0.5 B/weight) + statistics + output.
// Usage: bench_nf4_dequant [reps=30]
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#endif

namespace {

using qt::kernels::Nf4Data;

struct Row {
  std::string name;
  double us = 0, ref_us = 0, gbps = 0, pct_copy = 0, speedup = 0;
  double mbytes = 0;
};

#ifdef QT_WITH_CUDA

Nf4Data random_nf4(int64_t numel) {
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
  Nf4Data d;
  d.numel = numel;
  d.blocksize = 64;
  const int64_t blocks = numel / 64;
  d.packed = at::randint(0, 256, {numel / 2}, u8);
  d.absmax_q = at::randint(0, 256, {blocks}, u8);
  d.nested_absmax = at::rand({(blocks + 255) / 256}, at::TensorOptions().device(at::kCUDA)).mul_(0.05).add_(0.005);
  d.nested_map = qt::kernels::dynamic_map_tensor().to(at::kCUDA);
  d.quant_map = qt::kernels::nf4_code_tensor().to(at::kCUDA);
  d.offset = 0.03f;
  return d;
}

double bytes_moved(const Nf4Data& d, int64_t out_elem) {
  return static_cast<double>(d.packed.nbytes() + d.absmax_q.nbytes() + d.nested_absmax.nbytes() +
                             d.nested_map.nbytes() + d.quant_map.nbytes() + d.numel * out_elem);
}

// Median over `reps` batches of `batch` calls of fn(i) (i = call index, for buffer rotation), in microseconds
// per call.
template <typename F>
double time_us(F&& fn, int reps, int batch) {
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < 3 * batch; ++i) fn(i);  // warm-up
  std::vector<double> t;
  int call = 0;
  for (int r = 0; r < reps; ++r) {
    at::cuda::CUDAEvent start(0), stop(0);  // timing enabled
    start.record(stream);
    for (int b = 0; b < batch; ++b) fn(call++);
    stop.record(stream);
    stop.synchronize();
    t.push_back(static_cast<double>(start.elapsed_time(stop)) * 1000.0 / batch);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One case: `names` weights of `shapes`, dequantized together in one launch (one weight: a plain launch).
Row run_case(const std::string& name, const std::vector<std::pair<int64_t, int64_t>>& shapes, at::ScalarType dtype,
             double copy_gbps, int reps) {
  const int64_t elem = at::elementSize(dtype);
  double set_bytes = 0;
  for (auto [r, c] : shapes) set_bytes += r * c * (0.5 + elem);
  // Enough buffer sets to spill a 50 MB L2 four times over.
  const int sets = std::max(2, static_cast<int>(std::ceil(200e6 / set_bytes)));
  std::vector<std::vector<Nf4Data>> data(sets);
  std::vector<std::vector<at::Tensor>> outs(sets);
  for (int s = 0; s < sets; ++s)
    for (auto [r, c] : shapes) {
      data[s].push_back(random_nf4(r * c));
      outs[s].push_back(at::empty({r, c}, at::TensorOptions().dtype(dtype).device(at::kCUDA)));
    }
  double moved = 0;
  for (const auto& d : data[0]) moved += bytes_moved(d, elem);

  auto kernel = [&](int i) {
    const int s = i % sets;
    std::vector<const Nf4Data*> ds;
    for (const auto& d : data[s]) ds.push_back(&d);
    qt::kernels::nf4_dequant_group_into(ds, outs[s]);
  };
  auto reference = [&](int i) {  // allocates its result, as the reference does wherever it runs
    const int s = i % sets;
    for (const auto& d : data[s]) (void)qt::kernels::nf4_dequant_ref(d, dtype);
  };

  // Correctness first: a benchmark of wrong output is no benchmark.
  kernel(0);
  for (size_t k = 0; k < data[0].size(); ++k) {
    at::Tensor ref = qt::kernels::nf4_dequant_ref(data[0][k], dtype);
    const auto bt = elem == 2 ? at::kShort : at::kInt;
    if (!at::equal(outs[0][k].reshape({-1}).view(bt), ref.view(bt)))
      qt::fail(qt::ErrorKind::Internal, "bench: kernel output differs from the reference for " + name);
  }
  Row row;
  row.name = name;
  row.mbytes = moved / 1e6;
  row.us = time_us(kernel, reps, 20);
  row.ref_us = time_us(reference, std::max(5, reps / 3), 2);
  row.gbps = moved / (row.us * 1e-6) / 1e9;
  row.pct_copy = 100.0 * row.gbps / copy_gbps;
  row.speedup = row.ref_us / row.us;
  return row;
}

// Device-to-device copy of a 1 GiB buffer: bytes read + bytes written per second.
double copy_bandwidth_gbps(int reps) {
  const int64_t n = int64_t{1} << 30;
  at::Tensor a = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA)).fill_(1);
  at::Tensor b = at::empty_like(a);
  const double us = time_us([&](int) { b.copy_(a); }, reps, 3);
  return 2.0 * static_cast<double>(n) / (us * 1e-6) / 1e9;
}

#endif

}  // namespace

int main(int argc, char** argv) {
#ifndef QT_WITH_CUDA
  (void)argc;
  (void)argv;
  std::fprintf(stderr, "bench_nf4_dequant: built without CUDA\n");
  return 1;
#else
  try {
    if (!at::hasCUDA()) {
      std::fprintf(stderr, "bench_nf4_dequant: no CUDA device\n");
      return 1;
    }
    const int reps = argc > 1 ? std::atoi(argv[1]) : 30;
    at::manual_seed(0);
    const double copy_gbps = copy_bandwidth_gbps(reps);
    const auto props = at::cuda::getCurrentDeviceProperties();
    std::printf("device: %s, device-to-device copy: %.0f GB/s (read + write)\n", props->name, copy_gbps);

    using Shapes = std::vector<std::pair<int64_t, int64_t>>;
    std::vector<Row> rows;
    auto add = [&](const std::string& name, const Shapes& shapes, at::ScalarType t) {
      rows.push_back(run_case(name, shapes, t, copy_gbps, reps));
      std::fprintf(stderr, "done %s\n", name.c_str());
    };
    const auto bf16 = at::kBFloat16, f16 = at::kHalf;
    // Llama-3.1-8B linears (out_features x in_features).
    add("8B q_proj 4096x4096 bf16", {{4096, 4096}}, bf16);
    add("8B k_proj 1024x4096 bf16", {{1024, 4096}}, bf16);
    add("8B v_proj 1024x4096 bf16", {{1024, 4096}}, bf16);
    add("8B o_proj 4096x4096 bf16", {{4096, 4096}}, bf16);
    add("8B gate_proj 14336x4096 bf16", {{14336, 4096}}, bf16);
    add("8B up_proj 14336x4096 bf16", {{14336, 4096}}, bf16);
    add("8B down_proj 4096x14336 bf16", {{4096, 14336}}, bf16);
    add("8B q+k+v one launch bf16", {{4096, 4096}, {1024, 4096}, {1024, 4096}}, bf16);
    add("8B gate+up one launch bf16", {{14336, 4096}, {14336, 4096}}, bf16);
    add("8B q_proj 4096x4096 fp32", {{4096, 4096}}, at::kFloat);
    // Unsloth NF4 challenge cases (hidden x intermediate, dtype): gate and up are [m, hd], down is [hd, m].
    struct U {
      int64_t hd, m;
      at::ScalarType t;
      const char* tn;
    };
    for (const U& u : {U{1024, 4096, bf16, "bf16"}, U{4096, 14336, bf16, "bf16"}, U{2048, 8192, f16, "fp16"}}) {
      const std::string base = "unsloth hd" + std::to_string(u.hd) + " m" + std::to_string(u.m) + " " + u.tn;
      add(base + " gate", {{u.m, u.hd}}, u.t);
      add(base + " up", {{u.m, u.hd}}, u.t);
      add(base + " down", {{u.hd, u.m}}, u.t);
    }

    std::printf("\n%-40s %9s %10s %10s %11s %9s %9s\n", "case", "MB moved", "kernel us", "GB/s", "% copy BW", "ATen us",
                "speedup");
    for (const Row& r : rows)
      std::printf("%-40s %9.1f %10.1f %10.0f %10.1f%% %9.1f %8.1fx\n", r.name.c_str(), r.mbytes, r.us, r.gbps,
                  r.pct_copy, r.ref_us, r.speedup);
    std::printf("copy bandwidth (limit): %.0f GB/s. Targets: >= 85%% of copy BW on 8B shapes, >= 5x ATen.\n",
                copy_gbps);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_nf4_dequant: %s\n", e.what());
    return 1;
  }
#endif
}
