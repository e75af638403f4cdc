#pragma once
// The subcommands other than train (apps/trainer/commands.cpp): their options as CLI11 fills them, and the runs.
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/train/dpo.h"

namespace qt::cli {

struct EvalArgs {
  std::string model;
  std::string data;
  int64_t max_seq_len = 2048;
  std::string device = "cpu";
  std::string quant = "nf4";
  std::string adapter;
  // How records are read, rendered and masked: the run config's data.format, data.chat_template,
  // data.train_on_prompt and data.add_eos, with the same defaults.
  std::string format = "auto";
  std::string chat_template = "auto";
  std::string chat_format;  // with chat_template custom: a JSON file holding data.chat_format's object
  qt::Json chat_format_json = qt::Json::object();  // (or the run config's data.chat_format)
  bool train_on_prompt = false;
  bool add_eos = true;
  std::string config;  // a run config: its model.path, data options and max_seq_len, model.quant
  std::vector<std::string> overrides;
  std::set<std::string> given;  // the options on the command line ("--format", ...): they win over --config
  int64_t exact_match = 0;      // > 0: also the exact-match accuracy of greedy answers to the first N records
  int64_t max_new_tokens = 32;  // per answer, with exact_match
  // Preference records: DPO's loss (the run config's dpo section, or --beta) and its reference, the base with
  // reference_adapter (--reference-adapter, or the run config's lora.init_from) or alone.
  qt::DpoSection dpo;  // preference pairs: the config's dpo section (--beta over its beta)
  std::string reference_adapter;
  // A run config with train.objective "cpo" or "orpo": its section (--beta over its beta), reference-free.
  std::optional<qt::CpoSection> cpo;
  std::optional<qt::OrpoSection> orpo;
  // A run config with train.objective "kto" (its section, kl_group_size resolved; --beta over its beta), or unpaired
  // records {prompt, completion, label} without one (the section's defaults): KTO's loss against the reference.
  std::optional<qt::KtoSection> kto;
};

struct ExportArgs {
  std::string adapter;
  std::string model;  // default: adapter_config.json's base_model_name_or_path
  std::string out;
  bool merge = false;
  std::string dtype = "auto";
  std::string device = "cpu";
  std::string quant = "nf4";
  std::string gguf;  // f16 | bf16 | q8_0 | q4_k_m | ...: one GGUF file of the merged model (+ an Ollama Modelfile)
  std::string gguf_lora;  // f32 | f16 | bf16: the adapter alone as a llama.cpp LoRA adapter file
};

struct GenerateArgs {
  std::string model;
  std::string adapter;
  std::string prompt;
  int64_t max_new_tokens = 128;
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::string device = "cpu";
  std::string quant = "nf4";
  bool json = false;
  std::string format = "text";  // text: the prompt as it is; alpaca / chat: rendered as training renders it
  std::string chat_template = "auto";
  std::string chat_format;  // with chat_template custom: a JSON file holding data.chat_format's object
  std::string system;  // chat: a system message before the prompt
  std::string input;   // alpaca: the record's "input"
  // A JSON Lines file of prompts ({"prompt", and "input" / "system" as the options}) generated together, one JSON
  // line out each, instead of --prompt; at most batch_tokens cached tokens a batch.
  std::string prompts;
  int64_t batch_tokens = 8192;
};

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string resume;
  bool overwrite_output_dir = false;
  bool resume_allow_changes = false;
  std::string log_level;  // --log-level as given (empty: not given): it wins over the config's logging.level
};

// `data`: the run config's training data as training reads it (records rendered, masked, cut and left out as
// training does), with its counts and steps per epoch, and its first records with their targets marked.
struct DataArgs {
  std::string config;
  std::vector<std::string> overrides;
  int64_t show = 2;   // records printed
  bool json = false;  // one JSON object a record, then the counts
};

struct ConfigArgs {
  std::string config;
  std::vector<std::string> overrides;
  bool print = false;
};

// `plan`: the execution plan training would take for a model, row shape and GPU memory budget, decided on this
// machine (no GPU needed): what is checkpointed, offloaded, kept, where the embeddings, lm_head, AdamW and the
// block weights live, the predicted device memory and step time (an H200's rates), or the refusal.
struct PlanArgs {
  std::string config;  // a run config: its model, lora, data.max_seq_len, train.batch sizes and train.memory
  std::vector<std::string> overrides;
  std::string shape;   // a named shape (instead of the config's model)
  std::string model;   // a model directory (its config.json)
  int64_t batch = 0;   // rows per micro-batch (0: the config's micro-batch or the plan's, else 1)
  int64_t seq = 0;     // tokens per row (0: the config's data.max_seq_len)
  double gpu_memory_gib = 0;  // the budget (0: the config's, else this machine's GPU's free memory)
  double host_gib = 0;        // the host's memory (0: this machine's)
  double memory_tb_s = 0;     // the GPU's memory bandwidth (0: this machine's GPU's, else the H200's)
  double host_link_gb_s = 0;  // the host link's copy rate (0: this machine's GPU's, measured, else PCIe 5.0 x16's)
  int world = 1;              // ranks (data parallel, or FullyShard with train.shard "blocks")
  int alternatives = 0;       // also the N fastest other plans that fit (distinct in their fields)
  bool longest = false;       // the longest row (a multiple of 128 tokens) whose plan fits, instead of --seq
};

struct QuantizeArgs {
  std::string model;
  std::string out;
  std::string device = "cpu";
};

// `export --dtype`'s check: auto, or a dtype name as model.dtype takes them, given to run_export as bf16, fp16 or
// fp32 (CLI::ValidationError otherwise).
std::string export_dtype_name(const std::string& name);

int run_eval(const EvalArgs& args);
int run_export(const ExportArgs& args);
int run_generate(const GenerateArgs& args);
int run_quantize(const QuantizeArgs& args);
int run_config(const ConfigArgs& args);
int run_data(const DataArgs& args);
int run_plan(const PlanArgs& args);

}  // namespace qt::cli
