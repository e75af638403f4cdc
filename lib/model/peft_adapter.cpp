#include "lib/model/peft_adapter.h"

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "lib/core/error.h"
#include "lib/core/log.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"

namespace qt {

namespace {

std::string last_component(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() > suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The suffix of a DoRA magnitude's saved key (peft_dora_key).
const std::string kMagnitudeSuffix = ".lora_magnitude_vector";

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// A key PEFT writes only when a feature is in use: absent, null, false, or an empty list/object is fine.
void require_unused(const Json& j, const std::string& key, const std::string& file, const std::string& why) {
  if (!j.contains(key)) return;
  const Json& v = j.at(key);
  if (v.is_null() || (v.is_boolean() && !v.get<bool>()) || (v.is_object() && v.empty()) || (v.is_array() && v.empty()))
    return;
  fail_key(ErrorKind::Checkpoint, file, key, v.dump() + " is not supported (" + why + ")");
}

// How adapter_config.json's target_modules selects modules (peft.tuners.tuners_utils.check_target_module_exists):
// a string is a full-match regular expression over module names ("all-linear" is a special value); a list
// matches a module whose name equals an entry or ends with "." + entry.
struct TargetMatcher {
  bool is_regex = false;
  std::regex regex;
  std::vector<std::string> names;  // list entries as written: "q_proj", "self_attn.q_proj", full module names
  bool matches(const std::string& module) const {
    if (is_regex) return std::regex_match(module, regex);
    for (const auto& n : names)
      if (module == n || ends_with(module, "." + n)) return true;
    return false;
  }
};

// adapter_config.json's target_modules as PEFT matches it (cfg: the config read from it).
TargetMatcher target_matcher(const Json& raw, const LoraConfig& cfg) {
  TargetMatcher matcher;
  if (raw["target_modules"].is_string() && raw["target_modules"].get<std::string>() != "all-linear") {
    matcher.is_regex = true;
    matcher.regex = std::regex(raw["target_modules"].get<std::string>());
  } else if (raw["target_modules"].is_array()) {
    matcher.names = raw["target_modules"].get<std::vector<std::string>>();
  } else {
    matcher.names = cfg.targets;  // all-linear
  }
  return matcher;
}

// Adapters on some layers only (a regex or full module names over a subset) are not supported: the model, its
// checkpoints and exports adapt a module kind on every layer (found by fuzzing: an adapter of layer 0 only trained,
// then failed to save; its export named every layer).
void check_targets_every_layer(LlamaModel& model, const TargetMatcher& matcher, const std::string& file_cfg) {
  std::map<std::string, std::vector<std::string>> kinds;  // module kind -> the layers' modules of that kind
  model.for_each_linear(
      [&](const std::string& name, Linear&) { kinds[last_component(name)].push_back(name); });
  for (const auto& [kind, names] : kinds) {
    size_t hit = 0;
    for (const auto& n : names) hit += matcher.matches(n) ? 1 : 0;
    if (hit > 0 && hit < names.size())
      fail_key(ErrorKind::Checkpoint, file_cfg, "target_modules",
               "selects " + kind + " on " + std::to_string(hit) + " of the model's " + std::to_string(names.size()) +
                   " layers: adapters on a subset of layers are not supported (as layers_to_transform)");
  }
}

}  // namespace

PeftAdapterConfig read_peft_adapter_config(const std::string& dir) {
  const std::string file = files::join(dir, kAdapterConfigFile);
  if (!files::is_dir(dir))
    fail_at(ErrorKind::Checkpoint, dir,
            files::exists(dir) ? "is a file: an adapter is a directory (adapter_config.json, adapter_model.safetensors)"
                               : "adapter directory not found");
  const Json j = read_json_file(file, ErrorKind::Checkpoint);
  if (!j.is_object()) fail_at(ErrorKind::Checkpoint, file, "expected a JSON object");
  JsonReader r{j, file, ErrorKind::Checkpoint};
  const std::string type = r.get_string("peft_type");
  if (type != "LORA") fail_key(ErrorKind::Checkpoint, file, "peft_type", "'" + type + "' is not supported (expected LORA)");
  const std::string bias = r.get_string("bias", "none");
  if (bias != "none") fail_key(ErrorKind::Checkpoint, file, "bias", "'" + bias + "' is not supported (expected none)");
  require_unused(j, "fan_in_fan_out", file, "LLaMA linears are not Conv1D");
  require_unused(j, "rank_pattern", file, "one rank for all modules");
  require_unused(j, "alpha_pattern", file, "one alpha for all modules");
  require_unused(j, "trainable_token_indices", file, "not implemented: train whole modules with modules_to_save");
  require_unused(j, "layers_to_transform", file, "adapters on every layer");
  require_unused(j, "lora_bias", file, "LoRA B has no bias here");
  require_unused(j, "layer_replication", file, "not implemented");
  require_unused(j, "use_qalora", file, "not implemented");
  // Found by fuzzing against PEFT 0.21 (each was read as plain LoRA on every token, other logits with exit 0):
  // activated LoRA applies only after its invocation tokens; PiSSA, OLoRA, CorDA and LoftQ initialisations change
  // the base weights, which PEFT's loader does again before it loads A and B.
  require_unused(j, "alora_invocation_tokens", file, "activated LoRA (applied only after its invocation tokens) is not implemented");
  if (j.contains("init_lora_weights") && j.at("init_lora_weights").is_string()) {
    const std::string init = j.at("init_lora_weights").get<std::string>();
    for (const char* base_changing : {"pissa", "olora", "corda", "loftq", "lora_ga"})
      if (init.rfind(base_changing, 0) == 0)
        fail_key(ErrorKind::Checkpoint, file, "init_lora_weights",
                 "'" + init + "' is not supported: that initialisation changes the base weights, which this trainer "
                 "keeps as the model directory has them (convert the adapter to plain LoRA with PEFT's "
                 "path_initial_model_for_weight_conversion when saving it)");
  }
  require_unused(j, "exclude_modules", file, "not implemented: name the modules to adapt in target_modules");
  require_unused(j, "target_parameters", file, "LoRA on parameters rather than modules is not implemented");
  for (const char* variant : {"use_bdlora", "kasa_config", "monteclora_config", "velora_config", "arrow_config"})
    require_unused(j, variant, file, "this LoRA variant is not implemented");
  // Keys PEFT 0.21's LoraConfig does not have (a newer PEFT's feature, which this trainer would not apply): named,
  // as PEFT warns of them.
  {
    static const std::set<std::string> known = {
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
        "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
        "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
        "revision", "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config"};
    std::string unknown;
    for (const auto& item : j.items())
      if (!known.count(item.key())) unknown += (unknown.empty() ? "" : ", ") + item.key();
    if (!unknown.empty())
      log::warn(file + ": keys PEFT 0.21's LoraConfig does not have, ignored: " + unknown +
                " (written by a newer PEFT? a feature they turn on is not applied here)");
  }

  PeftAdapterConfig out;
  out.base_model_name_or_path = r.get_string("base_model_name_or_path", "");
  LoraConfig& c = out.lora;
  c.r = r.get_int("r");
  c.alpha = r.get_double("lora_alpha");
  c.dropout = r.get_double("lora_dropout", 0.0);
  c.use_rslora = r.get_bool("use_rslora", false);
  if (j.contains("use_dora") && !j.at("use_dora").is_null()) c.use_dora = r.get_bool("use_dora");
  out.ensure_weight_tying = r.get_bool("ensure_weight_tying", false);
  if (j.contains("modules_to_save") && !j.at("modules_to_save").is_null()) {
    // PEFT matches each entry against the end of module names; on a tied model it rewrites ["lm_head"] to
    // ["embed_tokens", "model.embed_tokens"]. Only the two [V, H] modules exist to be saved here.
    for (const auto& m : r.get_strings("modules_to_save")) {
      const std::string name = last_component(m);
      const auto& known = modules_to_save_names();
      if (std::find(known.begin(), known.end(), name) == known.end())
        fail_key(ErrorKind::Checkpoint, file, "modules_to_save",
                 "'" + m + "' is not supported (only lm_head and embed_tokens are trained in full)");
      if (std::find(c.modules_to_save.begin(), c.modules_to_save.end(), name) == c.modules_to_save.end())
        c.modules_to_save.push_back(name);
    }
  }
  const Json& t = r.require("target_modules");
  if (t.is_string()) {
    const std::string s = t.get<std::string>();
    if (s == "all-linear") {
      c.targets = lora_target_names();  // PEFT: every nn.Linear but the output layer
    } else {
      // A regular expression: which of the seven names it selects, on any layer (each layer alike is checked
      // against the model at load time).
      try {
        std::regex re(s);
        c.targets.clear();
        const auto selects = [&](const std::string& name) {
          for (const char* parent : {"self_attn", "mlp"})
            for (int layer = 0; layer < 512; ++layer)
              if (std::regex_match("model.layers." + std::to_string(layer) + "." + parent + "." + name, re)) return true;
          return false;
        };
        for (const auto& name : lora_target_names())
          if (selects(name)) c.targets.push_back(name);
      } catch (const std::regex_error&) {
        fail_key(ErrorKind::Checkpoint, file, "target_modules",
                 "'" + s + "' is not a valid regular expression here (the ECMAScript dialect: no look-behind, no "
                 "inline flags such as (?i))");
      }
      if (c.targets.empty())
        fail_key(ErrorKind::Checkpoint, file, "target_modules", "'" + s + "' matches no LLaMA block linear");
    }
  } else {
    // PEFT matches an entry against a module's whole name or the end of it after a dot ("self_attn.q_proj", or the
    // full names PEFT writes for "all-linear" on a small model): the module kinds are their last components, and
    // which layers they select is checked against the model at load time.
    c.targets.clear();
    for (const auto& entry : r.get_strings("target_modules")) {
      const std::string name = last_component(entry);
      if (std::find(c.targets.begin(), c.targets.end(), name) == c.targets.end()) c.targets.push_back(name);
    }
  }
  c.validate(file, "", ErrorKind::Checkpoint, /*peft_keys=*/true);
  return out;
}

namespace {

// Writes the two files of an adapter: the tensors first (read back to check), the config last.
void write_peft_files(const std::string& dir, const LoraConfig& config,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::string& base_model_name_or_path, bool ensure_weight_tying) {
  if (tensors.empty()) fail_at(ErrorKind::Checkpoint, dir, "refusing to write an adapter without tensors");
  files::make_dirs(dir);
  const std::string weights = files::join(dir, kAdapterWeightsFile);
  save_safetensors(weights, tensors, {{"format", "pt"}});
  {  // Read back what landed on disk: an adapter that does not reopen whole is never left looking complete.
    SafetensorsFile check(weights, ErrorKind::Checkpoint);
    if (check.tensors().size() != tensors.size())
      fail_at(ErrorKind::Io, weights, "wrote " + std::to_string(tensors.size()) + " tensors, read back " +
                                          std::to_string(check.tensors().size()));
    for (const auto& [key, t] : tensors)
      if (check.info(key).numel() != t.numel()) fail_key(ErrorKind::Io, weights, key, "size differs after writing");
  }
  // The fields PeftModel.save_pretrained writes for a LoRA adapter (peft 0.17 LoraConfig.to_dict), limited to
  // those older PEFT versions also know, so that from_pretrained accepts it without unknown-key errors.
  Json targets = Json::array();
  for (const auto& t : config.targets) targets.push_back(t);
  Json modules = Json(nullptr);
  if (!config.modules_to_save.empty()) {
    modules = Json::array();
    for (const auto& m : config.modules_to_save) modules.push_back(m);
  }
  Json alpha = (config.alpha == std::floor(config.alpha)) ? Json(static_cast<int64_t>(config.alpha)) : Json(config.alpha);
  Json cfg = {
      {"alpha_pattern", Json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base_model_name_or_path.empty() ? Json(nullptr) : Json(base_model_name_or_path)},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", Json::object()},
      {"lora_alpha", alpha},
      {"lora_dropout", config.dropout},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", modules},
      {"peft_type", "LORA"},
      {"r", config.r},
      {"rank_pattern", Json::object()},
      {"revision", nullptr},
      {"target_modules", targets},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", config.use_dora},
      {"use_rslora", config.use_rslora},
  };
  if (ensure_weight_tying) cfg["ensure_weight_tying"] = true;  // written only when in use (older PEFT lacks it)
  write_json_file(files::join(dir, kAdapterConfigFile), cfg);
}

}  // namespace

void save_peft_adapter(LlamaModel& model, const LoraConfig& config, const std::string& dir,
                       const std::string& base_model_name_or_path) {
  config.validate(dir, "lora.", ErrorKind::Checkpoint);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.lora) {
      if (config.targets_module(name))
        fail_at(ErrorKind::Checkpoint, dir, name + " is a LoRA target but has no adapter attached");
      return;
    }
    if (!config.targets_module(name))
      fail_at(ErrorKind::Checkpoint, dir, name + " has an adapter but is not among the config's targets");
    const at::Tensor& A = l.lora->A;
    const at::Tensor& B = l.lora->B;
    if (!A.defined() || !B.defined() || A.numel() == 0 || B.numel() == 0)
      fail_at(ErrorKind::Checkpoint, dir, name + ": empty LoRA tensor (refusing to write an empty adapter)");
    const std::vector<int64_t> wantA{config.r, l.in_features()}, wantB{l.out_features(), config.r};
    if (A.sizes() != at::IntArrayRef(wantA) || B.sizes() != at::IntArrayRef(wantB))
      fail_at(ErrorKind::Checkpoint, dir, name + ": LoRA shapes " + shape_str(A.sizes()) + ", " + shape_str(B.sizes()) +
                                              " do not match r=" + std::to_string(config.r));
    if (std::abs(l.lora->scale - config.scale()) > 1e-12 * std::abs(config.scale()))
      fail_at(ErrorKind::Checkpoint, dir, name + ": adapter scale " + std::to_string(l.lora->scale) +
                                              " differs from the config's " + std::to_string(config.scale()));
    if (l.lora->dora() != config.use_dora)
      fail_at(ErrorKind::Checkpoint, dir, name + (config.use_dora ? ": the config has use_dora but the adapter has no DoRA magnitude"
                                                                  : ": the adapter has a DoRA magnitude but the config has no use_dora"));
    at::Tensor a = A.detach().to(at::kCPU, at::kFloat).contiguous();
    at::Tensor b = B.detach().to(at::kCPU, at::kFloat).contiguous();
    at::Tensor m;
    if (config.use_dora) {
      m = l.lora->magnitude.detach().to(at::kCPU, at::kFloat).contiguous();
      if (m.sizes() != at::IntArrayRef({l.out_features()}))
        fail_at(ErrorKind::Checkpoint, dir, name + ": DoRA magnitude shape " + shape_str(m.sizes()) + " is not [" +
                                                std::to_string(l.out_features()) + "]");
    }
    if (!a.isfinite().all().item<bool>() || !b.isfinite().all().item<bool>() ||
        (m.defined() && !m.isfinite().all().item<bool>()))
      fail(ErrorKind::Numeric, name + ": the LoRA weights hold a non-finite value; adapter not saved to " + dir);
    tensors.emplace_back(peft_lora_key(name, 'A'), a);
    tensors.emplace_back(peft_lora_key(name, 'B'), b);
    if (m.defined()) tensors.emplace_back(peft_dora_key(name), m);
  });
  if (tensors.empty()) fail_at(ErrorKind::Checkpoint, dir, "the model has no LoRA adapter to save");

  // modules_to_save: the trained copies, under PEFT's keys; a tied pair under both keys (PEFT 0.21 with
  // ensure_weight_tying saves it so).
  const bool tied = model.config.tie_word_embeddings;
  for (const char* m : {"embed_tokens", "lm_head"}) {
    const bool listed = std::find(config.modules_to_save.begin(), config.modules_to_save.end(), m) != config.modules_to_save.end();
    const at::Tensor& w = std::string(m) == "lm_head" ? model.lm_head_trainable : model.embed_tokens_trainable;
    const bool wanted = tied ? !config.modules_to_save.empty() : listed;
    if (wanted != w.defined())
      fail_at(ErrorKind::Checkpoint, dir, std::string(m) + (wanted ? " is in lora.modules_to_save but has no trained copy"
                                                                   : " has a trained copy but is not in lora.modules_to_save"));
    if (!w.defined()) continue;
    at::Tensor t = w.detach().to(at::kCPU, at::kFloat).contiguous();
    if (!t.isfinite().all().item<bool>())
      fail(ErrorKind::Numeric, std::string(m) + ": the trained weights hold a non-finite value; adapter not saved to " + dir);
    tensors.emplace_back(peft_module_key(m), t);
  }
  if (tied && model.embed_tokens_trainable.defined() && !model.embed_tokens_trainable.is_same(model.lm_head_trainable))
    fail_at(ErrorKind::Checkpoint, dir, "tied embeddings with two trained copies (internal inconsistency)");

  write_peft_files(dir, config, tensors, base_model_name_or_path, tied && !config.modules_to_save.empty());
}

