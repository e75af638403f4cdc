#include "lib/model/merge.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <functional>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"
#include "lib/core/safetensors.h"
#include "lib/model/hf_loader.h"

namespace qt {

at::Tensor merged_weight(const Linear& l) {
  at::NoGradGuard no_grad;
  at::Tensor W = l.base_weight(at::kFloat);
  if (!l.lora) return W;
  const at::Tensor A = l.lora->A.detach().to(W.device(), at::kFloat);
  const at::Tensor B = l.lora->B.detach().to(W.device(), at::kFloat);
  // DoRA (PEFT's DoraLinearVariant.merge_safe): (m / ||W + scale B A||_row) * (W + scale B A), the norm taken
  // from the unmerged weight, as the forward pass does.
  at::Tensor factor;
  if (l.lora->dora())
    factor = (l.lora->magnitude.detach().to(W.device(), at::kFloat) / dora_weight_norm(W, A, B, l.lora->scale)).unsqueeze(1);
  W.addmm_(B, A, /*beta=*/1.0, /*alpha=*/l.lora->scale);
  return factor.defined() ? W.mul_(factor) : W;
}

namespace {

// Files of a model directory that are weights (not copied: the merged tensors replace them).
bool is_weight_file(const std::string& name) {
  for (const char* ext : {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5"})
    if (name.find(ext) != std::string::npos) return true;
  return false;
}

}  // namespace

std::vector<MergedTensor> merged_tensors(LlamaModel& model) {
  std::vector<MergedTensor> plan;
  // Dense linears: named_tensors() holds their base only; their merged weight takes its place.
  std::map<std::string, const Linear*> dense;
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.quantized()) dense[name + ".weight"] = &l;
  });
  for (auto& [name, t] : model.named_tensors()) {
    at::Tensor* src = t;
    // modules_to_save: the trained copy replaces the base tensor (a tied pair is one tensor, written once).
    if (name == "model.embed_tokens.weight" && model.embed_tokens_trainable.defined()) src = &model.embed_tokens_trainable;
    if (name == "lm_head.weight" && model.lm_head_trainable.defined()) src = &model.lm_head_trainable;
    auto it = dense.find(name);
    if (it != dense.end()) {
      const Linear* lp = it->second;
      plan.push_back({name, src->sizes().vec(), [lp] { return merged_weight(*lp).to(at::kCPU).contiguous(); }});
    } else {
      plan.push_back({name, src->sizes().vec(), [src] { return src->detach().to(at::kCPU, at::kFloat).contiguous(); }});
    }
  }
  model.for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.quantized()) return;  // dense ones came with named_tensors()
    const Linear* lp = &l;
    plan.push_back({name + ".weight", {l.out_features(), l.in_features()},
                    [lp] { return merged_weight(*lp).to(at::kCPU).contiguous(); }});
  });
  return plan;
}

MergedExportStats save_merged_model(LlamaModel& model, const std::string& base_dir, const std::string& given_out,
                                    at::ScalarType dtype, int64_t max_shard_bytes) {
  // "out/" (a shell's completion) names the directory "out": its temporary sibling is "out.tmp-export", not
  // "out/.tmp-export", a directory inside the one it is renamed to.
  const std::string out_dir = files::without_trailing_slashes(given_out);
  if (dtype != at::kBFloat16 && dtype != at::kHalf && dtype != at::kFloat)
    fail(ErrorKind::Usage, "export dtype must be bfloat16, float16 or float32");
  if (files::exists(out_dir) && (!files::is_dir(out_dir) || !files::list_dir(out_dir).empty()))
    fail_at(ErrorKind::Usage, out_dir, "output directory exists and is not empty");
  const std::string config_path = files::join(base_dir, "config.json");
  Json config = read_json_file(config_path, ErrorKind::Model);

  const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
  std::vector<MergedTensor> plan = merged_tensors(model);
  MergedExportStats stats;
  model.for_each_linear([&](const std::string&, Linear& l) {
    if (l.lora) ++stats.merged;
  });
  auto bytes_of = [&](const MergedTensor& t) {
    int64_t n = esize;
    for (int64_t d : t.shape) n *= d;
    return n;
  };

  // Shards in plan order, cut before a tensor that would overflow the limit (as transformers' split does).
  std::vector<std::vector<size_t>> shards(1);
  int64_t current = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (current > 0 && current + bytes_of(plan[i]) > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(i);
    current += bytes_of(plan[i]);
  }

  const std::string tmp = out_dir + ".tmp-export";
  files::remove_tree(tmp);
  files::make_dirs(tmp);
  files::RemoveUnlessKept cleanup(tmp);  // a failed export leaves nothing
  Json weight_map = Json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    if (shards.size() == 1) std::snprintf(name, sizeof name, "model.safetensors");
    else std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (size_t i : shards[s]) {
      at::Tensor t = plan[i].make().to(dtype).contiguous();
      if (!t.isfinite().all().item<bool>())
        fail(ErrorKind::Numeric, plan[i].name + ": the merged weight holds a non-finite value; nothing exported");
      stats.bytes += t.numel() * t.element_size();
      tensors.emplace_back(plan[i].name, std::move(t));
      weight_map[plan[i].name] = name;
    }
    save_safetensors(files::join(tmp, name), tensors, {{"format", "pt"}});
    stats.tensors += static_cast<int64_t>(tensors.size());
  }
  stats.shards = static_cast<int64_t>(shards.size());
  if (shards.size() > 1)
    write_json_file(files::join(tmp, "model.safetensors.index.json"),
                    {{"metadata", {{"total_size", stats.bytes}}}, {"weight_map", weight_map}});

  // config.json: a plain dense model now. transformers 5.x reads "dtype", 4.x "torch_dtype": set whichever the
  // base has (5.x's when neither).
  config.erase("quantization_config");
  const bool v4 = config.contains("torch_dtype") && !config.contains("dtype");
  config[v4 ? "torch_dtype" : "dtype"] = dtype_hf_name(dtype);
  write_json_file(files::join(tmp, "config.json"), config);
  for (const auto& name : files::list_dir(base_dir)) {
    const std::string path = files::join(base_dir, name);
    if (name != "config.json" && !is_weight_file(name) && files::is_file(path)) files::copy_file(path, files::join(tmp, name));
  }
  files::sync_path(tmp);
  if (files::exists(out_dir)) files::remove_tree(out_dir);  // empty (checked above)
  files::rename_path(tmp, out_dir);
  cleanup.keep();
  return stats;
}

}  // namespace qt
