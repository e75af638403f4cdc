#pragma once
// The NF4 GEMM: y = x W^T with W in NF4 (nf4_format.h), dequantized inside the GEMM's main loop instead of in a
// pass of its own that writes a 16-bit copy of W (issue 27, item 2). The kernel (lib/kernels/sm90/) is for
// Hopper (compute capability 9.0, wgmma); nf4_linear_into runs it where it applies and the plain-ATen reference
// (each weight dequantized, then one matmul) elsewhere, so callers need not branch.
#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "lib/kernels/nf4_ref.h"

namespace qt::kernels {

// Why the fused kernel cannot take these operands, or "" where it can: a CUDA build, x bf16 on a device of
// compute capability 9.0, 1..4 weights of blocksize 64 whose K (x's columns less the tail's) is a multiple of 64,
// each weight's rows a multiple of 128, x's rows 16-byte aligned, out bf16 with stride(1) == 1 and an even row
// stride (an undefined out: not checked, for a caller that makes a fresh contiguous one); a tail bf16
// [sum rows, k_tail], k_tail a multiple of 8, rows 16-byte aligned. Weight j has numel / K rows.
std::string nf4_gemm_unfit(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                           const at::Tensor& tail = {});

// out[:, c_j : c_j + rows_j] = x[:, :K] W_j^T (accumulate: +=) for each weight in order, c_0 = 0, plus
// x[:, K:] tail^T over those columns where a tail is given (K = x's columns less the tail's: LoRA's B terms, x A^T
// in x's last columns, in the same sum); out's other columns are left alone. x [m, K + k_tail] and out
// [m, >= sum rows] 2-D with stride(1) == 1. The fused kernel on the current CUDA stream where nf4_gemm_unfit is "",
// else nf4_linear_ref_into. variant: the kernel's (sm90::Nf4GemmArgs::variant; 0 the default; 3 and 6 compute
// wrong values, for bench_nf4_gemm only).
void nf4_linear_into(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                     bool accumulate, const at::Tensor& tail = {}, int variant = 0);

// The variant named by `text` (QT_NF4_GEMM_VARIANT): one of those that compute right values, 0, 1, 5, 7, 8, 9,
// 11, 12, 13, 14 or 15; a Usage error naming the variable and the choices otherwise.
int nf4_gemm_variant(const std::string& text);

// The reference: each weight dequantized to x's dtype (nf4_dequant_into), then at::mm into (or at::addmm onto)
// its columns of out, then the tail's product added (addmm). Any device and dtype nf4_dequant_into takes.
void nf4_linear_ref_into(const at::Tensor& x, const std::vector<const Nf4Data*>& ws, const at::Tensor& out,
                         bool accumulate, const at::Tensor& tail = {});

}  // namespace qt::kernels
