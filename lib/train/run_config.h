#pragma once
// The run config: one JSON file (configs/*.json) describing a fine-tuning run. Each section is parsed and
// validated here or by its owner (lora: lib/model/lora.h; data: lib/data/data_config.h); defaults are written
// once, below; unknown keys are errors naming the key and the nearest known one. The loop never reads raw JSON.
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/data/data_config.h"
#include "lib/model/lora.h"
#include "lib/model/exec_plan.h"
#include "lib/train/dpo.h"
#include "lib/train/lr_schedule.h"

namespace qt {

// train.batch_size's bound: the data is cut into this many rows per step in memory, and the plan weighs its divisors.
constexpr int64_t kMaxBatchRows = int64_t{1} << 24;

struct ModelSection {
  std::string path;             // Hugging Face model directory (with init "random": optional, its config.json)
  std::string init = "pretrained";  // "pretrained" (weights from path) or "random" (no weights read)
  std::string shape;            // init "random": a named shape (lib/model/random_init.h), else path's config.json
  std::string quant = "nf4";    // "nf4" (QLoRA) or "none" (LoRA on a 16-bit base)
  std::string dtype = "auto";   // compute dtype: auto (bf16 on CUDA, fp32 on CPU), or a name user_dtype() reads
  std::string device = "auto";  // auto (CUDA when present), cpu, cuda
};

struct TrainSection {
  int64_t steps = 0;             // optimizer steps; 0: derived from epochs and the data
  int64_t epochs = 1;
  int64_t batch_size = 8;        // global batch: sequences (packed rows) per optimizer step, over all ranks
  int64_t micro_batch_size = 0;  // per rank per forward; 0: the whole per-rank batch at once
  // How a step runs and within what GPU memory (lib/model/exec_plan.h): the budget and any plan field forced;
  // the rest is decided at start (decide_plan).
  PlanRequest memory;
  // NEFTune: uniform noise of magnitude alpha / sqrt(seq_len * hidden) on the input embeddings while training
  // (TRL's neftune_noise_alpha; 5 is the paper's common value); 0: off.
  double neftune_alpha = 0.0;
  uint64_t seed = 42;
  int64_t eval_every = 0;        // steps between held-out evaluations; 0: only at the end (if there is eval data)
  // > 0: the run ends after this many evaluations in a row without a held-out loss lower than the run's lowest
  // (HF's EarlyStoppingCallback on eval_loss, threshold 0); 0: off. Needs held-out data and eval_every.
  int64_t early_stopping_patience = 0;
  int64_t log_every = 1;
  std::string loss = "fused";    // "fused" (never holds [tokens, vocab] logits) or "plain" (reference path)
  // "sft": next-token cross-entropy on the records' targets; "dpo": preference pairs (data.format "preference"),
  // the "dpo" section's loss against the model with its adapters off (lib/train/dpo.h); "cpo": the pairs with the
  // "cpo" section's reference-free loss (CPO, SimPO, AlphaPO); "orpo": the pairs with ORPO's (the "orpo" section);
  // "kto": unpaired records {prompt, completion, label} (or pairs, unpaired) with the "kto" section's loss against
  // DPO's reference.
  std::string objective = "sft";
  // Train every weight of a 16-bit base instead of LoRA adapters (needs model.quant "none"); the result is a
  // full model directory (output_dir/model). Used to pretrain the demo's small base.
  bool full_finetune = false;
  // FullyShard (docs/ARCHITECTURE.md): "none" replicates the model on every rank (plain data parallel);
  // "blocks" shards every parameter of each decoder block (NF4 bytes and statistics, norms, LoRA A/B and their
  // AdamW state) across the ranks, gathering one block at a time. Needs checkpointing.
  std::string shard = "none";
  // With shard "blocks": embed_tokens and lm_head are sharded too (gathered around their use), else replicated.
  bool shard_embeddings = false;
  // Seconds a collective (and the start's rendezvous) may wait for the other ranks before the run ends with an
  // error naming it (PyTorch's init_process_group timeout). A rank that stalls, or a long evaluation or save on
  // some ranks only, ends the job after this long instead of hanging.
  double collective_timeout_s = 600.0;
};

struct OptimSection {
  // "adamw": fp32 moments (torch.optim.AdamW); "adamw_8bit": 8-bit blockwise moments for tensors of 4,096 elements
  // or more (bitsandbytes' AdamW8bit, HF's optim "adamw_8bit"; lib/kernels/adamw_8bit.h).
  std::string name = "adamw";
  double lr = 2e-4;
  double weight_decay = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double max_grad_norm = 1.0;  // 0: no clipping
  LrScheduleType schedule = LrScheduleType::Cosine;
  int64_t warmup_steps = 0;
  // TrainingArguments' warmup_ratio: ceil(ratio x total steps) warmup steps; used where warmup_steps is 0.
  double warmup_ratio = 0.0;
  double min_lr_ratio = 0.0;
  // schedule "wsd": the decay's steps at the end of the run, decay_steps or ceil(decay_ratio x total steps)
  // (neither: a tenth), and its shape (transformers' get_wsd_schedule: cosine, linear or 1-sqrt).
  int64_t decay_steps = 0;
  double decay_ratio = 0.0;
  WsdDecay decay_type = WsdDecay::Cosine;
  // The learning rate of the tensors trained in full (lora.modules_to_save: lm_head, embed_tokens), scheduled
  // like lr (Unsloth's embedding_learning_rate: embeddings usually want a smaller one); < 0: lr.
  double embedding_lr = -1.0;
  // LoRA+ (Hayou et al., 2024, arXiv:2402.12354), as PEFT's create_loraplus_optimizer groups the parameters: the
  // lora_B matrices and DoRA's magnitudes learn at lr times this; 0 (null): off.
  double loraplus_lr_ratio = 0.0;
};

struct CheckpointSection {
  int64_t every = 0;     // steps between checkpoints; 0: only at the end
  int64_t keep_last = 2;
  // After each evaluation whose held-out loss is the lowest of the run so far, the adapter (the model, with
  // train.full_finetune) in output_dir/best_adapter (best_model) with best.json {step, eval_loss}: HF Trainer's
  // load_best_model_at_end on eval_loss, without a checkpoint kept for it. Needs held-out data and train.eval_every.
  bool save_best = false;
};

// Task metric: exact match of greedy generations on held-out prompt/answer records, before and after training.
struct EvalSection {
  std::string exact_match_file;  // empty: off
  int64_t max_examples = 100;
  int64_t max_new_tokens = 32;
};

struct RunConfig {
  std::string file;        // where it came from, for errors
  std::string output_dir;
  ModelSection model;
  TrainSection train;
  OptimSection optim;
  CheckpointSection checkpoint;
  EvalSection eval;
  DpoSection dpo;          // read with train.objective "dpo"
  CpoSection cpo;          // read with train.objective "cpo"
  OrpoSection orpo;        // read with train.objective "orpo"
  KtoSection kto;          // read with train.objective "kto"
  Json lora = Json::object();  // parsed by lib/model/lora.h
  Json data = Json::object();  // parsed by lib/data/data_config.h
  LoraConfig parsed_lora;      // the two sections as their owners parsed them (for to_json)
  DataConfig parsed_data;
  std::string log_level = "info";
  std::string progress = "auto";  // auto (a bar on a terminal, lines otherwise), bar, lines

