#include "lib/model/lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "lib/core/error.h"

namespace qt {

const std::vector<std::string>& lora_target_names() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

const std::vector<std::string>& modules_to_save_names() {
  static const std::vector<std::string> names = {"lm_head", "embed_tokens"};
  return names;
}

static std::string last_component(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

double LoraConfig::scale() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

bool LoraConfig::targets_module(const std::string& hf_module_name) const {
  return std::find(targets.begin(), targets.end(), last_component(hf_module_name)) != targets.end();
}

LoraConfig LoraConfig::from_json(const Json& section, const std::string& file, const std::string& prefix,
                                 ErrorKind kind) {
  reject_unknown_keys(section, {"r", "alpha", "dropout", "targets", "use_rslora", "use_dora", "init_from",
                                "modules_to_save"}, file, prefix, kind);
  JsonReader j{section, file, kind, prefix};
  LoraConfig c;
  c.r = j.get_int("r", c.r);
  c.alpha = j.get_double("alpha", c.alpha);
  c.dropout = j.get_double("dropout", c.dropout);
  if (j.has("targets")) c.targets = j.get_strings("targets");
  // PEFT's "all-linear": every linear layer of the blocks (not lm_head), for LLaMA the seven projections.
  if (c.targets == std::vector<std::string>{"all-linear"}) c.targets = lora_target_names();
  c.use_rslora = j.get_bool("use_rslora", c.use_rslora);
  c.use_dora = j.get_bool("use_dora", c.use_dora);
  c.init_from = j.get_string("init_from", c.init_from);
  if (j.has("modules_to_save")) c.modules_to_save = j.get_strings("modules_to_save");
  c.validate(file, prefix, kind);
  return c;
}

Json LoraConfig::to_json() const {
  return Json{{"r", r},
              {"alpha", alpha},
              {"dropout", dropout},
              {"targets", targets},
              {"use_rslora", use_rslora},
              {"use_dora", use_dora},
              {"init_from", init_from},
              {"modules_to_save", modules_to_save}};
}

std::vector<std::string> LoraConfig::differences_from(const LoraConfig& adapter) const {
  std::vector<std::string> out;
  auto num = [](double v) {
    std::string s = std::to_string(v);
    s.erase(s.find_last_not_of('0') + 1);
    if (!s.empty() && s.back() == '.') s.pop_back();
    return s;
  };
  auto list = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
    return s + "]";
  };
  if (r != adapter.r) out.push_back("lora.r: config " + std::to_string(r) + ", adapter " + std::to_string(adapter.r));
  if (alpha != adapter.alpha) out.push_back("lora.alpha: config " + num(alpha) + ", adapter " + num(adapter.alpha));
  if (list(targets) != list(adapter.targets))
    out.push_back("lora.targets: config " + list(targets) + ", adapter " + list(adapter.targets));
  if (use_rslora != adapter.use_rslora)
    out.push_back(std::string("lora.use_rslora: config ") + (use_rslora ? "true" : "false") + ", adapter " +
                  (adapter.use_rslora ? "true" : "false"));
  if (use_dora != adapter.use_dora)
    out.push_back(std::string("lora.use_dora: config ") + (use_dora ? "true" : "false") + ", adapter " +
                  (adapter.use_dora ? "true" : "false"));
  if (list(modules_to_save) != list(adapter.modules_to_save))
    out.push_back("lora.modules_to_save: config " + list(modules_to_save) + ", adapter " + list(adapter.modules_to_save));
  return out;
}

void LoraConfig::validate(const std::string& file, const std::string& prefix, ErrorKind kind, bool peft_keys) const {
  const std::string k_alpha = prefix + (peft_keys ? "lora_alpha" : "alpha");
  const std::string k_dropout = prefix + (peft_keys ? "lora_dropout" : "dropout");
  const std::string k_targets = prefix + (peft_keys ? "target_modules" : "targets");
  if (r <= 0) fail_key(kind, file, prefix + "r", "must be a positive integer, got " + std::to_string(r));
  if (!(alpha > 0)) fail_key(kind, file, k_alpha, "must be positive, got " + std::to_string(alpha));
  if (!(dropout >= 0 && dropout < 1))
    fail_key(kind, file, k_dropout, "must be in [0, 1), got " + std::to_string(dropout));
  if (targets.empty()) fail_key(kind, file, k_targets, "must name at least one module");
  std::set<std::string> seen;
  for (const auto& t : targets) {
    const auto& known = lora_target_names();
    if (t == "all-linear")
      fail_key(kind, file, k_targets, "\"all-linear\" (every projection) stands alone: give it alone, or list modules");
    if (std::find(known.begin(), known.end(), t) == known.end()) {
      std::string msg = "unknown module '" + t + "'";
      if (auto near = nearest_key(t, known)) msg += " (did you mean '" + *near + "'?)";
      msg += "; known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj";
      fail_key(kind, file, k_targets, msg);
    }
    if (!seen.insert(t).second) fail_key(kind, file, k_targets, "'" + t + "' is listed twice");
  }
  const std::string k_save = prefix + "modules_to_save";
  seen.clear();
  for (const auto& m : modules_to_save) {
    const auto& known = modules_to_save_names();
    if (std::find(known.begin(), known.end(), m) == known.end()) {
      std::string msg = "unknown module '" + m + "'";
      if (auto near = nearest_key(m, known)) msg += " (did you mean '" + *near + "'?)";
      fail_key(kind, file, k_save, msg + "; known: lm_head, embed_tokens");
    }
    if (!seen.insert(m).second) fail_key(kind, file, k_save, "'" + m + "' is listed twice");
  }
}

std::string peft_module_key(const std::string& module) {
  if (module == "lm_head") return "base_model.model.lm_head.weight";
  if (module == "embed_tokens") return "base_model.model.model.embed_tokens.weight";
  fail(ErrorKind::Internal, "peft_module_key: not a module to save: " + module);
}

void attach_modules_to_save(LlamaModel& model, const LoraConfig& config, at::Device device) {
  auto listed = [&](const char* m) {
    return std::find(config.modules_to_save.begin(), config.modules_to_save.end(), m) != config.modules_to_save.end();
  };
  auto copy = [&](const at::Tensor& w) {
    return w.detach().to(device, at::kFloat, /*non_blocking=*/false, /*copy=*/true).set_requires_grad(true);
  };
  model.embed_tokens_trainable = at::Tensor();
  model.lm_head_trainable = at::Tensor();
  if (model.config.tie_word_embeddings) {
    if (listed("lm_head") || listed("embed_tokens")) model.embed_tokens_trainable = model.lm_head_trainable = copy(model.embed_tokens);
    return;
  }
  if (listed("embed_tokens")) model.embed_tokens_trainable = copy(model.embed_tokens);
  if (listed("lm_head")) model.lm_head_trainable = copy(model.lm_head);
}

int64_t attach_lora(LlamaModel& model, const LoraConfig& config, uint64_t seed, at::Device device,
                    at::ScalarType dtype) {
  config.validate("attach_lora", "lora.", ErrorKind::Internal);
  // Drawn on the CPU from one generator so that the adapter is the same on every device and every rank.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  int64_t attached = 0;
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!config.targets_module(name)) {
      l.lora.reset();
      return;
    }
    const int64_t in = l.in_features(), out = l.out_features();
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain * sqrt(3 / fan_in)
    // = 1 / sqrt(in) (torch.nn.init; PEFT follows loralib's layers.py, which copies nn.Linear's default init).
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    at::Tensor A = at::empty({config.r, in}, at::kFloat).uniform_(-bound, bound, gen);
    auto lora = std::make_shared<LoraAdapter>();
    lora->A = A.to(device, dtype).set_requires_grad(true);
    lora->B = at::zeros({out, config.r}, at::TensorOptions().dtype(dtype).device(device)).set_requires_grad(true);
    lora->scale = config.scale();
    lora->dropout = config.dropout;
    if (config.use_dora) {
      // PEFT's DoRA init: m = ||W + scale B A||_row with B = 0, from the dequantized base; the forward pass then
      // starts as the base (m / n = 1). One layer's fp32 W exists during this call only.
      at::Tensor W = l.base_weight(at::kFloat);
      lora->magnitude = dora_weight_norm(W, lora->A, lora->B, lora->scale).to(device, dtype).set_requires_grad(true);
    }
    l.lora = std::move(lora);
    ++attached;
  });
  if (attached == 0) fail(ErrorKind::Config, "lora.targets: no linear of the model matched");
  return attached;
}

