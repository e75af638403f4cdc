#pragma once
// AdamW with 8-bit moments (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022; bitsandbytes'
// AdamW8bit, what Hugging Face's `optim="adamw_8bit"` and Unsloth's notebooks train with): each moment stored as one
// byte an element, a code into bitsandbytes' dynamic quantization map (signed for the first moment, unsigned for the
// second), scaled by the largest magnitude of its block of 256 elements (fp32). A step dequantizes a block, updates
// it and the parameter in fp32 as torch.optim.AdamW does (decay first, bias-corrected moments, the parameter moved
// by the unquantized new moments, as bitsandbytes does), and quantizes the new moments again: each to the nearest
// code of the map after division by the block's new absmax (ties to the lower code). 2 bytes and 1/32 of one an
// element instead of 8.
//
// adamw_8bit_step runs one kernel over many tensors on CUDA (fp32, fp16 or bf16 parameters, fp32 state; not yet run
// on a GPU: `[gpu]` test in tests/test_train.cpp) and a loop over the blocks on the CPU; adamw_8bit_step_reference is
// the same update as plain ATen ops (the tests' reference).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace qt {

inline constexpr int64_t kAdam8bitBlock = 256;
// Tensors with fewer elements keep fp32 moments (bitsandbytes' min_8bit_size).
inline constexpr int64_t kAdam8bitMinElements = 4096;

// bitsandbytes' create_dynamic_map(signed) with its defaults (7 exponent bits, 8 bits): 256 sorted fp32 values in
// [-1, 1] (signed) or [0, 1], computed with the same ATen ops, so the same bits. A CPU tensor.
const at::Tensor& dynamic_quant_map(bool is_signed);

// A moment as 8-bit codes: codes (uint8, the moment's shape) and absmax (fp32, one a block of 256 elements of the
// flattened tensor, the last block short).
struct BlockwiseQ8 {
  at::Tensor codes;
  at::Tensor absmax;
};
int64_t q8_blocks(int64_t numel);
// Zero codes and absmax for a tensor of `sizes` (a zero moment) on `options`' device.
BlockwiseQ8 q8_zeros(at::IntArrayRef sizes, const at::TensorOptions& options);
// x (fp32, any device) quantized blockwise, as a step quantizes its moments; and back (fp32, codes' device).
BlockwiseQ8 quantize_blockwise(const at::Tensor& x, bool is_signed);
at::Tensor dequantize_blockwise(const BlockwiseQ8& q, bool is_signed);

// One parameter of a step: p (contiguous) and its gradient (p's dtype, contiguous), the first moment (signed map)
// and the second (unsigned map) as 8-bit codes, on p's device.
struct Adam8bitTensor {
  at::Tensor p, grad;
  BlockwiseQ8 m, v;
};
struct Adam8bitStep {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  int64_t step = 1;  // this update's count (the bias corrections 1 - beta^step)
};
// Updates every tensor in place (parameters, codes, absmax). found_inf (optional scalar on the tensors' device):
// where non-zero, nothing is written. All tensors on one device.
void adamw_8bit_step(const std::vector<Adam8bitTensor>& tensors, const Adam8bitStep& s,
                     const at::Tensor& found_inf = {});
void adamw_8bit_step_reference(const std::vector<Adam8bitTensor>& tensors, const Adam8bitStep& s,
                               const at::Tensor& found_inf = {});

}  // namespace qt
