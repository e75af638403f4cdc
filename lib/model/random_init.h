#pragma once
// Models with random weights, built directly on the target device with no model directory: for benchmarks and
// smoke tests (`"model": {"init": "random", "shape": "llama-3.1-8b"}`). A 70B directory would not fit a disk
// that a 70B benchmark otherwise needs; here only NF4 bytes are ever held.
#include <string>
#include <vector>

#include "lib/model/hf_loader.h"
#include "lib/model/llama.h"

namespace qt {

// The published configs of the named shapes (transformers config.json values): llama-3.2-1b, llama-3.2-3b,
// llama-3.1-8b, llama-3.1-70b, llama-2-7b, llama-2-13b, mistral-7b, tinyllama-1.1b. Unknown names are
// qt::Error(Config) naming `file`'s key and the known names.
LlamaConfig shape_config(const std::string& name, const std::string& file, const std::string& key);
std::vector<std::string> shape_names();

// Weights as transformers' _init_weights draws them (normal(0, 0.02) for linears and embeddings, ones for the
// norms, zeros for biases), from `seed`, generated on options.device one tensor at a time; the block linears
// are quantized to NF4 as they are made when options.quantize_nf4, so the 16-bit model never exists.
LlamaModel random_llama(const LlamaConfig& config, const LoadOptions& options, uint64_t seed);

}  // namespace qt
