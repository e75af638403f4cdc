#include "lib/train/run_config.h"

#include <algorithm>
#include <cmath>

#include "lib/data/data_config.h"
#include "lib/model/llama_config.h"
#include "lib/model/lora.h"

namespace qt {
namespace {

const std::vector<std::string> kTopKeys = {"output_dir", "model", "lora", "data", "train", "optim", "checkpoint",
                                           "eval", "dpo", "cpo", "orpo", "kto", "logging"};

void check_positive(int64_t v, const std::string& file, const std::string& key, bool allow_zero = false) {
  if (v < 0 || (!allow_zero && v == 0))
    fail_key(ErrorKind::Config, file, key, "must be " + std::string(allow_zero ? ">= 0" : "> 0") + ", got " + std::to_string(v));
}

// optim.<name>_steps (>= 0) and optim.<name>_ratio (in [0, 1]), at most one of them set.
void read_steps_or_ratio(const JsonReader& r, const std::string& file, const std::string& name, int64_t& steps,
                         double& ratio) {
  const std::string k_steps = "optim." + name + "_steps", k_ratio = "optim." + name + "_ratio";
  steps = r.get_int(name + "_steps", steps);
  check_positive(steps, file, k_steps, true);
  ratio = r.get_double(name + "_ratio", ratio);
  if (!(ratio >= 0 && ratio <= 1)) fail_key(ErrorKind::Config, file, k_ratio, "must be in [0, 1]");
  if (ratio > 0 && steps > 0)
    fail_key(ErrorKind::Config, file, k_ratio, "is set together with " + k_steps + ": give one of them");
}

const Json& section(const Json& j, const std::string& name) {
  static const Json empty = Json::object();
  return j.contains(name) && !j.at(name).is_null() ? j.at(name) : empty;
}

}  // namespace

void apply_override(Json& json, const std::string& assignment) {
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    fail(ErrorKind::Usage, "--set '" + assignment + "': expected section.key=value");
  const std::string path = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  // The config is JSON text, UTF-8 only: a value of other bytes would stop the run when it is printed or saved.
  try {
    (void)Json(assignment).dump();
  } catch (const Json::type_error&) {
    fail(ErrorKind::Usage, "--set '" + path + "=...': not valid UTF-8 text (a JSON config holds UTF-8)");
  }
  Json value;
  try {
    value = Json::parse(text);
  } catch (const Json::parse_error&) {
    value = text;  // a bare word is a string
  } catch (const Json::out_of_range&) {  // a number beyond a double's range (1e400), as in a config file
    fail(ErrorKind::Config, "--set '" + assignment + "': the value is a number out of range (beyond a double)");
  }
  Json* node = &json;
  size_t start = 0;
  while (true) {
    auto dot = path.find('.', start);
    std::string key = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (key.empty()) fail(ErrorKind::Usage, "--set '" + assignment + "': empty key in '" + path + "'");
    if (dot == std::string::npos) {
      (*node)[key] = value;
      return;
    }
    if (!node->contains(key) || !(*node)[key].is_object()) (*node)[key] = Json::object();
    node = &(*node)[key];
    start = dot + 1;
  }
}

RunConfig RunConfig::from_json(const Json& j, const std::string& file, bool complete) {
  RunConfig c;
  c.file = file;
  c.resolved = j;
  reject_unknown_keys(j, kTopKeys, file, "", ErrorKind::Config);
  JsonReader top{j, file, ErrorKind::Config};
  c.output_dir = complete || top.has("output_dir") ? top.get_string("output_dir") : "";

  const Json& m = section(j, "model");
  reject_unknown_keys(m, {"path", "quant", "dtype", "device", "init", "shape"}, file, "model.", ErrorKind::Config);
  JsonReader mr{m, file, ErrorKind::Config, "model."};
  c.model.init = mr.get_string("init", c.model.init);
  if (c.model.init != "pretrained" && c.model.init != "random")
    fail_key(ErrorKind::Config, file, "model.init", "'" + c.model.init + "': expected pretrained or random");
  c.model.shape = mr.get_string("shape", "");
  if (c.model.init == "pretrained") {
    c.model.path = complete || mr.has("path") ? mr.get_string("path") : "";
    if (mr.has("path") && c.model.path.empty())
      fail_key(ErrorKind::Config, file, "model.path", "is empty: name the model directory (config.json, weights, tokenizer)");
    if (!c.model.shape.empty())
      fail_key(ErrorKind::Config, file, "model.shape", "only with model.init \"random\" (a pretrained model's shape is its config.json)");
  } else {
    c.model.path = mr.get_string("path", "");
    if (c.model.path.empty() == c.model.shape.empty())
      fail_key(ErrorKind::Config, file, "model.shape",
               "model.init \"random\" needs exactly one of model.shape (e.g. \"llama-3.1-8b\") and model.path (a directory with config.json)");
  }
  c.model.quant = mr.get_string("quant", c.model.quant);
  if (c.model.quant != "nf4" && c.model.quant != "none")
    fail_key(ErrorKind::Config, file, "model.quant", "'" + c.model.quant + "': expected nf4 or none");
  c.model.dtype = mr.get_string("dtype", c.model.dtype);
  if (c.model.dtype != "auto" && !user_dtype(c.model.dtype))
    fail_key(ErrorKind::Config, file, "model.dtype",
             "'" + c.model.dtype + "': expected auto, " + kUserDtypeNames + " (the names `export --dtype` takes)");
  c.model.device = mr.get_string("device", c.model.device);
  if (c.model.device != "auto" && c.model.device != "cpu" && c.model.device != "cuda")
    fail_key(ErrorKind::Config, file, "model.device", "'" + c.model.device + "': expected auto, cpu or cuda");

  const Json& t = section(j, "train");
  // The speed keys of earlier versions now live in the execution plan's section (lib/model/exec_plan.h).
  static const std::vector<std::pair<std::string, std::string>> moved = {
      {"grad_checkpointing", "train.memory.checkpointing"}, {"offload_activations", "train.memory.offload"},
      {"mlp_chunk_tokens", "train.memory.mlp_chunk_tokens"}, {"attention", "train.memory.attention"},
      {"keep_attention", "train.memory.keep (\"attention\")"}, {"keep_qkv", "train.memory.keep (\"qkv\")"},
      {"keep_residual", "train.memory.keep (\"residual\")"}, {"keep_dequantized", "train.memory.keep_dequantized"},
      {"fuse_projections", "nothing: the projections are always fused where they apply"},
      {"lora_b_in_gemm", "nothing: the LoRA B terms are always inside the base GEMM where that applies"},
      {"fuse_lora_swiglu", "nothing: it was measured slower and removed"}};
  for (const auto& [key, to] : moved)
    if (t.is_object() && t.contains(key))
      fail_key(ErrorKind::Config, file, "train." + key,
               to.rfind("nothing: ", 0) == 0 ? "is no longer a setting (" + to.substr(9) + ")"
                                             : "has moved to " + to + " (README, \"Memory and speed\")");
  reject_unknown_keys(t, {"steps", "epochs", "batch_size", "micro_batch_size", "memory", "neftune_alpha", "seed",
                          "eval_every", "early_stopping_patience", "log_every", "loss", "objective", "full_finetune",
                          "shard", "shard_embeddings", "collective_timeout_s"},
                      file, "train.", ErrorKind::Config);
  JsonReader tr{t, file, ErrorKind::Config, "train."};
  c.train.steps = tr.get_int("steps", c.train.steps);
  check_positive(c.train.steps, file, "train.steps", true);
  c.train.epochs = tr.get_int("epochs", c.train.epochs);
  check_positive(c.train.epochs, file, "train.epochs");
  c.train.batch_size = tr.get_int("batch_size", c.train.batch_size);
  check_positive(c.train.batch_size, file, "train.batch_size");
  if (c.train.batch_size > kMaxBatchRows)
    fail_key(ErrorKind::Config, file, "train.batch_size",
             "is " + std::to_string(c.train.batch_size) + " rows a step: at most " + std::to_string(kMaxBatchRows));
  c.train.micro_batch_size = tr.get_int("micro_batch_size", c.train.micro_batch_size);
  check_positive(c.train.micro_batch_size, file, "train.micro_batch_size", true);
  if (c.train.micro_batch_size > c.train.batch_size)
    fail_key(ErrorKind::Config, file, "train.micro_batch_size",
             std::to_string(c.train.micro_batch_size) + " is more than train.batch_size " +
                 std::to_string(c.train.batch_size) + " (rows a forward pass, of the rows a step)");
  if (c.train.micro_batch_size > 0 && c.train.batch_size % c.train.micro_batch_size != 0)
    fail_key(ErrorKind::Config, file, "train.micro_batch_size",
             std::to_string(c.train.micro_batch_size) + " does not divide train.batch_size " +
                 std::to_string(c.train.batch_size) + " (each step takes whole micro-batches)");
  if (t.contains("memory")) c.train.memory = PlanRequest::from_json(t["memory"], file);
  c.train.neftune_alpha = tr.get_double("neftune_alpha", c.train.neftune_alpha);
  if (!(c.train.neftune_alpha >= 0)) fail_key(ErrorKind::Config, file, "train.neftune_alpha", "must be >= 0 (0: off)");
  c.train.seed = static_cast<uint64_t>(tr.get_int("seed", static_cast<int64_t>(c.train.seed)));
  c.train.eval_every = tr.get_int("eval_every", c.train.eval_every);
  check_positive(c.train.eval_every, file, "train.eval_every", true);
  c.train.early_stopping_patience = tr.get_int("early_stopping_patience", c.train.early_stopping_patience);
  check_positive(c.train.early_stopping_patience, file, "train.early_stopping_patience", true);
  c.train.log_every = tr.get_int("log_every", c.train.log_every);
  check_positive(c.train.log_every, file, "train.log_every");
  c.train.full_finetune = tr.get_bool("full_finetune", c.train.full_finetune);
  if (c.train.full_finetune && c.model.init == "random")
    fail_key(ErrorKind::Config, file, "train.full_finetune", "needs a pretrained model.path, not model.init \"random\"");
  if (c.train.full_finetune && c.model.quant != "none")
    fail_key(ErrorKind::Config, file, "train.full_finetune", "trains 16-bit weights: set model.quant to \"none\"");
  c.train.shard = tr.get_string("shard", c.train.shard);
  if (c.train.shard != "none" && c.train.shard != "blocks")
    fail_key(ErrorKind::Config, file, "train.shard", "'" + c.train.shard + "': expected none or blocks");
  if (c.train.shard == "blocks" && c.train.memory.checkpointing.has_value() && !*c.train.memory.checkpointing)
    fail_key(ErrorKind::Config, file, "train.shard",
             "\"blocks\" gathers each block again in the backward pass by recomputing it: set train.memory.checkpointing "
             "to true or \"auto\" (the default)");
  if (c.train.shard == "blocks" && c.train.full_finetune)
    fail_key(ErrorKind::Config, file, "train.shard", "\"blocks\" shards LoRA training only, not train.full_finetune");
  c.train.shard_embeddings = tr.get_bool("shard_embeddings", c.train.shard_embeddings);
  if (c.train.shard_embeddings && c.train.shard != "blocks")
    fail_key(ErrorKind::Config, file, "train.shard_embeddings", "shards the embeddings along with the blocks: set train.shard to \"blocks\"");
  c.train.collective_timeout_s = tr.get_double("collective_timeout_s", c.train.collective_timeout_s);
  if (!(c.train.collective_timeout_s >= 1 && c.train.collective_timeout_s <= 7 * 24 * 3600.0))
    fail_key(ErrorKind::Config, file, "train.collective_timeout_s",
             "must be seconds from 1 to 604800 (a week): how long a collective waits for the other ranks");
  c.train.loss = tr.get_string("loss", c.train.loss);
  if (c.train.loss != "fused" && c.train.loss != "plain")
    fail_key(ErrorKind::Config, file, "train.loss", "'" + c.train.loss + "': expected fused or plain");
  c.train.objective = tr.get_string("objective", c.train.objective);
  if (c.train.objective != "sft" && c.train.objective != "dpo" && c.train.objective != "cpo" &&
      c.train.objective != "orpo" && c.train.objective != "kto")
    fail_key(ErrorKind::Config, file, "train.objective",
             "'" + c.train.objective + "': expected sft, dpo, cpo, orpo or kto");

  const Json& o = section(j, "optim");
  if (o.is_string())  // HF's TrainingArguments.optim
    fail_key(ErrorKind::Config, file, "optim",
             "is a section (a JSON object) here; the optimizer is its key name: {\"optim\": {\"name\": " + o.dump() +
                 "}} (adamw or adamw_8bit)");
  reject_unknown_keys(o, {"name", "lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "schedule", "warmup_steps",
                          "warmup_ratio", "min_lr_ratio", "decay_steps", "decay_ratio", "decay_type", "embedding_lr",
                          "loraplus_lr_ratio"},
                      file, "optim.", ErrorKind::Config);
  JsonReader orr{o, file, ErrorKind::Config, "optim."};
  c.optim.name = orr.get_string("name", c.optim.name);
  if (c.optim.name != "adamw" && c.optim.name != "adamw_8bit") {
    std::string hint;
    if (c.optim.name == "paged_adamw_8bit" || c.optim.name == "adamw_bnb_8bit")
      hint = " (\"adamw_8bit\" is bitsandbytes' AdamW8bit; where its state lives is train.memory.optimizer's choice)";
    else if (c.optim.name == "adamw_torch" || c.optim.name == "adamw_torch_fused" || c.optim.name == "paged_adamw_32bit")
      hint = " (\"adamw\" is torch's AdamW; where its state lives is train.memory.optimizer's choice)";
    fail_key(ErrorKind::Config, file, "optim.name", "'" + c.optim.name + "': expected adamw or adamw_8bit" + hint);
  }
  c.optim.lr = orr.get_double("lr", c.optim.lr);
  if (!(c.optim.lr > 0 && c.optim.lr < 1)) fail_key(ErrorKind::Config, file, "optim.lr", "must be in (0, 1)");
  c.optim.weight_decay = orr.get_double("weight_decay", c.optim.weight_decay);
  if (c.optim.weight_decay < 0) fail_key(ErrorKind::Config, file, "optim.weight_decay", "must be >= 0");
  c.optim.beta1 = orr.get_double("beta1", c.optim.beta1);
  c.optim.beta2 = orr.get_double("beta2", c.optim.beta2);
  for (auto [k, v] : {std::pair<const char*, double>{"optim.beta1", c.optim.beta1}, {"optim.beta2", c.optim.beta2}})
    if (!(v >= 0 && v < 1)) fail_key(ErrorKind::Config, file, k, "must be in [0, 1)");
  c.optim.eps = orr.get_double("eps", c.optim.eps);
  if (!(c.optim.eps > 0)) fail_key(ErrorKind::Config, file, "optim.eps", "must be > 0");
  c.optim.max_grad_norm = orr.get_double("max_grad_norm", c.optim.max_grad_norm);
  if (c.optim.max_grad_norm < 0) fail_key(ErrorKind::Config, file, "optim.max_grad_norm", "must be >= 0 (0: no clipping)");
  if (orr.has("schedule")) c.optim.schedule = parse_lr_schedule(orr.get_string("schedule"), file, "optim.schedule");
  read_steps_or_ratio(orr, file, "warmup", c.optim.warmup_steps, c.optim.warmup_ratio);
  c.optim.min_lr_ratio = orr.get_double("min_lr_ratio", c.optim.min_lr_ratio);
  if (!(c.optim.min_lr_ratio >= 0 && c.optim.min_lr_ratio <= 1))
    fail_key(ErrorKind::Config, file, "optim.min_lr_ratio", "must be in [0, 1]");
  for (const char* k : {"decay_steps", "decay_ratio", "decay_type"})
    if (orr.has(k) && c.optim.schedule != LrScheduleType::Wsd)
      fail_key(ErrorKind::Config, file, std::string("optim.") + k,
               std::string("is the \"wsd\" schedule's; optim.schedule is \"") + lr_schedule_name(c.optim.schedule) +
                   "\"");
  read_steps_or_ratio(orr, file, "decay", c.optim.decay_steps, c.optim.decay_ratio);
  if (orr.has("decay_type"))
    c.optim.decay_type = parse_wsd_decay(orr.get_string("decay_type"), file, "optim.decay_type");
  if (orr.has("embedding_lr")) {
    c.optim.embedding_lr = orr.get_double("embedding_lr");
    if (!(c.optim.embedding_lr >= 0 && c.optim.embedding_lr < 1))
      fail_key(ErrorKind::Config, file, "optim.embedding_lr", "must be in [0, 1)");
  }
  if (orr.has("loraplus_lr_ratio")) {
    c.optim.loraplus_lr_ratio = orr.get_double("loraplus_lr_ratio");
    if (!(c.optim.loraplus_lr_ratio > 0 && c.optim.loraplus_lr_ratio * c.optim.lr < 1))
      fail_key(ErrorKind::Config, file, "optim.loraplus_lr_ratio",
               "must be > 0, with optim.lr times it under 1 (PEFT's example: 16; null: off)");
    if (c.train.full_finetune)
      fail_key(ErrorKind::Config, file, "optim.loraplus_lr_ratio",
               "scales the LoRA B matrices' learning rate, and train.full_finetune trains no adapter");
  }

  const Json& ck = section(j, "checkpoint");
  reject_unknown_keys(ck, {"every", "keep_last", "save_best"}, file, "checkpoint.", ErrorKind::Config);
  JsonReader cr{ck, file, ErrorKind::Config, "checkpoint."};
  c.checkpoint.every = cr.get_int("every", c.checkpoint.every);
  check_positive(c.checkpoint.every, file, "checkpoint.every", true);
  c.checkpoint.keep_last = cr.get_int("keep_last", c.checkpoint.keep_last);
  check_positive(c.checkpoint.keep_last, file, "checkpoint.keep_last");
  c.checkpoint.save_best = cr.get_bool("save_best", c.checkpoint.save_best);

  const Json& ev = section(j, "eval");
  reject_unknown_keys(ev, {"exact_match_file", "max_examples", "max_new_tokens"}, file, "eval.", ErrorKind::Config);
  JsonReader er{ev, file, ErrorKind::Config, "eval."};
  c.eval.exact_match_file = er.get_string("exact_match_file", "");
  c.eval.max_examples = er.get_int("max_examples", c.eval.max_examples);
  check_positive(c.eval.max_examples, file, "eval.max_examples");
  c.eval.max_new_tokens = er.get_int("max_new_tokens", c.eval.max_new_tokens);
  check_positive(c.eval.max_new_tokens, file, "eval.max_new_tokens");

  const Json& dp = section(j, "dpo");
  if (!dp.is_object()) fail_key(ErrorKind::Config, file, "dpo", "expected an object {beta, label_smoothing}");
  c.dpo = DpoSection::from_json(dp, file);
  const Json& cp = section(j, "cpo");
  if (!cp.is_object()) fail_key(ErrorKind::Config, file, "cpo", "expected an object {loss_type, beta, cpo_alpha, ...}");
  c.cpo = CpoSection::from_json(cp, file);
  const Json& op = section(j, "orpo");
  if (!op.is_object()) fail_key(ErrorKind::Config, file, "orpo", "expected an object {beta}");
  c.orpo = OrpoSection::from_json(op, file);
  const Json& kp = section(j, "kto");
  if (!kp.is_object())
    fail_key(ErrorKind::Config, file, "kto", "expected an object {loss_type, beta, desirable_weight, ...}");
  c.kto = KtoSection::from_json(kp, file);

  const Json& lg = section(j, "logging");
  reject_unknown_keys(lg, {"level", "progress"}, file, "logging.", ErrorKind::Config);
  JsonReader lr{lg, file, ErrorKind::Config, "logging."};
  c.log_level = lr.get_string("level", c.log_level);
  if (c.log_level != "debug" && c.log_level != "info" && c.log_level != "warn" && c.log_level != "error" &&
      c.log_level != "off")
    fail_key(ErrorKind::Config, file, "logging.level", "'" + c.log_level + "': expected debug, info, warn, error or off");
  c.progress = lr.get_string("progress", c.progress);
  if (c.progress != "auto" && c.progress != "bar" && c.progress != "lines")
    fail_key(ErrorKind::Config, file, "logging.progress", "'" + c.progress + "': expected auto, bar or lines");

  c.lora = section(j, "lora");
  c.data = section(j, "data");
  // Their owners parse them again where they are used; parsed here too so that a bad key or value stops the run
  // before the data is tokenized and the model loads.
  c.parsed_lora = LoraConfig::from_json(c.lora, file);
  c.parsed_data = DataConfig::from_json(c.data, file, complete);
  if (const PreferenceObjective pref = c.preference()) {
    // DPO's reference is the model with its adapters off (lib/train/dpo.h): what would also move it is refused.
    // CPO shares the pairs' path (and its limits).
    const std::string objective = "train.objective \"" + c.train.objective + "\"";
    const auto refuse = [&](const std::string& key, const std::string& why) {
      fail_key(ErrorKind::Config, file, key, why + " with " + objective + " (not supported yet)");
    };
    const bool reference = pref.needs_reference();  // DPO, KTO
    if (c.train.full_finetune)
      refuse("train.full_finetune", reference ? "trains every weight, and leaves no reference" : "is not tested");
    if (!c.parsed_lora.modules_to_save.empty())
      refuse("lora.modules_to_save",
             reference ? "a trained lm_head or embed_tokens would move the reference too" : "is not tested");
    if (c.train.shard != "none") refuse("train.shard", "\"" + c.train.shard + "\" is not tested");
    if (c.train.neftune_alpha > 0)
      refuse("train.neftune_alpha", reference ? "noise on the policy's embeddings alone would bias the comparison"
                                              : "is not tested");
    // The per-token log-probabilities come from the fused loss over an lm_head on the device.
    if (c.train.memory.lm_head_on_host.value_or(false))
      refuse("train.memory.lm_head", "\"host\" streams lm_head through a loss that gives no per-token values");
    c.train.memory.lm_head_on_host = false;
    if (c.parsed_data.format != RecordFormat::Auto && c.parsed_data.format != RecordFormat::Preference &&
        !(pref.kto && c.parsed_data.format == RecordFormat::Unpaired))
      fail_key(ErrorKind::Config, file, "data.format",
               std::string("\"") + record_format_name(c.parsed_data.format) + "\": " + objective +
                   (pref.kto ? " trains on unpaired records {prompt, completion, label} (\"unpaired\") or preference "
                               "pairs {prompt, chosen, rejected} (\"preference\"), or \"auto\""
                             : " trains on preference pairs {prompt, chosen, rejected} (\"preference\" or \"auto\")"));
    if (c.parsed_data.train_on_prompt)
      fail_key(ErrorKind::Config, file, "data.train_on_prompt",
               std::string(pref.name()) + " compares the completions' log-probabilities alone: set it to false");
  }
  // Both judge the run by its held-out loss at each evaluation.
  for (const auto& [key, set] : {std::pair<const char*, bool>{"checkpoint.save_best", c.checkpoint.save_best},
                                 {"train.early_stopping_patience", c.train.early_stopping_patience > 0}}) {
    if (!set || !complete) continue;
    if (c.parsed_data.eval_file.empty() && c.parsed_data.eval_fraction == 0)
      fail_key(ErrorKind::Config, file, key,
               "needs held-out data to judge the run by: set data.eval_file or data.eval_fraction");
    if (c.train.eval_every == 0)
      fail_key(ErrorKind::Config, file, key,
               "needs evaluations during the run: set train.eval_every (with 0 the one evaluation is at the end)");
  }
  // A run of fixed steps: the schedule's warmup and decay within them, checked before anything loads.
  if (c.train.steps > 0) (void)lr_schedule_of(c, c.train.steps);
  return c;
}

namespace {

Json resolved_json(const RunConfig& c, const LoraConfig& lora, const DataConfig& data) {
  auto or_null = [](const std::string& s) { return s.empty() ? Json(nullptr) : Json(s); };
  Json j;
  j["output_dir"] = or_null(c.output_dir);
  j["model"] = {{"path", c.model.init == "pretrained" ? or_null(c.model.path) : Json(c.model.path)},
                {"init", c.model.init},
                {"shape", c.model.shape},
                {"quant", c.model.quant},
                {"dtype", c.model.dtype},
                {"device", c.model.device}};
  j["lora"] = lora.to_json();
  j["data"] = data.to_json();
  j["train"] = {{"steps", c.train.steps},
                {"epochs", c.train.epochs},
                {"batch_size", c.train.batch_size},
                {"micro_batch_size", c.train.micro_batch_size},
                {"memory", c.train.memory.to_json()},
                {"neftune_alpha", c.train.neftune_alpha},
                {"seed", c.train.seed},
                {"eval_every", c.train.eval_every},
                {"early_stopping_patience", c.train.early_stopping_patience},
                {"log_every", c.train.log_every},
                {"loss", c.train.loss},
                {"objective", c.train.objective},
                {"full_finetune", c.train.full_finetune},
                {"shard", c.train.shard},
                {"shard_embeddings", c.train.shard_embeddings},
                {"collective_timeout_s", c.train.collective_timeout_s}};
  const bool wsd = c.optim.schedule == LrScheduleType::Wsd;  // (the decay's keys null under other schedules)
  j["optim"] = {{"name", c.optim.name},
                {"lr", c.optim.lr},
                {"weight_decay", c.optim.weight_decay},
                {"beta1", c.optim.beta1},
                {"beta2", c.optim.beta2},
                {"eps", c.optim.eps},
                {"max_grad_norm", c.optim.max_grad_norm},
                {"schedule", lr_schedule_name(c.optim.schedule)},
                {"warmup_steps", c.optim.warmup_steps},
                {"warmup_ratio", c.optim.warmup_ratio},
                {"min_lr_ratio", c.optim.min_lr_ratio},
                {"decay_steps", wsd ? Json(c.optim.decay_steps) : Json(nullptr)},
                {"decay_ratio", wsd ? Json(c.optim.decay_ratio) : Json(nullptr)},
                {"decay_type", wsd ? Json(wsd_decay_name(c.optim.decay_type)) : Json(nullptr)},
                {"embedding_lr", c.optim.embedding_lr < 0 ? Json(nullptr) : Json(c.optim.embedding_lr)},
                {"loraplus_lr_ratio", c.optim.loraplus_lr_ratio > 0 ? Json(c.optim.loraplus_lr_ratio) : Json(nullptr)}};
  j["checkpoint"] = {{"every", c.checkpoint.every}, {"keep_last", c.checkpoint.keep_last},
                     {"save_best", c.checkpoint.save_best}};
  j["eval"] = {{"exact_match_file", c.eval.exact_match_file},
               {"max_examples", c.eval.max_examples},
               {"max_new_tokens", c.eval.max_new_tokens}};
  j["dpo"] = c.dpo.to_json();
  j["cpo"] = c.cpo.to_json();
  j["orpo"] = c.orpo.to_json();
  j["kto"] = c.kto.to_json();
  j["logging"] = {{"level", c.log_level}, {"progress", c.progress}};
  return j;
}

}  // namespace

Json RunConfig::to_json() const { return resolved_json(*this, parsed_lora, parsed_data); }

RunConfig RunConfig::load(const std::string& path, const std::vector<std::string>& overrides, bool complete) {
  Json j = read_json_file(path, ErrorKind::Config);
  if (!j.is_object()) fail_at(ErrorKind::Config, path, "expected a JSON object at the top level");
  for (const auto& o : overrides) apply_override(j, o);
  return from_json(j, path, complete);
}

// The run's learning-rate schedule over total_steps. The "wsd" schedule's decay: optim.decay_steps, else
// ceil(optim.decay_ratio x total steps), else a tenth of them (at least one step); with the warmup, within the run.
LrSchedule lr_schedule_of(const RunConfig& cfg, int64_t total_steps) {
  LrSchedule s{cfg.optim.schedule, cfg.optim.lr,
               warmup_steps_of(cfg.optim.warmup_steps, cfg.optim.warmup_ratio, total_steps), total_steps,
               cfg.optim.min_lr_ratio};
  if (s.type != LrScheduleType::Wsd) return s;
  const double ratio = cfg.optim.decay_ratio > 0 ? cfg.optim.decay_ratio : 0.1;
  s.decay_steps = cfg.optim.decay_steps > 0
                      ? cfg.optim.decay_steps
                      : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(static_cast<double>(total_steps) * ratio)));
  s.decay = cfg.optim.decay_type;
  if (s.warmup_steps + s.decay_steps > total_steps)
    fail_key(ErrorKind::Config, cfg.file, cfg.optim.decay_steps > 0 ? "optim.decay_steps" : "optim.decay_ratio",
             "the \"wsd\" schedule's " + std::to_string(s.warmup_steps) + " warmup and " +
                 std::to_string(s.decay_steps) + " decay steps are more than the run's " + std::to_string(total_steps));
  return s;
}

}  // namespace qt
