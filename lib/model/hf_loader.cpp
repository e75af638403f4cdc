#include "lib/model/hf_loader.h"

#include <algorithm>

#include <ATen/ATen.h>

#include <cmath>
#include <memory>
#include <set>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/core/safetensors.h"
#include "lib/model/exec_plan.h"
#include "lib/quant/nf4.h"

namespace qt {

ModelFiles find_model_files(const std::string& dir) {
  ModelFiles files;
  files.dir = dir;
  if (!files::is_dir(dir)) fail_at(ErrorKind::Model, dir, "model directory not found");
  files.config_path = files::join(dir, "config.json");
  if (!files::exists(files.config_path))
    fail_at(ErrorKind::Model, files.config_path,
            files::why_missing(files.config_path) + " (every HF model directory has one)");
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
      const std::string name = item.value().get<std::string>();
      if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
        fail_key(ErrorKind::Model, index, "weight_map." + item.key(),
                 "'" + name + "' is not a file name in the model directory");
      const std::string shard = files::join(dir, item.value().get<std::string>());
      files.weight_map[item.key()] = shard;
      if (seen.insert(shard).second) files.shards.push_back(shard);
    }
    for (const auto& shard : files.shards)
      if (!files::exists(shard))
        fail_at(ErrorKind::Model, shard, "shard named by " + index + " is missing: " + files::why_missing(shard));
  } else if (files::exists(single)) {
    files.shards.push_back(single);
  } else {
    for (const auto& path : {index, single})
      if (const std::string why = files::why_missing(path); why != "file not found")
        fail_at(ErrorKind::Model, path, why);
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
  if (ends_with("self_attn.q_norm.weight") || ends_with("self_attn.k_norm.weight")) return {c.head_dim};
  if (ends_with("q_proj.weight")) return {c.q_size(), H};
  if (ends_with("k_proj.weight") || ends_with("v_proj.weight")) return {c.kv_size(), H};
  if (ends_with("o_proj.weight")) return {H, c.q_size()};
  if (ends_with("gate_proj.weight") || ends_with("up_proj.weight")) return {I, H};
  if (ends_with("down_proj.weight")) return {H, I};
  if (ends_with("q_proj.bias")) return {c.q_size()};
  if (ends_with("k_proj.bias") || ends_with("v_proj.bias")) return {c.kv_size()};
  if (ends_with("o_proj.bias") || ends_with("down_proj.bias")) return {H};
  if (ends_with("gate_proj.bias") || ends_with("up_proj.bias")) return {I};
  fail(ErrorKind::Internal, "no expected shape for " + name);
}

static std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool is_prequantized_nf4(const Json& j, const std::string& file) {
  if (!j.contains("quantization_config") || j["quantization_config"].is_null()) return false;
  JsonReader q{j["quantization_config"], file, ErrorKind::Model, "quantization_config."};
  const std::string method = q.get_string("quant_method", "bitsandbytes");
  if (method != "bitsandbytes")
    fail_key(ErrorKind::Model, file, "quantization_config.quant_method",
             "'" + method + "' is not supported (only bitsandbytes 4-bit NF4 checkpoints load pre-quantized)");
  if (!q.get_bool("load_in_4bit", false))
    fail_key(ErrorKind::Model, file, "quantization_config.load_in_4bit", "only 4-bit bitsandbytes checkpoints are supported");
  const std::string type = q.get_string("bnb_4bit_quant_type", "fp4");
  if (type != "nf4")
    fail_key(ErrorKind::Model, file, "quantization_config.bnb_4bit_quant_type", "'" + type + "' is not supported (expected nf4)");
  if (!q.get_bool("bnb_4bit_use_double_quant", false))
    fail_key(ErrorKind::Model, file, "quantization_config.bnb_4bit_use_double_quant",
             "only double-quantized NF4 (as QLoRA) is supported");
  return true;
}

// A dense tensor must have the shape config.json implies and a floating-point dtype.
static void check_dense(const LlamaConfig& config, const std::string& shard, const TensorInfo& info) {
  const auto want = expected_shape(config, info.name);
  if (info.shape != want)
    fail_key(ErrorKind::Model, shard, info.name,
             "shape " + shape_str(info.shape) + " does not match config.json, which implies " + shape_str(want));
  if (!at::isFloatingType(info.scalar_type))
    fail_key(ErrorKind::Model, shard, info.name, "dtype " + info.dtype + " is not a floating-point type (BF16, F16, F32)");
}

