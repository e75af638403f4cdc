// NF4 dequantization benchmark: the CUDA kernel (lib/kernels/nf4_dequant.cu) against the plain-ATen reference
// on the same GPU, and against the device's measured device-to-device copy bandwidth (the physical limit for
// a kernel that reads a little and writes a lot). Times are medians of batches timed with CUDA events; each
// launch in a batch uses a different set of buffers, and the sets together exceed the L2 cache several times,
// so the figures are DRAM figures. Bytes moved = packed codes (0.5 B/weight) + statistics + output.
// Two timings per case: "stream", 20 calls of the public API launched back to back from the host (host work
// included where it exceeds the kernel's), and "graph", the same 20 calls captured in a CUDA graph and
// replayed (the device's time per kernel, launch gaps included). The copy limit is given twice: the 1 GiB copy
// bandwidth, and a cudaMemcpyAsync of the case's own byte count (half read, half written, rotated buffers,
// graph-timed): the practical ceiling at that size, where launch latency and the ramp of a kernel weigh; and
// "fill@", an ATen fill_ of the same outputs (the writes alone, nothing read). Results: docs/PERFORMANCE.md.
// Usage: bench_nf4_dequant [reps=30] [--no-ref] [--only=SUBSTRING,...] [--overlap=TOKENS: overlap_case's table alone]
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_nf4.h"
#include "lib/core/error.h"
#include "lib/kernels/nf4_dequant.h"
#include "lib/kernels/nf4_format.h"

#ifdef QT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using qt::kernels::Nf4Data;

struct Row {
  std::string name;
  double us = 0, host_us = 0, graph_us = 0, ref_us = 0, copy_us = 0, fill_us = 0;
  double mbytes = 0;
};

#ifdef QT_WITH_CUDA

using qt::bench::random_nf4;

double bytes_moved(const Nf4Data& d, int64_t out_elem) {
  return static_cast<double>(d.packed.nbytes() + d.absmax_q.nbytes() + d.nested_absmax.nbytes() +
                             d.nested_map.nbytes() + d.quant_map.nbytes() + d.numel * out_elem);
}

// Median over `reps` batches of `batch` calls of fn(i) (i = call index, for buffer rotation), in microseconds
// per call. host_us (optional): median host time per call to enqueue them (where it exceeds the device time,
// the stream figure measures the host).
template <typename F>
double time_us(F&& fn, int reps, int batch, double* host_us = nullptr) {
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int i = 0; i < 3 * batch; ++i) fn(i);  // warm-up
  std::vector<double> t, h;
  int call = 0;
  for (int r = 0; r < reps; ++r) {
    at::cuda::CUDAEvent start(0), stop(0);  // timing enabled
    start.record(stream);
    const auto h0 = std::chrono::steady_clock::now();
    for (int b = 0; b < batch; ++b) fn(call++);
    const auto h1 = std::chrono::steady_clock::now();
    stop.record(stream);
    stop.synchronize();
    t.push_back(static_cast<double>(start.elapsed_time(stop)) * 1000.0 / batch);
    h.push_back(std::chrono::duration<double, std::micro>(h1 - h0).count() / batch);
  }
  std::sort(t.begin(), t.end());
  std::sort(h.begin(), h.end());
  if (host_us) *host_us = h[h.size() / 2];
  return t[t.size() / 2];
}

// The same, with the `batch` calls captured once in a CUDA graph (on a side stream) and replayed `reps` times.
template <typename F>
double time_graph_us(F&& fn, int reps, int batch) {
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  c10::cuda::CUDAStreamGuard guard(side);
  for (int i = 0; i < batch; ++i) fn(i);  // warm-up outside the capture
  side.synchronize();
  at::cuda::CUDAGraph graph;
  graph.capture_begin();
  for (int i = 0; i < batch; ++i) fn(i);
  graph.capture_end();
  for (int i = 0; i < 3; ++i) graph.replay();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    at::cuda::CUDAEvent start(0), stop(0);
    start.record(side);
    graph.replay();
    stop.record(side);
    stop.synchronize();
    t.push_back(static_cast<double>(start.elapsed_time(stop)) * 1000.0 / batch);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One case: `names` weights of `shapes`, dequantized together in one launch (one weight: a plain launch).
Row run_case(const std::string& name, const std::vector<std::pair<int64_t, int64_t>>& shapes, at::ScalarType dtype,
             int reps, bool with_ref) {
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
  row.us = time_us(kernel, reps, 20, &row.host_us);
  row.graph_us = time_graph_us(kernel, reps, 20);
  if (with_ref) row.ref_us = time_us(reference, std::max(5, reps / 3), 2);
  // Write-only ceiling at this size: fill_ of the same outputs (no codes read), graph-timed.
  row.fill_us = time_graph_us(
      [&](int i) {
        for (auto& o : outs[i % sets]) o.fill_(0.5);
      },
      reps, 20);
  data.clear();
  outs.clear();

  // The practical ceiling at this size: a device-to-device copy of the same byte count (read + written).
  const int64_t half = static_cast<int64_t>(moved / 2) / 16 * 16;
  const int copy_sets = std::max(2, static_cast<int>(std::ceil(200e6 / (2.0 * half))));
  std::vector<at::Tensor> src, dst;
  for (int s = 0; s < copy_sets; ++s) {
    src.push_back(at::empty({half}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA)).fill_(1));
    dst.push_back(at::empty({half}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA)));
  }
  row.copy_us = time_graph_us([&](int i) { dst[i % copy_sets].copy_(src[i % copy_sets]); }, reps, 20);
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


