#pragma once
// LoRA adapters in PEFT's on-disk format, so that `peft.PeftModel.from_pretrained(base, dir)` loads what we
// save and we load what PEFT saves (PeftModel.save_pretrained, peft >= 0.10):
//   adapter_config.json          LoraConfig.to_dict(): peft_type "LORA", r, lora_alpha, lora_dropout,
//                                target_modules, use_rslora, bias "none", task_type "CAUSAL_LM", ...
//   adapter_model.safetensors    "base_model.model.<module>.lora_A.weight" [r, in] and ".lora_B.weight" [out, r]
//                                (get_peft_model_state_dict, adapter name removed), metadata {"format": "pt"};
//                                with use_dora also ".lora_magnitude_vector" [out] (DoRA's magnitude);
//                                with modules_to_save also "base_model.model.lm_head.weight" [V, H] and
//                                "base_model.model.model.embed_tokens.weight" [V, H] (ModulesToSaveWrapper's
//                                copies). A tied model's one tensor is saved under both keys with
//                                "ensure_weight_tying": true, as PEFT 0.21 saves it.
#include <string>
#include <utility>
#include <vector>

#include "lib/model/llama.h"
#include "lib/model/lora.h"

namespace qt {

inline constexpr const char* kAdapterConfigFile = "adapter_config.json";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";

struct PeftAdapterConfig {
  LoraConfig lora;
  std::string base_model_name_or_path;  // empty when the file has null
  // PEFT's ensure_weight_tying: on a tied model, the saved lm_head and embed_tokens are one trained tensor.
  bool ensure_weight_tying = false;
};

// Reads and validates adapter_config.json in `dir`. Only what this trainer computes is accepted: peft_type LORA,
// bias "none", no fan_in_fan_out, no rank/alpha patterns, no layers_to_transform, modules_to_save only
// lm_head / embed_tokens (any module path ending in them, as PEFT matches);
// anything else is qt::Error(Checkpoint) naming the file and the key. target_modules may be a list of module
// names, "all-linear", or a regular expression over full module names (PEFT's matching rules).
PeftAdapterConfig read_peft_adapter_config(const std::string& dir);

// Writes the model's adapters (every Linear with one; they must match `config`'s r and scale) into `dir`
// (created if needed): adapter_model.safetensors first, then adapter_config.json, each through a temporary file
// and a rename. Tensors are saved in fp32. Throws qt::Error(Checkpoint) when the model has no adapter or an
// adapter is empty or inconsistent with `config`, qt::Error(Numeric) when one holds a non-finite value.
// base_model_name_or_path is written as given (the trainer passes its base from the root, so that PEFT's
// AutoPeftModelForCausalLM finds it from any directory).
void save_peft_adapter(LlamaModel& model, const LoraConfig& config, const std::string& dir,
                       const std::string& base_model_name_or_path);

// Reads an adapter saved by save_peft_adapter or by PEFT (tensors in fp32, bf16 or fp16) and attaches it to the
// model's linears as fp32 trainable tensors on the model's device, replacing any adapters (DoRA magnitudes too
// when adapter_config.json has use_dora); modules_to_save become the model's trainable fp32 copies (a tied model
// needs ensure_weight_tying: PEFT without it unties lm_head from the embeddings, which this model does not
// represent). A missing tensor, an unexpected one, or a shape that does not fit the model is
// qt::Error(Checkpoint) naming the file and the key.
PeftAdapterConfig load_peft_adapter(LlamaModel& model, const std::string& dir);

// Whether adapter_config.json's base_model_name_or_path names a local directory other than `model_dir` (both
// resolved: symbolic links, relative paths); false for a hub id or a path that does not exist here. `named` gets
// the name the adapter gives.
bool adapter_names_other_base(const std::string& adapter_dir, const std::string& model_dir, std::string* named = nullptr);

// An adapter's tensors as read and validated for copy_peft_adapter (PEFT's keys, fp32 on the CPU): LoRA A / B, DoRA
// magnitudes, modules_to_save copies.
struct PeftAdapterTensors {
  PeftAdapterConfig config;
  std::vector<std::pair<std::string, at::Tensor>> tensors;
};
PeftAdapterTensors read_peft_adapter_tensors(const std::string& dir, const LlamaConfig* base);

// `qlora-train export` without --merge: reads the adapter in `from` (validated as load_peft_adapter does, against
// `base`'s shapes when given) and writes it to `to` in our PEFT writer's form (fp32 tensors, the config fields
// PEFT writes). base_model_name_or_path is replaced when non-empty. `to` is new or empty; a copy that fails leaves it
// so. Returns the adapter's config.
PeftAdapterConfig copy_peft_adapter(const std::string& from, const std::string& to,
                                    const std::string& base_model_name_or_path, const LlamaConfig* base = nullptr);

}  // namespace qt
