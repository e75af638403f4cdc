#pragma once
// Loads a Hugging Face model directory: config.json plus `model.safetensors`, or shards
// `model-0000N-of-0000M.safetensors` listed by `model.safetensors.index.json` ("weight_map": name -> file).
// Tensors stream one at a time from the mmapped files to their destination (converted to the compute dtype on
// the target device): the bf16 model never exists twice in memory.
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/model/llama.h"

namespace qt {

struct ModelFiles {
  std::string dir;
  std::string config_path;
  std::vector<std::string> shards;                  // absolute paths, in index order
  std::map<std::string, std::string> weight_map;    // tensor name -> shard path (empty for a single file)
};

// Finds and checks the files of a model directory; throws qt::Error(Model) naming what is missing.
ModelFiles find_model_files(const std::string& dir);

struct LoadOptions {
  at::Device device = at::kCPU;
  c10::ScalarType dtype = c10::ScalarType::Float;  // compute dtype of the dense tensors
  // Quantize the block linears (q, k, v, o, gate, up, down) to NF4 as they arrive, on `device`, one tensor at
  // a time; embeddings, norms and lm_head stay dense. A directory saved pre-quantized by transformers +
  // bitsandbytes loads its NF4 bytes as they are (with quantize_nf4 off they are dequantized to `dtype`).
  bool quantize_nf4 = false;
  int64_t nf4_blocksize = 64;
  // Frozen embeddings / lm_head that the execution plan keeps in pinned host memory go there straight from the file
  // (on a CUDA device: never whole on the GPU, where a budget sized for training could not hold them at load).
  bool embeddings_on_host = false;
  bool lm_head_on_host = false;
  // The plan's blocks whose weights stream from the host (exec_plan.h's streamed_block() picks which): their
  // linears' NF4 weights (quantized on `device` one at a time) go to host memory as they are made, so the GPU never
  // holds them all (StreamedWeights then moves each block's into one pinned arena).
  int64_t streamed_blocks = 0;
  // Whether the linear `name` ("model.layers.N. ...") of a model of `layers` blocks is one of those (CUDA only).
  bool linear_on_host(const std::string& name, int64_t layers) const;
};

// transformers' `quantization_config` for bitsandbytes 4-bit: present means the block linears are stored as
// NF4 bytes plus statistics. Only nf4 with double quantization is accepted (others: a clear error).
bool is_prequantized_nf4(const Json& config_json, const std::string& file);

LlamaModel load_llama(const std::string& dir, const LoadOptions& options);

// Shape each HF tensor name must have under `config`; throws for a name the model does not have.
std::vector<int64_t> expected_shape(const LlamaConfig& config, const std::string& name);

// From the safetensors headers alone: every tensor is one the model takes (or a pre-quantized linear's statistics,
// a tied model's lm_head, rotary inv_freq), with the shape and dtype config.json implies, in one shard only and the
// shard the index names. Throws qt::Error(Model) naming the shard and tensor. (Loading and quantize both check it.)
void check_model_headers(const ModelFiles& files, const LlamaConfig& config, bool prequantized);

// Throws qt::Error(Model) naming `file` and the tensor `name` where the weight holds a NaN or an infinity (a model
// that would train to a non-finite loss at its first step).
void check_finite(const at::Tensor& t, const std::string& file, const std::string& name);
void check_finite(const Nf4Weight& w, const std::string& file, const std::string& name);

}  // namespace qt
