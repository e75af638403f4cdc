#pragma once
// Plain-ATen references for NF4 (format: nf4_format.h). They run on any device, op for op what bitsandbytes'
// reference backend does (bitsandbytes/backends/default/ops.py, 0.50), so their bytes agree with bitsandbytes
// and, on a GPU, with the CUDA kernel in nf4_dequant.cu. The CPU path of the trainer runs these.
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qt::kernels {

// The tensors of one NF4 weight (see nf4_format.h), all on one device, contiguous.
struct Nf4Data {
  at::Tensor packed;         // uint8 [ceil(numel/2)]
  at::Tensor absmax_q;       // uint8 [ceil(numel/blocksize)]
  at::Tensor nested_absmax;  // float32 [ceil(ceil(numel/blocksize)/256)]
  at::Tensor nested_map;     // float32 [256]
  at::Tensor quant_map;      // float32 [16]
  float offset = 0.0f;
  int64_t blocksize = 64;
  int64_t numel = 0;
};

// Throws qt::Error(Internal) when the tensors disagree with numel/blocksize (a bug of ours: files are
// validated on load in lib/quant).
void check_nf4_data(const Nf4Data& d);

// Quantizes a floating tensor (fp32/bf16/fp16, any shape, a short last block where numel is not a multiple of
// blocksize, on CPU or CUDA) like bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
// compress_statistics=True) with bitsandbytes' reference rounding (nearest code; a value exactly on a midpoint takes
// the lower code), and the nested 8-bit pass of quantize_blockwise(absmax - offset, blocksize=256). The offset (a mean,
// whose summation order differs across devices) is always reduced on the CPU, so CPU and CUDA produce identical bytes.
// The result lives on w's device.
Nf4Data nf4_quantize_ref(const at::Tensor& w, int64_t blocksize);

// The per-block scales, float32 [ceil(numel/blocksize)]: nested_map[absmax_q] * nested_absmax[b/256] + offset.
at::Tensor nf4_absmax_ref(const Nf4Data& d);

// Dequantizes into a new flat tensor of `dtype` (float32, bfloat16 or float16) on the data's device.
at::Tensor nf4_dequant_ref(const Nf4Data& d, at::ScalarType dtype);

}  // namespace qt::kernels
