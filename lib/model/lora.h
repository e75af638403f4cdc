#pragma once
// LoRA (Hu et al., 2021, arXiv:2106.09685) on the block linears of a LlamaModel: the run config's "lora"
// section, PEFT's initialisation, and the trainable tensors under PEFT's names. Each targeted qt::Linear gets a
// LoraAdapter {A [r, in], B [out, r]} in fp32 (trainable master weights, whatever the compute dtype), so
// that y = base(x) + scale * B(A(dropout(x))) as peft.tuners.lora.layer.Linear computes it. With use_dora, DoRA
// (Liu et al., 2024, arXiv:2402.09353) as PEFT implements it: a trainable magnitude vector [out] too (see
// LoraAdapter).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/json.h"
#include "lib/model/llama.h"

namespace qt {

// The module names LoRA can target: the last component of a block linear's HF name.
const std::vector<std::string>& lora_target_names();

struct LoraConfig {
  int64_t r = 16;
  double alpha = 16;
  double dropout = 0.0;
  std::vector<std::string> targets = lora_target_names();  // all seven block linears (QLoRA paper, section 4)
  bool use_rslora = false;  // rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): scale alpha / sqrt(r)
  bool use_dora = false;    // DoRA: weight-decomposed LoRA, PEFT's use_dora
  // A PEFT adapter directory (ours or PEFT's) to start training from instead of a fresh init; empty: fresh.
  // Its r, lora_alpha, target_modules, use_rslora, use_dora and modules_to_save must equal this section's
  // (differences_from says which not).
  std::string init_from;
  // PEFT's modules_to_save: "lm_head" and / or "embed_tokens", trained in full (fp32 copies, AdamW state fp32)
  // beside the adapters. With tie_word_embeddings either name trains the one shared tensor in both roles (PEFT's
  // ensure_weight_tying).
  std::vector<std::string> modules_to_save;

  // PEFT's LoraLayer.update_layer: scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
  double scale() const;
  bool targets_module(const std::string& hf_module_name) const;  // by its last component

  // The keys of a "lora" section whose values differ from `adapter`'s (an adapter_config.json read by
  // read_peft_adapter_config), as "lora.r: config 16, adapter 8"; targets compare as sets. Empty: compatible.
  std::vector<std::string> differences_from(const LoraConfig& adapter) const;

  // Parses a "lora" section {r, alpha, dropout, targets, use_rslora, use_dora, init_from, modules_to_save};
  // defaults for absent keys. Unknown keys,
  // wrong types and out-of-range values are qt::Error(kind) naming `file` and the key (prefix + key).
  static LoraConfig from_json(const Json& section, const std::string& file, const std::string& prefix = "lora.",
                              ErrorKind kind = ErrorKind::Config);
  // The section with every key (`qlora-train config --print`); from_json reads it back.
  Json to_json() const;
  // Range checks (r > 0, alpha > 0, 0 <= dropout < 1, targets non-empty, known and unique, modules_to_save among
  // lm_head / embed_tokens and unique). Errors name the keys
  // of our run config, or with `peft_keys` those of adapter_config.json (lora_alpha, lora_dropout, target_modules).
  void validate(const std::string& file, const std::string& prefix = "lora.", ErrorKind kind = ErrorKind::Config,
                bool peft_keys = false) const;
};

// Attaches a fresh adapter to every targeted linear (replacing any adapter already there), initialised as
// PEFT's LoraLayer.reset_lora_parameters with init_lora_weights=True: A ~ kaiming_uniform_(a=sqrt(5)), i.e.
// U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so the model starts as the base. The values depend only on `seed` and
// the model's shapes (drawn on the CPU in for_each_linear order), not on `device`. A and B are `dtype`
// (fp32 unless told) on `device` and require grad. With use_dora, each adapter also gets PEFT's DoRA magnitude
// (DoraLinearLayer.update_layer): the row norms of the base weight (dequantized to fp32 when NF4; B A = 0), fp32
// on `device`, trainable. Returns the number of adapters attached (> 0, else throws).
int64_t attach_lora(LlamaModel& model, const LoraConfig& config, uint64_t seed, at::Device device = at::kCPU,
                    at::ScalarType dtype = at::kFloat);

// The names modules_to_save accepts (PEFT matches them against the last component of a module name).
const std::vector<std::string>& modules_to_save_names();

// PEFT's saved key of a module trained in full: "base_model.model.lm_head.weight",
// "base_model.model.model.embed_tokens.weight" (ModulesToSaveWrapper's state dict without
// "modules_to_save.default").
std::string peft_module_key(const std::string& module);

// Gives the model trainable fp32 copies (on `device`, requiring grad) of the modules in config.modules_to_save,
// taken from its current weights; with tie_word_embeddings one copy serves both roles. Removes copies not listed.
void attach_modules_to_save(LlamaModel& model, const LoraConfig& config, at::Device device);

// PEFT's saved key of one LoRA tensor: "base_model.model." + module + ".lora_A.weight" (".lora_B.weight").
std::string peft_lora_key(const std::string& hf_module_name, char which);

// PEFT's saved key of a DoRA magnitude: "base_model.model." + module + ".lora_magnitude_vector" (the parameter
// lora_magnitude_vector.default.weight, saved under this name by get_peft_model_state_dict).
std::string peft_dora_key(const std::string& hf_module_name);

// The trainable tensors of the adapter (the model's own handles, not copies) with PEFT's saved key names: LoRA
// A and B in for_each_linear order, A before B (before the DoRA magnitude, where there is one), then the modules
// trained in full (embed_tokens, lm_head; a tied pair once, under embed_tokens' key, as PEFT's
// ensure_weight_tying names its one parameter).
std::vector<std::pair<std::string, at::Tensor>> lora_parameters(LlamaModel& model);

// Removes every adapter and every trainable module copy.
void detach_lora(LlamaModel& model);


}  // namespace qt
