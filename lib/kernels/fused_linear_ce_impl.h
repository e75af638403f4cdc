#pragma once
// Internal to lib/kernels: the two implementations behind fused_linear_cross_entropy, without autograd.
// Both compute, chunk by chunk, the per-token loss and the gradients of the SUM of the loss (scale 1).
#include <ATen/ATen.h>

#include "lib/kernels/fused_linear_ce.h"

namespace qt::detail {

struct FusedCeForward {
  at::Tensor loss_rows;  // [T] fp32, 0 for ignored tokens
  at::Tensor dh;         // [T, H] in hidden's dtype, contiguous; undefined unless asked for
  at::Tensor dw;         // [V, H] in weight's dtype; undefined unless asked for
};

// The counted (not ignored) tokens when the labels came from the host and were counted there, so that the
// CUDA path needs no device sync to size its buffers: count < 0 means not known (found on the device).
struct CountedRows {
  int64_t count = -1;
  at::Tensor index;  // [count] int64 positions on the device; undefined when every token counts
};

// Plain ATen, fp32 math whatever the input dtype; runs on any device (the CPU path, and the oracle the CUDA
// kernel is tested against on upcast inputs).
FusedCeForward fused_linear_ce_reference(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                         const FusedLinearCeOptions& options, int64_t chunk, bool want_dh,
                                         bool want_dw);

// True when this build has the CUDA kernel.
bool fused_linear_ce_cuda_available();

// cuBLAS GEMMs for the tiles and one custom kernel per tile for max / sum-exp / loss / gradient.
FusedCeForward fused_linear_ce_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                    const FusedLinearCeOptions& options, int64_t chunk, bool want_dh, bool want_dw,
                                    const CountedRows& counted = {});

}  // namespace qt::detail