  Json resolved;  // the config as typed, after --set overrides (the ranks compare it at start)

  // `complete` false: the keys a run must give (output_dir, model.path, data.train_file) may be absent (`config
  // --print` of the defaults).
  // train.objective "dpo", "cpo", "orpo" or "kto": its loss section; empty for "sft".
  PreferenceObjective preference() const {
    PreferenceObjective p;
    if (train.objective == "dpo") p.dpo = &dpo;
    if (train.objective == "cpo") p.cpo = &cpo;
    if (train.objective == "orpo") p.orpo = &orpo;
    if (train.objective == "kto") p.kto = &kto;
    return p;
  }
  static RunConfig from_json(const Json& json, const std::string& file, bool complete = true);
  // Every key of the config, defaults included: what `qlora-train config --print` prints and
  // output_dir/config.resolved.json keeps (absent required keys are null); from_json reads it back.
  Json to_json() const;
  // Reads `path` and applies overrides "a.b=value" (value parsed as JSON when it is valid JSON, else a string).
  static RunConfig load(const std::string& path, const std::vector<std::string>& overrides, bool complete = true);
};

// Applies one "section.key=value" override to `json`; throws qt::Error(Usage) naming the override.
void apply_override(Json& json, const std::string& assignment);

// The run's learning-rate schedule over total_steps (warmup_steps or warmup_ratio; "wsd": its decay steps).
// Throws qt::Error(Config) naming optim.decay_steps / decay_ratio where the warmup and the decay outlast the run.
LrSchedule lr_schedule_of(const RunConfig& cfg, int64_t total_steps);

}  // namespace qt