// The 24 GiB plan's dequantization (each linear's bf16 weight made just before its GEMM) as the trainer runs it, one
// stream, against the same dequantizations on a side stream one linear ahead (double-buffered weights: linear j + 1's
// made while linear j's GEMM runs, an event each way), over 8 blocks of Llama-3.1-8B's forward linears at `tokens`
// tokens: q / k / v in one launch, o, gate / up in one launch, down. Whether the memory-bound pass hides under the
// GEMMs (their CTAs fill the SMs' registers: the dequantization's blocks may only fill the waves' tails). Prints the
// GEMMs alone, the dequantizations alone, in turn on one stream, and overlapped; interleaved rounds, medians (ms).
void overlap_case(int64_t tokens, int rounds) {
  struct Lin {
    std::vector<std::pair<int64_t, int64_t>> parts;  // [out, in] of each weight dequantized in one launch
  };
  const std::vector<Lin> lins = {{{{4096, 4096}, {1024, 4096}, {1024, 4096}}}, {{{4096, 4096}}},
                                 {{{14336, 4096}, {14336, 4096}}}, {{{4096, 14336}}}};
  const auto bf = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const int blocks = 8;
  std::vector<std::vector<Nf4Data>> data;   // [linear][part], shared by the blocks (109 MB: beyond the L2)
  std::vector<at::Tensor> x;                // [tokens, in] per linear
  std::vector<at::Tensor> y;                // [tokens, out] per linear
  std::vector<std::vector<at::Tensor>> w[2];  // [buffer][linear]: the [out, in] weight, its parts as row slices
  std::vector<at::Tensor> wfull[2];
  for (const Lin& l : lins) {
    std::vector<Nf4Data> ds;
    int64_t out = 0;
    const int64_t in = l.parts[0].second;
    for (auto [r, c] : l.parts) {
      ds.push_back(random_nf4(r * c));
      out += r;
    }
    data.push_back(std::move(ds));
    x.push_back(at::randn({tokens, in}, bf));
    y.push_back(at::empty({tokens, out}, bf));
    for (int b = 0; b < 2; ++b) {
      at::Tensor full = at::empty({out, in}, bf);
      std::vector<at::Tensor> parts;
      int64_t row = 0;
      for (auto [r, c] : l.parts) {
        parts.push_back(full.narrow(0, row, r));
        row += r;
      }
      wfull[b].push_back(full);
      w[b].push_back(parts);
    }
  }
  const int n = blocks * static_cast<int>(lins.size());
  auto dequant = [&](int j, int buf) {
    const int li = j % static_cast<int>(lins.size());
    std::vector<const Nf4Data*> ds;
    for (const auto& d : data[li]) ds.push_back(&d);
    qt::kernels::nf4_dequant_group_into(ds, w[buf][li]);
  };
  auto gemm = [&](int j, int buf) {
    const int li = j % static_cast<int>(lins.size());
    at::mm_out(y[li], x[li], wfull[buf][li].t());
  };
  auto main_stream = at::cuda::getCurrentCUDAStream();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  std::vector<at::cuda::CUDAEvent> made(n), used(n);
  auto serial = [&] {
    for (int j = 0; j < n; ++j) {
      dequant(j, j & 1);
      gemm(j, j & 1);
    }
  };
  auto gemms_only = [&] {
    for (int j = 0; j < n; ++j) gemm(j, j & 1);
  };
  auto dequants_only = [&] {
    for (int j = 0; j < n; ++j) dequant(j, j & 1);
  };
  auto overlapped = [&] {
    {  // the first weight on the side stream too, after what the main stream queued before
      at::cuda::CUDAEvent start;
      start.record(main_stream);
      start.block(side);
    }
    for (int j = 0; j < n; ++j) {
      if (j == 0) {
        c10::cuda::CUDAStreamGuard g(side);
        dequant(0, 0);
        made[0].record(side);
      }
      if (j + 1 < n) {  // linear j + 1's weight into the buffer linear j - 1 used
        c10::cuda::CUDAStreamGuard g(side);
        if (j >= 1) used[j - 1].block(side);
        dequant(j + 1, (j + 1) & 1);
        made[j + 1].record(side);
      }
      made[j].block(main_stream);
      gemm(j, j & 1);
      used[j].record(main_stream);
    }
  };
  std::vector<double> t[4];
  for (int r = 0; r < rounds + 1; ++r) {
    const std::function<void()> fns[4] = {gemms_only, dequants_only, serial, overlapped};
    for (int k = 0; k < 4; ++k) {
      at::cuda::CUDAEvent start(0), stop(0);
      start.record(main_stream);
      fns[k]();
      stop.record(main_stream);
      stop.synchronize();
      if (r > 0) t[k].push_back(start.elapsed_time(stop));
    }
  }
  for (auto& v : t) std::sort(v.begin(), v.end());
  const double g = t[0][t[0].size() / 2], d = t[1][t[1].size() / 2], s = t[2][t[2].size() / 2],
               o = t[3][t[3].size() / 2];
  std::printf("\n8B forward linears, %d blocks, %lld tokens (ms): GEMMs alone %.2f, dequantizations alone %.2f, in "
              "turn on one stream %.2f, dequantization a linear ahead on a side stream %.2f: %.2f of the %.2f "
              "dequantization hidden (%.0f%%)\n",
              blocks, static_cast<long long>(tokens), g, d, s, o, s - o, d, 100.0 * (s - o) / d);
}
#endif