PeftAdapterConfig load_peft_adapter(LlamaModel& model, const std::string& dir) {
  PeftAdapterConfig cfg = read_peft_adapter_config(dir);
  const std::string weights = files::join(dir, kAdapterWeightsFile);
  if (!files::exists(weights)) {
    if (files::exists(files::join(dir, "adapter_model.bin")))
      fail_at(ErrorKind::Checkpoint, weights, "not found; only safetensors adapters are read (adapter_model.bin "
                                              "is a pickle: re-save with save_pretrained(safe_serialization=True))");
    fail_at(ErrorKind::Checkpoint, weights, "file not found");
  }
  SafetensorsFile file(weights, ErrorKind::Checkpoint);
  const std::string file_cfg = files::join(dir, kAdapterConfigFile);
  Json raw = read_json_file(file_cfg, ErrorKind::Checkpoint);
  const TargetMatcher matcher = target_matcher(raw, cfg.lora);
  check_targets_every_layer(model, matcher, file_cfg);
  std::set<std::string> expected;
  std::map<std::string, std::shared_ptr<LoraAdapter>> adapters;
  const at::Device device = model.device();
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!matcher.matches(name)) return;
    auto lora = std::make_shared<LoraAdapter>();
    const std::vector<int64_t> wantA{cfg.lora.r, l.in_features()}, wantB{l.out_features(), cfg.lora.r};
    for (char which : {'A', 'B'}) {
      const std::string key = peft_lora_key(name, which);
      expected.insert(key);
      const TensorInfo* info = file.find(key);
      if (!info) fail_key(ErrorKind::Checkpoint, weights, key, "missing (adapter_config.json's target_modules selects " + name + ")");
      const auto& want = which == 'A' ? wantA : wantB;
      if (info->shape != want)
        fail_key(ErrorKind::Checkpoint, weights, key,
                 "shape " + shape_str(info->shape) + " does not fit the model: expected " + shape_str(want) +
                     " (r=" + std::to_string(cfg.lora.r) + " from adapter_config.json; a different base model?)");
      if (!at::isFloatingType(info->scalar_type))
        fail_key(ErrorKind::Checkpoint, weights, key, "dtype " + info->dtype + " is not a floating-point type");
      at::Tensor t = file.load(key, at::kFloat, device).set_requires_grad(true);
      (which == 'A' ? lora->A : lora->B) = t;
    }
    if (cfg.lora.use_dora) {
      const std::string key = peft_dora_key(name);
      expected.insert(key);
      const TensorInfo* info = file.find(key);
      if (!info) fail_key(ErrorKind::Checkpoint, weights, key, "missing (adapter_config.json has use_dora and its target_modules selects " + name + ")");
      const std::vector<int64_t> want{l.out_features()};
      if (info->shape != want)
        fail_key(ErrorKind::Checkpoint, weights, key,
                 "shape " + shape_str(info->shape) + " does not fit the model: expected " + shape_str(want) +
                     " (the DoRA magnitude has one value per output feature; a different base model?)");
      if (!at::isFloatingType(info->scalar_type))
        fail_key(ErrorKind::Checkpoint, weights, key, "dtype " + info->dtype + " is not a floating-point type");
      lora->magnitude = file.load(key, at::kFloat, device).set_requires_grad(true);
    }
    lora->scale = cfg.lora.scale();
    lora->dropout = cfg.lora.dropout;
    adapters[name] = std::move(lora);
  });
  // modules_to_save: fp32 trainable copies on the model's device.
  const std::vector<std::string>& save = cfg.lora.modules_to_save;
  const bool tied = model.config.tie_word_embeddings;
  if (tied && !save.empty() && !cfg.ensure_weight_tying)
    fail_key(ErrorKind::Checkpoint, file_cfg, "modules_to_save",
             "the model ties lm_head to embed_tokens but the adapter was saved without ensure_weight_tying (PEFT then "
             "trains them apart); only one tensor for both roles is supported");
  std::map<std::string, at::Tensor> modules;
  for (const char* m : {"embed_tokens", "lm_head"}) {
    const bool listed = std::find(save.begin(), save.end(), m) != save.end();
    const std::string key = peft_module_key(m);
    const TensorInfo* info = file.find(key);
    if (!(tied ? !save.empty() : listed)) continue;
    expected.insert(key);
    if (!info) {
      if (tied) continue;  // one of the two keys is enough for the one tensor
      fail_key(ErrorKind::Checkpoint, weights, key, "missing (adapter_config.json's modules_to_save lists " + std::string(m) + ")");
    }
    const std::vector<int64_t> want{model.config.vocab_size, model.config.hidden_size};
    if (info->shape != want)
      fail_key(ErrorKind::Checkpoint, weights, key, "shape " + shape_str(info->shape) + " does not fit the model: expected " +
                                                        shape_str(want) + " (vocab_size x hidden_size)");
    if (!at::isFloatingType(info->scalar_type))
      fail_key(ErrorKind::Checkpoint, weights, key, "dtype " + info->dtype + " is not a floating-point type");
    modules[m] = file.load(key, at::kFloat, device).set_requires_grad(true);
  }
  if (tied && !save.empty() && modules.empty())
    fail_key(ErrorKind::Checkpoint, weights, peft_module_key("embed_tokens"), "missing (adapter_config.json lists modules_to_save)");
  for (const auto& info : file.tensors()) {
    if (expected.count(info.name)) continue;
    if (ends_with(info.name, kMagnitudeSuffix) && !cfg.lora.use_dora)
      fail_key(ErrorKind::Checkpoint, weights, info.name,
               "unexpected tensor: a DoRA magnitude, but adapter_config.json's use_dora is not true");
    fail_key(ErrorKind::Checkpoint, weights, info.name,
             "unexpected tensor (not a LoRA A/B" + std::string(cfg.lora.use_dora ? " or DoRA magnitude" : "") +
                 " of a module that adapter_config.json's target_modules selects in this model, nor a "
                 "module its modules_to_save lists)");
  }
  if (adapters.empty()) fail_at(ErrorKind::Checkpoint, weights, "the adapter holds no LoRA tensor for this model");
  model.for_each_linear([&](const std::string& name, Linear& l) {
    auto it = adapters.find(name);
    l.lora = it == adapters.end() ? nullptr : it->second;
  });
  model.embed_tokens_trainable = at::Tensor();
  model.lm_head_trainable = at::Tensor();
  if (tied && !modules.empty()) {
    // PEFT saves the one tensor under both keys; embed_tokens' is the parameter it trains.
    const at::Tensor one = modules.count("embed_tokens") ? modules["embed_tokens"] : modules["lm_head"];
    model.embed_tokens_trainable = model.lm_head_trainable = one;
  } else {
    if (modules.count("embed_tokens")) model.embed_tokens_trainable = modules["embed_tokens"];
    if (modules.count("lm_head")) model.lm_head_trainable = modules["lm_head"];
  }
  return cfg;
}