bool LoadOptions::linear_on_host(const std::string& name, int64_t layers) const {
  const std::string prefix = "model.layers.";
  if (streamed_blocks <= 0 || !device.is_cuda() || name.compare(0, prefix.size(), prefix) != 0) return false;
  return streamed_block(std::stoll(name.substr(prefix.size())), streamed_blocks, layers);
}

void check_finite(const at::Tensor& t, const std::string& file, const std::string& name) {
  if (t.numel() > 0 && !at::isfinite(t).all().item<bool>())
    fail_key(ErrorKind::Model, file, name, "holds NaN or infinite values");
}

// Its block scales are the largest magnitude of each block, so a NaN or an infinity anywhere in the weight shows in
// them (and in their double quantization's statistics).
// The code maps too (a pre-quantized file brings its own): a NaN there made every weight of that code NaN.
void check_finite(const Nf4Weight& w, const std::string& file, const std::string& name) {
  check_finite(w.data.nested_absmax, file, name);
  check_finite(w.data.quant_map, file, name + ".quant_map");
  check_finite(w.data.nested_map, file, name + ".nested_quant_map");
  if (!std::isfinite(w.data.offset)) fail_key(ErrorKind::Model, file, name, "holds NaN or infinite values");
}

void check_model_headers(const ModelFiles& files, const LlamaConfig& config, bool prequantized) {
  LlamaModel model(config);  // (its tensors' names; nothing is allocated)
  std::set<std::string> linears, wanted;
  model.for_each_linear([&](const std::string& name, Linear&) { linears.insert(name + ".weight"); });
  for (auto& [name, ptr] : model.named_tensors()) wanted.insert(name);
  std::map<std::string, std::string> where;  // tensor -> the shard holding it
  for (const auto& shard : files.shards) {
    const SafetensorsFile file(shard);
    for (const auto& info : file.tensors()) {
      const auto [it, fresh] = where.emplace(info.name, shard);
      if (!fresh)
        fail_key(ErrorKind::Model, shard, info.name, "is in " + files::base_name(it->second) + " too: a tensor in two shards");
      if (const auto m = files.weight_map.find(info.name); m != files.weight_map.end() && m->second != shard)
        fail_key(ErrorKind::Model, shard, info.name, "index maps it to " + m->second);
      const size_t stat = info.name.find(".weight.");
      if (prequantized && stat != std::string::npos && linears.count(info.name.substr(0, stat + 7))) continue;
      if (linears.count(info.name)) {
        if (!prequantized) check_dense(config, shard, info);
        continue;
      }
      if (wanted.count(info.name) || (info.name == "lm_head.weight" && config.tie_word_embeddings)) {
        check_dense(config, shard, info);
        continue;
      }
      if (info.name.find("rotary_emb.inv_freq") != std::string::npos) continue;  // recomputed from config
      fail_key(ErrorKind::Model, shard, info.name,
               "unexpected tensor (a layer this LLaMA implementation does not have: biases that config.json's "
               "attention_bias / mlp_bias do not announce, quantized weights without quantization_config, or "
               "another architecture?)");
    }
  }
  // The index lists only what its shards hold (a tensor it names that no shard has means a shard of another
  // version of the model, or a cut-short copy).
  for (const auto& [name, shard] : files.weight_map)
    if (!where.count(name))
      fail_key(ErrorKind::Model, files::join(files.dir, "model.safetensors.index.json"), name,
               "listed for " + files::base_name(shard) + ", which does not hold it");
  // Every layer config.json announces (1e6 layers took 4.3 GB of per-layer state before a tensor was missing).
  int64_t layers_held = 0;
  const std::string prefix = "model.layers.";
  for (const auto& [name, shard] : where) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const size_t end = name.find('.', prefix.size());
    const std::string n = name.substr(prefix.size(), end == std::string::npos ? std::string::npos : end - prefix.size());
    if (!n.empty() && n.size() < 10 && std::all_of(n.begin(), n.end(), ::isdigit))
      layers_held = std::max<int64_t>(layers_held, std::stoll(n) + 1);
  }
  if (config.num_hidden_layers > layers_held)
    fail_key(ErrorKind::Model, files.config_path, "num_hidden_layers",
             std::to_string(config.num_hidden_layers) + ", but the safetensors files hold " +
                 (layers_held ? "layers 0 to " + std::to_string(layers_held - 1) : std::string("no layers")) +
                 " (model.layers." + std::to_string(layers_held) + " is missing)");
}