// `only`: comma-separated substrings of case names; empty: every case.
bool selected(const std::string& name, const std::string& only) {
  if (only.empty()) return true;
  size_t pos = 0;
  while (pos <= only.size()) {
    const size_t end = std::min(only.find(',', pos), only.size());
    if (end > pos && name.find(only.substr(pos, end - pos)) != std::string::npos) return true;
    pos = end + 1;
  }
  return false;
}

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
    int reps = 30;
    bool with_ref = true;
    std::string only;
    int64_t overlap_tokens = 0;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--no-ref") {
        with_ref = false;
      } else if (a.rfind("--overlap=", 0) == 0) {
        overlap_tokens = std::atoll(a.c_str() + 10);
      } else if (a.rfind("--only=", 0) == 0) {
        only = a.substr(7);
      } else {
        reps = std::atoi(a.c_str());
      }
    }
    at::manual_seed(0);
    if (overlap_tokens > 0) {
      overlap_case(overlap_tokens, reps / 3);
      return 0;
    }
    const double copy_gbps = copy_bandwidth_gbps(reps);
    const auto props = at::cuda::getCurrentDeviceProperties();
    std::printf("device: %s, %d SMs, %d MB L2; device-to-device copy of 1 GiB: %.0f GB/s (read + write)\n", props->name,
                props->multiProcessorCount, props->l2CacheSize >> 20, copy_gbps);
    {  // The cost of a kernel that does nothing: a 1-element fill_, back to back.
      at::Tensor one = at::empty({1}, at::TensorOptions().device(at::kCUDA));
      const double s_us = time_us([&](int) { one.fill_(1.0); }, reps, 20);
      const double g_us = time_graph_us([&](int) { one.fill_(1.0); }, reps, 20);
      std::printf("smallest kernel (1-element fill_), back to back: %.2f us per launch (stream), %.2f us (graph)\n",
                  s_us, g_us);
    }

    using Shapes = std::vector<std::pair<int64_t, int64_t>>;
    std::vector<Row> rows;
    auto add = [&](const std::string& name, const Shapes& shapes, at::ScalarType t) {
      if (!selected(name, only)) return;
      rows.push_back(run_case(name, shapes, t, reps, with_ref));
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

    // floor = bytes / 1 GiB copy bandwidth. "% copy" = floor / time. memcpy@size: cudaMemcpyAsync of the same
    // byte count; fill@size: writing the same outputs without reading anything (both graph-timed).
    std::printf("\n%-34s %6s %6s | %6s %6s %6s | %6s %6s | %8s %8s | %7s %7s\n", "case", "MB", "floor", "strm us",
                "%copy", "host", "graph", "%copy", "memcpy@", "fill@", "ATen us", "speedup");
    for (const Row& r : rows) {
      const double floor_us = r.mbytes * 1e6 / (copy_gbps * 1e9) * 1e6;
      std::printf("%-34s %6.1f %6.1f | %7.1f %5.1f%% %6.1f | %6.1f %5.1f%% | %8.1f %8.1f | %7.1f %6.1fx\n",
                  r.name.c_str(), r.mbytes, floor_us, r.us, 100.0 * floor_us / r.us, r.host_us, r.graph_us,
                  100.0 * floor_us / r.graph_us, r.copy_us, r.fill_us, r.ref_us, r.ref_us / r.us);
    }
    std::printf("copy bandwidth (limit): %.0f GB/s. Targets: >= 85%% of copy BW on 8B shapes, >= 5x ATen (stream).\n",
                copy_gbps);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_nf4_dequant: %s\n", e.what());
    return 1;
  }
#endif
}
