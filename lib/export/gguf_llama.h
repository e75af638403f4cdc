#pragma once
// `qlora-train export --gguf f16|bf16|q8_0|q4_k_m|...`: the merged model (base + adapter, the base dequantized
// from NF4 as `export --merge` merges it) as one GGUF file that llama.cpp (and so Ollama) loads, with an Ollama Modelfile
// beside it. The mapping follows llama.cpp's convert_hf_to_gguf.py for HF checkpoints (LlamaModel for LLaMA and
// Mistral as its `llama` architecture; Qwen2Model / Qwen3Model as `qwen2` / `qwen3`): its metadata keys, tensor
// names, the q / k row permutation of `llama` for its rotary layout (Qwen's rotate-half layout is llama.cpp's NEOX
// rope, kept as it is), f32 norms and biases, and the tokenizer as its vocab loader expects it (sentencepiece
// `llama`; byte-level BPE `gpt2` with the pre-tokenizer `llama-bpe` or `qwen2`, by tokenizer.json's regex).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lib/export/gguf_writer.h"
#include "lib/data/data_config.h"
#include "lib/model/hf_loader.h"
#include "lib/model/llama_config.h"

namespace qt {

// The k-quant files (q2_k, q3_k_s / m / l, q4_k_m / s, q5_k_m / s, q6_k) and q4_0, q4_1, q5_0, q5_1 are the files
// llama.cpp's `llama-quantize` makes of the f16 file (no importance matrix), byte for byte: its per-tensor choice of type
// (lib/export/gguf_llama.cpp, QuantizedTypes) and its quantizers (lib/export/ggml_quants.h) on the merged weights
// rounded to f16. q8_0 is convert_hf_to_gguf.py's, from the fp32 weights.
enum class GgufFileType {
  F16, BF16, Q8_0, Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K_M, Q3_K_S, Q3_K_L, Q2_K
};

// Its name on the command line ("f16", "q4_k_m", ...); anything else is qt::Error(Usage) naming the choices.
GgufFileType parse_gguf_file_type(const std::string& name);
const char* gguf_file_type_name(GgufFileType type);
// Every name parse_gguf_file_type takes, f16 first (the command line's choices).
std::vector<std::string> gguf_file_type_names();

// The llama.cpp architecture a model is written as: `llama` for model_type llama and mistral, `qwen2`, `qwen3`.
// Refuses, naming `config_path` and the key, what llama.cpp would not load or this exporter does not map: other
// model types, biases llama.cpp's architecture has no place for (o_proj's or the MLP's on Qwen; `llama` takes any),
// rope types other than default / linear / yarn (and llama3 for `llama`), YaRN settings llama.cpp runs otherwise.
std::string gguf_architecture(const LlamaConfig& config, const std::string& config_path);

// HF rows of q_proj / k_proj (rotate-half layout: the two halves of each head) reordered to llama.cpp's
// interleaved pairs: convert_hf_to_gguf.py's LlamaModel.permute (reshape [heads, 2, head_dim / 2, ...], swap the
// middle two axes). `n_head` is the query heads for q and the key-value heads for k.
at::Tensor permute_for_llama_cpp_rope(const at::Tensor& w, int64_t n_head);

struct GgufExportRequest {
  std::string base_dir;     // the base model directory (config.json, weights, tokenizer)
  std::string adapter_dir;  // the PEFT adapter merged into it
  std::string out_dir;      // created if missing; must not hold the .gguf or Modelfile already
  GgufFileType type = GgufFileType::F16;
  LoadOptions load;  // how the base is loaded for the merge (NF4 as training saw it, fp32)
  // The custom chat format the adapter was trained on (its chat_format.json), the file's chat template and the
  // Modelfile's TEMPLATE instead of the base's.
  std::optional<CustomChatFormat> chat_format;
};

struct GgufExportStats {
  std::string gguf_path;
  std::string modelfile_path;
  int64_t tensors = 0;
  int64_t bytes = 0;        // file size
  int64_t merged = 0;       // linears that had an adapter
  std::string chat_format;  // the Modelfile's TEMPLATE: llama3, llama2, mistral, chatml, or "none"
};

// `export --gguf-lora TYPE`: the adapter alone as a llama.cpp LoRA adapter file (convert_lora_to_gguf.py's form:
// general.type "adapter", adapter.type "lora", adapter.lora.alpha; each adapted weight's A as <name>.lora_a [r, in]
// and B as <name>.lora_b [out, r], `llama`'s q / k rows of B permuted as the base's), which llama.cpp applies to
// the base's GGUF at run time (llama-cli --lora FILE; Ollama's ADAPTER). llama.cpp scales by alpha / r, so alpha is
// written as PEFT's scale x r (rsLoRA included). DoRA and modules_to_save (whole tensors, not a LoRA pair) are
// refused naming adapter_config.json's key. Writes <out_dir>/<adapter name>-lora-<type>.gguf.
struct GgufLoraRequest {
  std::string base_dir;  // its config.json: the architecture and the linears' shapes
  std::string adapter_dir;
  std::string out_dir;
  // F32, F16 or BF16. Not q8_0, which convert_lora_to_gguf.py offers: llama.cpp (llama-cpp-python 0.3.36) ran a
  // q8_0 adapter 0.25 of the largest logit away from the f32 one's result (f16: 6e-3), and an adapter is small.
  GgmlType type = GgmlType::F16;
};

struct GgufLoraStats {
  std::string gguf_path;
  int64_t tensors = 0;
  int64_t bytes = 0;
  int64_t adapters = 0;  // adapted weights (a lora_a / lora_b pair each)
  double alpha = 0;      // adapter.lora.alpha as written
};

// The tensor type of `--gguf-lora NAME` (f32, f16, bf16); anything else is qt::Error(Usage).
GgmlType parse_gguf_lora_type(const std::string& name);
std::vector<std::string> gguf_lora_type_names();  // the names it takes (the command line's choices)

GgufLoraStats export_gguf_lora(const GgufLoraRequest& request);

// Checks the base's config.json and the output paths first (nothing loaded or written on a refusal), then loads,
// merges and writes <out_dir>/<base name>-<type>.gguf and <out_dir>/Modelfile under temporary names renamed at
// the end; a failure removes them (and out_dir when this call created it).
GgufExportStats export_gguf(const GgufExportRequest& request);

}  // namespace qt
