#pragma once
// Linears that read one input (q, k, v of a block; gate, up) as one projection: their outputs side by side,
// [.., sum of out_features], equal to each member's forward() (the same rounding as the LoRA node, one launch
// dequantizes every base, one GEMM each for the bases, the LoRA As and the LoRA Bs, one GEMM for the input
// gradient).
#include <ATen/core/Tensor.h>

#include <vector>

#include "lib/model/pass.h"
#include "lib/model/qlora_linear.h"

namespace qt {

// Undefined when a member is not an NF4 base with a plain LoRA adapter (lora_node_applies), some members have a
// bias and others not (or a trained one), the inputs differ in width, or there are more than 4: then call each
// forward(). Frozen biases (Qwen2's q / k / v) are added by the base GEMM.
// concat_b: the LoRA B terms inside the base GEMM, [x | x A^T] [W | s B]^T, instead of an addmm over the output
// (on CUDA where the input width is a multiple of 1024; the same values, one rounding fewer).
// output_unused: only what the backward saves is computed; the output is left unwritten (a recomputation that
// takes the values from elsewhere).
// x_widened: x is the first columns of a buffer with concat_input_spare(linears, x) columns more, unused and the
// group's to write (rms_norm_fused's `spare`): with concat_b the concatenated input is built there, x not copied.
at::Tensor project_group(const std::vector<const Linear*>& linears, const at::Tensor& x, const Pass& pass = {},
                         bool concat_b = false, bool output_unused = false, bool x_widened = false);

// The columns a concat_b input has beyond x's (the members' LoRA ranks summed, rounded up to 8), where project_group
// takes these linears and x and concatenates along K; else 0.
int64_t concat_input_spare(const std::vector<const Linear*>& linears, const at::Tensor& x);

}  // namespace qt
