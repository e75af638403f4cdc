#include "lib/model/hf_loader.h"

#include <ATen/ATen.h>

#include <memory>
#include <set>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/core/safetensors.h"

namespace qt {

ModelFiles find_model_files(const std::string& dir) {
  ModelFiles files;
  files.dir = dir;
  if (!files::is_dir(dir)) fail_at(ErrorKind::Model, dir, "model directory not found");
  files.config_path = files::join(dir, "config.json");
  if (!files::exists(files.config_path)) fail_at(ErrorKind::Model, files.config_path, "file not found (every HF model directory has one)");
  const std::string index = files::join(dir, "model.safetensors.index.json");
  const std::string single = files::join(dir, "model.safetensors");
  if (files::exists(index)) {
    Json j = read_json_file(index, ErrorKind::Model);
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      fail_key(ErrorKind::Model, index, "weight_map", "missing or not an object");
    std::set<std::string> seen;
    for (const auto& item : j["weight_map"].items()) {
      if (!item.value().is_string())
        fail_key(ErrorKind::Model, index, "weight_map." + item.key(), "expected a file name");
      const std::string shard = files::join(dir, item.value().get<std::string>());
      files.weight_map[item.key()] = shard;
      if (seen.insert(shard).second) files.shards.push_back(shard);
    }
    for (const auto& shard : files.shards)
      if (!files::exists(shard))
        fail_at(ErrorKind::Model, shard, "shard named by " + index + " is missing");
  } else if (files::exists(single)) {
    files.shards.push_back(single);
  } else {
    fail_at(ErrorKind::Model, dir, "no model.safetensors or model.safetensors.index.json (only safetensors weights are read)");
  }
  return files;
}

std::vector<int64_t> expected_shape(const LlamaConfig& c, const std::string& name) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return {c.vocab_size, H};
  if (name == "model.norm.weight") return {H};
  auto ends_with = [&](const char* s) {
    std::string suffix(s);
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends_with("layernorm.weight")) return {H};
  if (ends_with("q_proj.weight")) return {c.q_size(), H};
  if (ends_with("k_proj.weight") || ends_with("v_proj.weight")) return {c.kv_size(), H};
  if (ends_with("o_proj.weight")) return {H, c.q_size()};
  if (ends_with("gate_proj.weight") || ends_with("up_proj.weight")) return {I, H};
  if (ends_with("down_proj.weight")) return {H, I};
  fail(ErrorKind::Internal, "no expected shape for " + name);
}

static std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

LlamaModel load_llama(const std::string& dir, const LoadOptions& options) {
  ModelFiles files = find_model_files(dir);
  LlamaModel model(LlamaConfig::from_file(files.config_path));
  std::map<std::string, at::Tensor*> wanted;
  for (auto& [name, ptr] : model.named_tensors()) wanted[name] = ptr;
  std::set<std::string> loaded;
  for (const auto& shard : files.shards) {
    SafetensorsFile file(shard);  // mapped for this shard only
    for (const auto& info : file.tensors()) {
      auto it = wanted.find(info.name);
      if (it == wanted.end()) {
        if (info.name == "lm_head.weight" && model.config.tie_word_embeddings) continue;  // some exports keep both
        if (info.name.find("rotary_emb.inv_freq") != std::string::npos) continue;        // recomputed from config
        fail_key(ErrorKind::Model, shard, info.name,
                 "unexpected tensor (a layer this LLaMA implementation does not have: biases, quantized weights "
                 "without quantization_config, or another architecture?)");
      }
      if (!files.weight_map.empty() && files.weight_map.count(info.name) && files.weight_map[info.name] != shard)
        fail_key(ErrorKind::Model, shard, info.name, "index maps it to " + files.weight_map[info.name]);
      const auto want = expected_shape(model.config, info.name);
      if (info.shape != want)
        fail_key(ErrorKind::Model, shard, info.name,
                 "shape " + shape_str(info.shape) + " does not match config.json, which implies " + shape_str(want));
      if (!at::isFloatingType(info.scalar_type))
        fail_key(ErrorKind::Model, shard, info.name, "dtype " + info.dtype + " is not a floating-point type (BF16, F16, F32)");
      *it->second = file.load(info.name, options.dtype, options.device);
      loaded.insert(info.name);
    }
  }
  for (const auto& [name, ptr] : wanted)
    if (!loaded.count(name))
      fail_at(ErrorKind::Model, dir, "tensor '" + name + "' is missing from the safetensors files");
  if (model.config.tie_word_embeddings) model.lm_head = model.embed_tokens;
  log::debug("loaded " + std::to_string(loaded.size()) + " tensors from " + dir);
  return model;
}

}  // namespace qt
