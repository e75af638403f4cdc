#pragma once
// `qlora-train export --merge`: folds the LoRA adapters into their base weights and writes a plain 16-bit Hugging
// Face model directory that transformers loads without PEFT or bitsandbytes.
//   W' = W + scale * B @ A   (PEFT's LoraLayer.get_delta_weight / merge_and_unload, fan_in_fan_out off)
// with W the base as training saw it (NF4 dequantized when the base is quantized), the sum taken in fp32, and
// only the result rounded to the output dtype.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lib/model/llama.h"

namespace qt {

// The merged weight of one linear in fp32 (the base alone when it has no adapter): W + scale B A, and for DoRA
// m / ||W + scale B A||_row * (W + scale B A), as PEFT's merge_and_unload computes it.
at::Tensor merged_weight(const Linear& linear);

// One tensor of the merged model under its Hugging Face name: its shape, and how to make it (fp32, on the CPU),
// one at a time, so that a writer holds a single merged tensor at once.
struct MergedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::function<at::Tensor()> make;
};

// Every tensor of the merged model, in named_tensors() order then the NF4 linears: dense tensors as they are
// (modules_to_save's trained copies in place of embed_tokens / lm_head; lm_head omitted when tied), each linear
// as merged_weight(). The model must outlive the result.
std::vector<MergedTensor> merged_tensors(LlamaModel& model);

struct MergedExportStats {
  int64_t merged = 0;   // linears that had an adapter
  int64_t tensors = 0;  // tensors written
  int64_t bytes = 0;    // tensor bytes written
  int64_t shards = 0;
};

// Writes `out_dir` (must not exist, or be empty): the model's tensors under HF names, block linears merged, in
// `dtype`, as model.safetensors or model-0000N-of-0000M.safetensors shards of at most `max_shard_bytes` with
// model.safetensors.index.json; config.json from `base_dir`'s with quantization_config removed and the dtype set;
// the other non-weight files of `base_dir` (tokenizer, generation config) copied. One shard's tensors exist in
// `dtype` at a time. Everything is written under a temporary sibling directory renamed into place at the end.
MergedExportStats save_merged_model(LlamaModel& model, const std::string& base_dir, const std::string& out_dir,
                                    at::ScalarType dtype, int64_t max_shard_bytes = int64_t{4} << 30);

}  // namespace qt
