#pragma once
// Nf4Weight: one frozen base weight in NF4 with double-quantized statistics, byte-compatible with
// bitsandbytes' Params4bit / QuantState (quant_type "nf4", compress_statistics=True). Format and constants:
// lib/kernels/nf4_format.h. Quantization follows bitsandbytes' reference rounding; dequantization is bit-exact
// with bitsandbytes.functional.dequantize_4bit (tests/test_nf4.cpp holds both to bitsandbytes' own output).
//
// Typical use (the model loader, quantize-on-load):
//   qt::Nf4Weight w = qt::quantize_nf4(bf16_weight.to(device));        // CPU or CUDA
//   at::Tensor scratch = at::empty(w.shape, bf16 options on the device);
//   w.dequantize_into(scratch);                                          // CUDA kernel / CPU reference
//   qt::dequantize_group_into({&wq, &wk, &wv}, outs);                    // one launch for q, k, v
//   auto tensors = w.to_bnb_tensors("model.layers.0.self_attn.q_proj"); // what transformers saves
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "lib/kernels/nf4_ref.h"

namespace qt {

class SafetensorsFile;

struct Nf4Weight {
  kernels::Nf4Data data;                 // packed codes and statistics, all on one device (see nf4_ref.h)
  std::vector<int64_t> shape;            // the original weight's shape, e.g. {out_features, in_features}
  at::ScalarType dtype = at::kBFloat16;  // the original weight's dtype (bitsandbytes' quant_state "dtype")

  int64_t numel() const { return data.numel; }
  int64_t blocksize() const { return data.blocksize; }
  at::Device device() const { return data.packed.device(); }

  // Device memory held: packed codes + absmax codes + nested absmax + both maps + the offset.
  int64_t bytes() const;

  // A new tensor of `shape` in `out_dtype` (float32/bfloat16/float16) on the weight's device.
  at::Tensor dequantize(at::ScalarType out_dtype) const;
  at::Tensor dequantize() const { return dequantize(dtype); }
  // Into a caller-provided contiguous buffer with numel() elements, on the weight's device (any shape; the
  // CUDA kernel runs on the current CUDA stream). No allocation.
  void dequantize_into(const at::Tensor& out) const;

  // The same weight on another device (statistics included).
  Nf4Weight to(const at::Device& device) const;

  // bitsandbytes / transformers serialization of a Linear4bit at `prefix` ("model.layers.0.mlp.up_proj"):
  //   <prefix>.weight                                  uint8 [ceil(numel/2), 1]
  //   <prefix>.weight.absmax                           uint8 [ceil(numel/blocksize)]
  //   <prefix>.weight.quant_map                        float32 [16]
  //   <prefix>.weight.nested_absmax                    float32 [ceil(ceil(numel/blocksize)/256)]
  //   <prefix>.weight.nested_quant_map                 float32 [256]
  //   <prefix>.weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape,
  //                                                    nested_blocksize, nested_dtype, nested_offset
  // (QuantState.as_dict(packed=True) in bitsandbytes/functional.py). Tensors are CPU copies.
  std::vector<std::pair<std::string, at::Tensor>> to_bnb_tensors(const std::string& prefix) const;
};

// Quantizes `weight` (float32/bfloat16/float16, CPU or CUDA, any non-empty shape; where numel is not a multiple
// of the blocksize the last block is short, as in bitsandbytes) to NF4 with double quantization. Result on the
// weight's device; CPU and CUDA give identical bytes. Throws qt::Error(Model) for an empty weight or another
// dtype.
// blocksize: 64 (QLoRA) .. 4096, a power of two.
Nf4Weight quantize_nf4(const at::Tensor& weight, int64_t blocksize = 64);

// Reads the tensors of to_bnb_tensors() back (names as above, from a dict of tensors, e.g. a safetensors file
// loaded whole). `source` names the file in errors. Validates: quant_type "nf4" (fp4 and unknown types are
// refused), blocksize, nested_blocksize 256, statistics shapes and dtypes consistent with the JSON shape; any
// violation is a qt::Error(Model) naming the source and the offending key. Tensors are moved to `device`.
Nf4Weight nf4_from_bnb_tensors(const std::map<std::string, at::Tensor>& tensors, const std::string& prefix,
                               const std::string& source, const at::Device& device = at::kCPU);
// The same from a safetensors file (reads only this prefix's tensors).
Nf4Weight nf4_from_safetensors(const SafetensorsFile& file, const std::string& prefix,
                               const at::Device& device = at::kCPU);

// Dequantizes up to 4 weights (e.g. q, k, v or gate, up) in one kernel launch on CUDA; `outs[i]` as for
// dequantize_into, all of one dtype. On CPU, one reference call per weight.
void dequantize_group_into(const std::vector<const Nf4Weight*>& weights, const std::vector<at::Tensor>& outs);

}  // namespace qt
