#pragma once
// Random NF4 weights on the GPU for the kernel benchmarks (bench_nf4_dequant, bench_nf4_gemm): every code and every
// nested code appears; blocksize 64, numel a multiple of 64.
#ifdef QT_WITH_CUDA
#include <ATen/ATen.h>

#include "lib/kernels/nf4_format.h"
#include "lib/kernels/nf4_ref.h"

namespace qt::bench {

inline qt::kernels::Nf4Data random_nf4(int64_t numel) {
  const auto u8 = at::TensorOptions().dtype(at::kByte).device(at::kCUDA);
  qt::kernels::Nf4Data d;
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

}  // namespace qt::bench
#endif
