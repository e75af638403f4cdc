#pragma once
// Loads a Hugging Face model directory: config.json plus `model.safetensors`, or shards
// `model-0000N-of-0000M.safetensors` listed by `model.safetensors.index.json` ("weight_map": name -> file).
// Tensors stream one at a time from the mmapped files to their destination (converted to the compute dtype on
// the target device): the bf16 model never exists twice in memory.
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

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
  c10::ScalarType dtype = c10::ScalarType::Float;  // compute dtype of the loaded tensors
};

LlamaModel load_llama(const std::string& dir, const LoadOptions& options);

// Shape each HF tensor name must have under `config`; throws for a name the model does not have.
std::vector<int64_t> expected_shape(const LlamaConfig& config, const std::string& name);

}  // namespace qt
