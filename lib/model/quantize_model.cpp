#include "lib/model/quantize_model.h"

#include <ATen/ATen.h>

#include <set>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"
#include "lib/quant/nf4.h"

namespace qt {
namespace {

bool is_block_linear_weight(const std::string& name) {
  static const char* kSuffixes[] = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                    "self_attn.o_proj.weight", "mlp.gate_proj.weight",    "mlp.up_proj.weight",
                                    "mlp.down_proj.weight"};
  if (name.rfind("model.layers.", 0) != 0) return false;
  for (const char* s : kSuffixes) {
    std::string suffix(s);
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) return true;
  }
  return false;
}

// transformers' BitsAndBytesConfig.to_dict() for load_in_4bit, nf4, double quantization (v4.4x-5.x spelling).
Json quantization_config(c10::ScalarType compute) {
  return {{"quant_method", "bitsandbytes"},
          {"_load_in_4bit", true},
          {"_load_in_8bit", false},
          {"load_in_4bit", true},
          {"load_in_8bit", false},
          {"bnb_4bit_quant_type", "nf4"},
          {"bnb_4bit_use_double_quant", true},
          {"bnb_4bit_compute_dtype", dtype_hf_name(compute)},
          {"bnb_4bit_quant_storage", "uint8"},
          {"llm_int8_enable_fp32_cpu_offload", false},
          {"llm_int8_has_fp16_weight", false},
          {"llm_int8_skip_modules", nullptr},
          {"llm_int8_threshold", 6.0}};
}

}  // namespace

QuantizeStats quantize_model_dir(const std::string& in_dir, const std::string& out_dir, const at::Device& device,
                                 int64_t max_shard_bytes) {
  ModelFiles files = find_model_files(in_dir);
  Json config = read_json_file(files.config_path, ErrorKind::Model);
  const LlamaConfig parsed = LlamaConfig::from_json(config, files.config_path);  // validates the architecture
  if (is_prequantized_nf4(config, files.config_path))
    fail_at(ErrorKind::Model, files.config_path, "the model is already quantized (quantization_config is present)");
  check_model_headers(files, parsed, /*prequantized=*/false);  // what loading would refuse, before any output
  if (files::exists(out_dir) && !files::list_dir(out_dir).empty())
    fail_at(ErrorKind::Usage, out_dir, "output directory exists and is not empty");
  // A quantization that fails part-way leaves nothing: the directory made here, or what was written into the
  // empty one given.
  files::RemoveUnlessKept cleanup(out_dir, /*contents_only=*/files::exists(out_dir));
  files::make_dirs(out_dir);

  QuantizeStats stats;
  std::vector<std::pair<std::string, at::Tensor>> pending;
  int64_t pending_bytes = 0;
  std::vector<std::pair<std::string, std::vector<std::string>>> shards;  // temp file name -> tensor names
  auto flush = [&] {
    if (pending.empty()) return;
    const std::string name = "shard-" + std::to_string(shards.size()) + ".tmp.safetensors";
    save_safetensors(files::join(out_dir, name), pending, {{"format", "pt"}});
    std::vector<std::string> names;
    for (const auto& [n, t] : pending) names.push_back(n);
    shards.emplace_back(name, std::move(names));
    stats.output_bytes += pending_bytes;
    pending.clear();
    pending_bytes = 0;
  };
  for (const auto& shard : files.shards) {
    SafetensorsFile file(shard);
    for (const auto& info : file.tensors()) {
      stats.input_bytes += static_cast<int64_t>(info.end - info.begin);
      std::vector<std::pair<std::string, at::Tensor>> out;
      if (is_block_linear_weight(info.name)) {
        const auto want = expected_shape(parsed, info.name);
        if (info.shape != want) fail_key(ErrorKind::Model, shard, info.name, "shape does not match config.json");
        Nf4Weight w = quantize_nf4(file.view(info.name).to(device));
        check_finite(w, shard, info.name);
        out = w.to_bnb_tensors(info.name.substr(0, info.name.size() - std::string(".weight").size()));
        ++stats.linears;
      } else {
        out.emplace_back(info.name, file.view(info.name).clone());
        check_finite(out.back().second, shard, info.name);
      }
      for (auto& [n, t] : out) {
        pending_bytes += t.numel() * t.element_size();
        pending.emplace_back(n, std::move(t));
      }
      if (pending_bytes >= max_shard_bytes) flush();
    }
  }
  flush();
  stats.shards = static_cast<int64_t>(shards.size());
  // Final names as transformers writes them; the index only when there are several shards.
  if (shards.size() == 1) {
    files::rename_path(files::join(out_dir, shards[0].first), files::join(out_dir, "model.safetensors"));
  } else {
    Json weight_map = Json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
      files::rename_path(files::join(out_dir, shards[i].first), files::join(out_dir, name));
      for (const auto& t : shards[i].second) weight_map[t] = name;
    }
    write_json_file(files::join(out_dir, "model.safetensors.index.json"),
                    {{"metadata", {{"total_size", stats.output_bytes}}}, {"weight_map", weight_map}});
  }
  config["quantization_config"] = quantization_config(parsed.dtype);
  write_json_file(files::join(out_dir, "config.json"), config);
  for (const auto& name : files::list_dir(in_dir)) {
    const bool weights = name.find(".safetensors") != std::string::npos || name == "config.json";
    if (weights) continue;
    if (files::is_file(files::join(in_dir, name)))
      files::copy_file(files::join(in_dir, name), files::join(out_dir, name));
    else  // (Meta's original/ beside the HF files; a tokenizer.model that is a directory: the copy would lack it)
      log::warn("quantize: " + files::join(in_dir, name) + " is not a file: not copied to " + out_dir);
  }
  cleanup.keep();
  return stats;
}

}  // namespace qt