bool adapter_names_other_base(const std::string& adapter_dir, const std::string& model_dir, std::string* named) {
  const std::string base = read_peft_adapter_config(adapter_dir).base_model_name_or_path;
  if (named) *named = base;
  // A hub id, or a path that no longer resolves from here, cannot be compared with a local directory.
  const std::string a = files::real_path(base), b = files::real_path(model_dir);
  return !a.empty() && !b.empty() && files::is_dir(a) && a != b;
}

PeftAdapterTensors read_peft_adapter_tensors(const std::string& from, const LlamaConfig* base) {
  PeftAdapterConfig cfg = read_peft_adapter_config(from);
  if (base) {  // the layers it adapts, on a skeleton of the base (no weights)
    const std::string file_cfg = files::join(from, kAdapterConfigFile);
    LlamaModel skeleton(*base);
    check_targets_every_layer(skeleton, target_matcher(read_json_file(file_cfg, ErrorKind::Checkpoint), cfg.lora),
                              file_cfg);
  }
  const std::string weights = files::join(from, kAdapterWeightsFile);
  if (!files::exists(weights)) fail_at(ErrorKind::Checkpoint, weights, "file not found");
  SafetensorsFile file(weights, ErrorKind::Checkpoint);
  const std::string prefix = "base_model.model.";
  const int all_parts = cfg.lora.use_dora ? 7 : 3;
  std::map<std::string, int> parts;  // module -> 1 (A) | 2 (B) | 4 (DoRA magnitude)
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& info : file.tensors()) {
    const std::string& key = info.name;
    bool module_copy = false;
    for (const auto& m : cfg.lora.modules_to_save)
      module_copy = module_copy || key == peft_module_key(m) ||
                    (cfg.ensure_weight_tying && (key == peft_module_key("lm_head") || key == peft_module_key("embed_tokens")));
    if (module_copy) {  // modules_to_save: [V, H], copied as they are (in fp32)
      if (info.shape.size() != 2 || (base && info.shape != std::vector<int64_t>{base->vocab_size, base->hidden_size}))
        fail_key(ErrorKind::Checkpoint, weights, key, "shape " + shape_str(info.shape) + " is not the base's [vocab_size, hidden_size]");
      if (!at::isFloatingType(info.scalar_type))
        fail_key(ErrorKind::Checkpoint, weights, key, "dtype " + info.dtype + " is not a floating-point type");
      tensors.emplace_back(key, file.load(key, at::kFloat, at::kCPU));
      continue;
    }
    const bool is_a = ends_with(key, ".lora_A.weight");
    const bool is_b = ends_with(key, ".lora_B.weight");
    const bool is_m = ends_with(key, kMagnitudeSuffix);
    if (is_m && !cfg.lora.use_dora)
      fail_key(ErrorKind::Checkpoint, weights, key, "a DoRA magnitude, but adapter_config.json's use_dora is not true");
    if (key.rfind(prefix, 0) != 0 || !(is_a || is_b || is_m))
      fail_key(ErrorKind::Checkpoint, weights, key,
               "not a LoRA tensor under PEFT's names (base_model.model.<module>.lora_A/B.weight" +
                   std::string(cfg.lora.use_dora ? ", .lora_magnitude_vector)" : ")"));
    const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - (is_m ? kMagnitudeSuffix.size() : 14));
    if (!cfg.lora.targets_module(module))
      fail_key(ErrorKind::Checkpoint, weights, key, "module is not among adapter_config.json's target_modules");
    if (is_m ? info.shape.size() != 1 : (info.shape.size() != 2 || info.shape[is_a ? 0 : 1] != cfg.lora.r))
      fail_key(ErrorKind::Checkpoint, weights, key, "shape " + shape_str(info.shape) +
                                                        (is_m ? " is not a vector (a DoRA magnitude is [out_features])"
                                                              : " does not have rank r=" + std::to_string(cfg.lora.r) +
                                                                    " from adapter_config.json"));
    if (!at::isFloatingType(info.scalar_type))
      fail_key(ErrorKind::Checkpoint, weights, key, "dtype " + info.dtype + " is not a floating-point type");
    if (base) {
      std::vector<int64_t> w;
      try {
        w = expected_shape(*base, module + ".weight");
      } catch (const Error&) {
        fail_key(ErrorKind::Checkpoint, weights, key, "the base model has no such linear");
      }
      const int64_t layer = std::atoll(module.c_str() + std::string("model.layers.").size());
      if (module.rfind("model.layers.", 0) != 0 || layer >= base->num_hidden_layers)
        fail_key(ErrorKind::Checkpoint, weights, key, "the base model has no such layer");
      const std::vector<int64_t> want = is_m   ? std::vector<int64_t>{w[0]}
                                        : is_a ? std::vector<int64_t>{cfg.lora.r, w[1]}
                                               : std::vector<int64_t>{w[0], cfg.lora.r};
      if (info.shape != want)
        fail_key(ErrorKind::Checkpoint, weights, key, "shape " + shape_str(info.shape) + " does not fit the base model: expected " + shape_str(want));
    }
    parts[module] |= is_a ? 1 : is_b ? 2 : 4;
    tensors.emplace_back(key, file.load(key, at::kFloat, at::kCPU));
  }
  for (const auto& [module, p] : parts) {
    if (!(p & 1)) fail_key(ErrorKind::Checkpoint, weights, peft_lora_key(module, 'A'), "missing (the module's other tensors are present)");
    if (!(p & 2)) fail_key(ErrorKind::Checkpoint, weights, peft_lora_key(module, 'B'), "missing (the module's other tensors are present)");
    if (p != all_parts)
      fail_key(ErrorKind::Checkpoint, weights, peft_dora_key(module), "missing (adapter_config.json has use_dora)");
  }
  if (tensors.empty()) fail_at(ErrorKind::Checkpoint, weights, "the adapter holds no tensor");
  return {std::move(cfg), std::move(tensors)};
}

PeftAdapterConfig copy_peft_adapter(const std::string& from, const std::string& to,
                                    const std::string& base_model_name_or_path, const LlamaConfig* base) {
  auto [cfg, tensors] = read_peft_adapter_tensors(from, base);
  if (!base_model_name_or_path.empty()) cfg.base_model_name_or_path = base_model_name_or_path;
  // A local base is named from the root, so that the copy finds it from any directory (AutoPeftModel).
  if (files::is_dir(cfg.base_model_name_or_path))
    cfg.base_model_name_or_path = files::absolute(cfg.base_model_name_or_path);
  // A copy that fails part-way (a full disk) leaves nothing: the directory made here, or what was written into the
  // empty one given (it left adapter_model.safetensors without adapter_config.json, beside a .tmp).
  files::RemoveUnlessKept cleanup(to, /*contents_only=*/files::exists(to));
  write_peft_files(to, cfg.lora, tensors, cfg.base_model_name_or_path, cfg.ensure_weight_tying);
  cleanup.keep();
  return cfg;
}

}  // namespace qt