LlamaModel load_llama(const std::string& dir, const LoadOptions& options) {
  ModelFiles files = find_model_files(dir);
  const Json config_json = read_json_file(files.config_path, ErrorKind::Model);
  const LlamaConfig config = LlamaConfig::from_json(config_json, files.config_path);
  const bool prequantized = is_prequantized_nf4(config_json, files.config_path);
  // Every tensor's name, shard, shape and dtype from the headers, before any weight is read.
  check_model_headers(files, config, prequantized);
  LlamaModel model(config);
  std::map<std::string, Linear*> linears;  // "<module>.weight" -> linear
  model.for_each_linear([&](const std::string& name, Linear& l) { linears[name + ".weight"] = &l; });
  std::map<std::string, at::Tensor*> wanted;
  for (auto& [name, ptr] : model.named_tensors()) wanted[name] = ptr;
  std::set<std::string> loaded;
  at::Tensor tied_head;  // lm_head.weight in the files of a tied model
  std::string tied_head_shard;
  for (const auto& shard : files.shards) {
    SafetensorsFile file(shard);  // mapped for this shard only
    for (const auto& info : file.tensors()) {
      auto lin = linears.find(info.name);
      if (lin != linears.end()) {
        Linear& l = *lin->second;
        const std::string prefix = info.name.substr(0, info.name.size() - std::string(".weight").size());
        if (prequantized) {
          auto w = std::make_shared<Nf4Weight>(nf4_from_safetensors(file, prefix, options.device));
          const auto want = expected_shape(model.config, info.name);
          if (w->shape != want)
            fail_key(ErrorKind::Model, shard, info.name,
                     "quantized shape " + shape_str(w->shape) + " does not match config.json, which implies " + shape_str(want));
          check_finite(*w, shard, info.name);
          if (options.quantize_nf4) l.nf4 = std::move(w);
          else l.weight = w->dequantize(options.dtype);
        } else {  // (shape and dtype: check_model_headers)
          if (options.quantize_nf4) {
            // Quantized from the stored dtype on the target device; only this one tensor is ever in 16-bit.
            l.nf4 = std::make_shared<Nf4Weight>(quantize_nf4(file.view(info.name).to(options.device), options.nf4_blocksize));
            check_finite(*l.nf4, shard, info.name);
          } else {
            l.weight = file.load(info.name, options.dtype, options.device);
            check_finite(l.weight, shard, info.name);
          }
        }
        if (l.nf4 && options.linear_on_host(info.name, model.config.num_hidden_layers))
          l.nf4 = std::make_shared<Nf4Weight>(l.nf4->to(at::kCPU));
        loaded.insert(info.name);
        continue;
      }
      if (prequantized && info.name.find(".weight.") != std::string::npos &&
          linears.count(info.name.substr(0, info.name.find(".weight.") + 7)))
        continue;  // statistics of a quantized linear, read with its ".weight"
      auto it = wanted.find(info.name);
      if (it == wanted.end()) {
        if (info.name == "lm_head.weight" && model.config.tie_word_embeddings) {
          // Some exports keep both, equal. One that differs is not a tied model: transformers then keeps the two
          // apart (a warning), which a run here must not silently undo.
          tied_head = file.load(info.name, options.dtype, at::kCPU);
          tied_head_shard = shard;
          continue;
        }
        continue;  // rotary inv_freq (recomputed from config); anything else check_model_headers refused
      }
      const bool to_host = options.device.is_cuda() &&
                           ((info.name == "model.embed_tokens.weight" && options.embeddings_on_host) ||
                            (info.name == "lm_head.weight" && options.lm_head_on_host));
      *it->second = to_host ? file.load(info.name, options.dtype, at::kCPU).pin_memory()
                            : file.load(info.name, options.dtype, options.device);
      check_finite(*it->second, shard, info.name);
      loaded.insert(info.name);
    }
  }
  for (const auto& [name, ptr] : wanted)
    if (!loaded.count(name))
      fail_at(ErrorKind::Model, dir, "tensor '" + name + "' is missing from the safetensors files");
  for (const auto& [name, l] : linears)
    if (!loaded.count(name))
      fail_at(ErrorKind::Model, dir, "tensor '" + name + "' is missing from the safetensors files");
  if (tied_head.defined() && !at::equal(tied_head, model.embed_tokens.to(at::kCPU)))
    fail_key(ErrorKind::Model, tied_head_shard, "lm_head.weight",
             "differs from model.embed_tokens.weight while " + files.config_path +
                 " says tie_word_embeddings true (transformers then uses lm_head.weight, untied): set "
                 "tie_word_embeddings to false to train this model so, or drop lm_head.weight to tie them");
  if (model.config.tie_word_embeddings) model.lm_head = model.embed_tokens;
  log::debug("loaded " + std::to_string(loaded.size()) + " tensors from " + dir);
  return model;
}

}  // namespace qt
