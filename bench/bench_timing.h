#pragma once
// Timing shared by the kernel benchmarks (bench_lora_gemm, bench_elementwise): CUDA-event medians over batches of
// calls on rotating buffer sets, and the device's copy bandwidth.
#ifdef QT_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAEvent.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace qt::bench {

// Median over 7 batches of 20 calls of the time a call takes (us); call(i) runs on buffer set i.
inline double time_us(int sets, const std::function<void(int)>& call) {
  for (int i = 0; i < sets; ++i) call(i);  // warm up (and any one-time setup)
  std::vector<double> per;
  for (int b = 0; b < 7; ++b) {
    at::cuda::CUDAEvent start(cudaEventDefault), stop(cudaEventDefault);
    start.record();
    for (int i = 0; i < 20; ++i) call(i % sets);
    stop.record();
    stop.synchronize();
    per.push_back(start.elapsed_time(stop) * 1000.0 / 20);
  }
  std::sort(per.begin(), per.end());
  return per[per.size() / 2];
}

// Buffer sets enough to exceed 400 MB together (several times the L2 cache: DRAM figures).
inline int sets_for(double bytes) { return std::max(2, static_cast<int>(400e6 / bytes) + 1); }

// The device's copy bandwidth in bytes/s: a 1 GiB device-to-device copy, read and write counted.
inline double copy_bytes_per_s() {
  const auto opt = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  at::Tensor src = at::empty({int64_t{1} << 29}, opt), dst = at::empty_like(src);
  const double us = time_us(1, [&](int) { dst.copy_(src); });
  return 2.0 * static_cast<double>(src.numel()) * 2 / (us * 1e-6);
}

}  // namespace qt::bench
#endif