std::string peft_lora_key(const std::string& hf_module_name, char which) {
  // PeftModel wraps the transformers model as base_model (LoraModel) -> model (LlamaForCausalLM), and
  // get_peft_model_state_dict drops the adapter name ("default") from the saved keys.
  return "base_model.model." + hf_module_name + (which == 'A' ? ".lora_A.weight" : ".lora_B.weight");
}

std::string peft_dora_key(const std::string& hf_module_name) {
  return "base_model.model." + hf_module_name + ".lora_magnitude_vector";
}

std::vector<std::pair<std::string, at::Tensor>> lora_parameters(LlamaModel& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.lora) return;
    out.emplace_back(peft_lora_key(name, 'A'), l.lora->A);
    out.emplace_back(peft_lora_key(name, 'B'), l.lora->B);
    if (l.lora->dora()) out.emplace_back(peft_dora_key(name), l.lora->magnitude);
  });
  if (model.embed_tokens_trainable.defined()) out.emplace_back(peft_module_key("embed_tokens"), model.embed_tokens_trainable);
  if (model.lm_head_trainable.defined() && !model.lm_head_trainable.is_same(model.embed_tokens_trainable))
    out.emplace_back(peft_module_key("lm_head"), model.lm_head_trainable);
  return out;
}

void detach_lora(LlamaModel& model) {
  model.for_each_linear([](const std::string&, Linear& l) { l.lora.reset(); });
  model.embed_tokens_trainable = at::Tensor();
  model.lm_head_trainable = at::Tensor();
}

}  // namespace qt
