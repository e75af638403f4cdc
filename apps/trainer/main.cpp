// qlora-train: the command line. Subcommands wire parsed options to the library; every qt::Error becomes one
// line on stderr and the exit code of its kind (README, "Exit codes").
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <torch/headeronly/version.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstring>
#include <unistd.h>
#include <iostream>
#include <set>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/core/log.h"
#include "lib/data/jsonl.h"
#include "lib/data/records.h"
#include "lib/data/tokenizer.h"
#include "lib/data/unicode_text.h"
#include "lib/core/files.h"
#include "lib/export/gguf_llama.h"
#include "lib/comm/launch_env.h"
#include "lib/model/generate.h"
#include "lib/model/hf_loader.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/quantize_model.h"
#include "apps/trainer/bench.h"
#include "lib/train/evaluate.h"
#include "lib/train/output_dir.h"
#include "lib/train/run_config.h"
#include "lib/train/trainer.h"

namespace {

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
  bool train_on_prompt = false;
  bool add_eos = true;
  std::string config;  // a run config: its model.path, data options and max_seq_len, model.quant
  std::vector<std::string> overrides;
  std::set<std::string> given;  // the options on the command line ("--format", ...): they win over --config
};

struct ExportArgs {
  std::string adapter;
  std::string model;  // default: adapter_config.json's base_model_name_or_path
  std::string out;
  bool merge = false;
  std::string dtype = "auto";
  std::string device = "cpu";
  std::string quant = "nf4";
  std::string gguf;  // f16 | bf16 | q8_0: one GGUF file of the merged model (+ an Ollama Modelfile)
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
  std::string system;  // chat: a system message before the prompt
  std::string input;   // alpaca: the record's "input"
};

struct TrainArgs {
  std::string config;
  std::vector<std::string> overrides;
  std::string resume;
  bool overwrite_output_dir = false;
  bool resume_allow_changes = false;
};

// SIGTERM / SIGINT ask the loop to checkpoint after the current step and stop (a preempted node, Ctrl-C).
// A second signal ends the process at once. Each says so on stderr (write(2): async-signal-safe).
std::atomic<bool> g_stop_requested{false};
std::atomic<int> g_stop_signal{0};
void say(const char* text) {
  ssize_t ignored = ::write(2, text, std::strlen(text));
  (void)ignored;
}
extern "C" void on_stop_signal(int sig) {
  g_stop_signal.store(sig);
  const bool second = g_stop_requested.exchange(true);
  const char* name = sig == SIGINT ? "Ctrl-C (SIGINT)" : "SIGTERM";
  say("\nqlora-train: ");
  say(name);
  if (second) {
    say(" again: exiting now, without checkpointing the current step (--resume auto continues from the last "
        "complete checkpoint)\n");
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  say(": checkpointing after the current step, then stopping (send it again to exit at once)\n");
}

int run_train(const TrainArgs& args) {
  qt::RunConfig config = qt::RunConfig::load(args.config, args.overrides);
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  qt::TrainOptions options;
  // Decided before anything is read from or written to output_dir: resume, a new run, or a refusal.
  options.resume = qt::prepare_output_dir(config.output_dir, args.resume, args.overwrite_output_dir,
                                          /*remove=*/qt::read_launch_env().rank == 0, config.file);
  options.allow_resume_changes = args.resume_allow_changes;
  options.stop_requested = &g_stop_requested;
  qt::TrainSummary s = qt::train(config, options);
  if (g_stop_requested) return 128 + g_stop_signal.load();  // 143 for SIGTERM, 130 for SIGINT, as shells report
  qt::Json out = {{"steps", s.steps}, {"first_loss", s.first_loss}, {"last_loss", s.last_loss},
                  {"seconds", s.seconds}, {"tokens_per_s", s.tokens_per_s},
                  {"target_tokens_per_s", s.target_tokens_per_s}, {"adapter", s.adapter_dir}};
  if (s.eval_loss >= 0) out["eval_loss"] = s.eval_loss;
  if (s.exact_match_before >= 0) out["exact_match_before"] = s.exact_match_before;
  if (s.exact_match_after >= 0) out["exact_match_after"] = s.exact_match_after;
  if (qt::read_launch_env().rank == 0) std::cout << out.dump() << std::endl;  // one summary line per job
  return 0;
}

struct ConfigArgs {
  std::string config;
  std::vector<std::string> overrides;
  bool print = false;
};

// `config --print`: the run config as training would read it, every default included (the same JSON as
// output_dir/config.resolved.json); without --config, the defaults, with the keys a run must give null.
int run_config(const ConfigArgs& args) {
  if (!args.print) qt::fail(qt::ErrorKind::Usage, "config: pass --print (the resolved config on stdout)");
  qt::RunConfig config;
  if (args.config.empty()) {
    qt::Json j = qt::Json::object();
    for (const auto& o : args.overrides) qt::apply_override(j, o);
    config = qt::RunConfig::from_json(j, "--set", /*complete=*/false);
  } else {
    config = qt::RunConfig::load(args.config, args.overrides);
  }
  std::cout << config.to_json().dump(2) << std::endl;
  return 0;
}

struct QuantizeArgs {
  std::string model;
  std::string out;
  std::string device = "cpu";
};

at::Device parse_device(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "cuda") {
    if (!at::hasCUDA()) qt::fail(qt::ErrorKind::Device, "--device cuda: no CUDA device is available");
    return at::Device(at::kCUDA, 0);
  }
  qt::fail(qt::ErrorKind::Usage, "--device '" + name + "': expected cpu or cuda");
}

// `export --dtype`: auto, or a dtype name as the run config's model.dtype takes them (lib/model/llama_config.h),
// given to run_export as bf16, fp16 or fp32.
std::string export_dtype_name(const std::string& name) {
  if (name == "auto") return name;
  const auto dtype = qt::user_dtype(name);
  if (!dtype) throw CLI::ValidationError("'" + name + "': expected auto, " + qt::kUserDtypeNames);
  return qt::dtype_short_name(*dtype);
}

// eval and generate run the model by the plan training would choose for the same device and row length (the same
// defaults: the attention kernel, ...); what a plan keeps for a backward pass does not apply without one.
void apply_plan(qt::LlamaModel& model, const at::Device& device, int64_t seq) {
  qt::PlanInputs in;
  in.model = model.config;
  in.seq = std::max<int64_t>(seq, 1);
  in.cuda = device.is_cuda();
  in.element_size = static_cast<int64_t>(c10::elementSize(model.dtype()));
  model.plan = qt::decide_plan(in, qt::PlanRequest{}).plan;
  model.to_host(model.plan.embeddings_on_host, model.plan.lm_head_on_host);
}

// The data section's reading of records (lib/data/data_config.h) from eval's / generate's options, which take
// the run config's names and defaults; `command` names them in errors.
qt::DataConfig record_config(const std::string& command, const std::string& format, const std::string& chat_template,
                             bool train_on_prompt, bool add_eos) {
  return qt::DataConfig::from_json(qt::Json{{"train_file", "-"}, {"format", format}, {"chat_template", chat_template},
                                            {"train_on_prompt", train_on_prompt}, {"add_eos", add_eos}},
                                   command);
}

// Runs f; a data error that names the run config's data.format / data.chat_template names the options instead.
template <typename F>
auto with_option_names(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const qt::Error& e) {
    std::string m = e.what();
    for (auto [from, to] : {std::pair<std::string, std::string>{"data.chat_template", "--chat-template"},
                            {"data.format", "--format"}})
      for (size_t at = m.find(from); at != std::string::npos; at = m.find(from, at + to.size()))
        m.replace(at, from.size(), to);
    throw qt::Error(e.kind(), m);
  }
}

// A LoRA adapter directory given where a model directory belongs: say so, before a tokenizer is looked for.
void check_not_adapter(const std::string& model_dir) {
  if (qt::files::exists(qt::files::join(model_dir, qt::kAdapterConfigFile)) &&
      !qt::files::exists(qt::files::join(model_dir, "config.json")))
    qt::fail(qt::ErrorKind::Model, model_dir + " is a LoRA adapter (" + qt::kAdapterConfigFile +
                                       "); pass it as --adapter and its base as --model");
}

// --adapter onto --model, with a warning when the adapter names another local base.
void load_adapter(qt::LlamaModel& model, const std::string& adapter, const std::string& model_dir) {
  std::string named;
  if (qt::adapter_names_other_base(adapter, model_dir, &named))
    qt::log::warn("the adapter " + adapter + " was trained on " + named + ", not on --model " + model_dir +
                  " (adapter_config.json's base_model_name_or_path); its outputs may be meaningless");
  qt::load_peft_adapter(model, adapter);
}

// eval --config FILE: the run config's model.path, data.format, data.chat_template, data.train_on_prompt,
// data.add_eos, data.max_seq_len and model.quant, each where the command line does not give it.
EvalArgs with_run_config(EvalArgs a) {
  if (!a.config.empty()) {
    const qt::RunConfig c = qt::RunConfig::load(a.config, a.overrides, /*complete=*/false);
    auto unset = [&](const char* option) { return a.given.count(option) == 0; };
    if (unset("--model")) a.model = c.model.path;
    if (unset("--format")) a.format = qt::record_format_name(c.parsed_data.format);
    if (unset("--chat-template")) a.chat_template = qt::chat_template_name(c.parsed_data.chat_template);
    if (unset("--train-on-prompt")) a.train_on_prompt = c.parsed_data.train_on_prompt;
    if (unset("--add-eos")) a.add_eos = c.parsed_data.add_eos;
    if (unset("--max-seq-len")) a.max_seq_len = c.parsed_data.max_seq_len;
    if (unset("--quant")) a.quant = c.model.quant;
  } else if (!a.overrides.empty()) {
    qt::fail(qt::ErrorKind::Usage, "eval: --set overrides a key of --config FILE");
  }
  if (a.model.empty()) qt::fail(qt::ErrorKind::Usage, "eval: --model DIR is required (or --config FILE: its model.path)");
  return a;
}

int run_eval(const EvalArgs& given) {
  const EvalArgs args = with_run_config(given);
  const at::Device device = parse_device(args.device);
  check_not_adapter(args.model);
  const qt::DataConfig data =
      record_config("eval", args.format, args.chat_template, args.train_on_prompt, args.add_eos);
  // fp32 on the CPU (exact comparisons with references), bf16 on the GPU.
  qt::LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";  // as training loads the base, so that eval's figures are the trained model's
  auto tokenizer = qt::load_tokenizer(args.model);
  // Records read, rendered and masked by training's code (lib/data/records.h), before the model loads.
  const std::vector<qt::Example> docs =
      with_option_names([&] { return qt::load_examples(args.data, data, *tokenizer); });
  qt::LlamaModel model = qt::load_llama(args.model, load);
  if (!args.adapter.empty()) load_adapter(model, args.adapter, args.model);
  apply_plan(model, device, args.max_seq_len);
  qt::EvalResult r = qt::evaluate_loss(model, docs, args.max_seq_len);
  if (r.truncated) qt::log::warn(std::to_string(r.truncated) + " of " + std::to_string(r.documents) +
                                 " records were longer than --max-seq-len " + std::to_string(args.max_seq_len) +
                                 " tokens and were truncated");
  if (r.tokens == 0)
    qt::fail_at(qt::ErrorKind::Data, args.data,
                "no record has a target token to evaluate (a text record needs two or more tokens; prompts are not "
                "targets unless --train-on-prompt)");
  if (!std::isfinite(r.mean_loss())) qt::fail(qt::ErrorKind::Numeric, "evaluation loss is not finite");
  qt::Json out = {{"loss", r.mean_loss()}, {"perplexity", r.perplexity()}, {"tokens", r.tokens},
                  {"records", r.documents}, {"truncated", r.truncated}};
  std::cout << out.dump() << std::endl;
  return 0;
}

// The base of an adapter: --model, else adapter_config.json's base_model_name_or_path (a local directory).
std::string adapter_base(const std::string& model, const std::string& adapter_dir) {
  if (!model.empty()) return model;
  const std::string base = qt::read_peft_adapter_config(adapter_dir).base_model_name_or_path;
  if (base.empty())
    qt::fail_at(qt::ErrorKind::Usage, qt::files::join(adapter_dir, qt::kAdapterConfigFile),
                "base_model_name_or_path is null: pass --model DIR");
  if (!qt::files::is_dir(base))
    qt::fail_at(qt::ErrorKind::Usage, qt::files::join(adapter_dir, qt::kAdapterConfigFile),
                "base_model_name_or_path '" + base + "' is not a local directory (no downloads): pass --model DIR");
  return base;
}

int run_export(const ExportArgs& args) {
  const std::string base = adapter_base(args.model, args.adapter);
  if (!args.gguf.empty()) {
    qt::GgufExportRequest req{base, args.adapter, args.out, qt::parse_gguf_file_type(args.gguf), {}};
    req.load = qt::LoadOptions{parse_device(args.device), at::kFloat};
    req.load.quantize_nf4 = args.quant == "nf4";  // the base as training saw it, as --merge merges it
    const qt::GgufExportStats s = qt::export_gguf(req);
    qt::log::info("merged " + std::to_string(s.merged) + " adapters into " + base + ": " + std::to_string(s.tensors) +
                  " tensors, " + std::to_string(s.bytes >> 20) + " MiB at " + s.gguf_path);
    std::cout << qt::Json{{"out", args.out}, {"gguf", s.gguf_path}, {"modelfile", s.modelfile_path},
                          {"type", args.gguf}, {"base", base}, {"adapters", s.merged}, {"tensors", s.tensors},
                          {"bytes", s.bytes}, {"chat_format", s.chat_format}}.dump()
              << std::endl;
    return 0;
  }
  if (!args.merge) {
    // The adapter alone, in PEFT's format, checked against the base's shapes (config.json only is read).
    const std::string config_path = qt::find_model_files(base).config_path;
    const qt::LlamaConfig config =
        qt::LlamaConfig::from_json(qt::read_json_file(config_path, qt::ErrorKind::Model), config_path);
    if (qt::files::exists(args.out) && !qt::files::list_dir(args.out).empty())
      qt::fail_at(qt::ErrorKind::Usage, args.out, "output directory exists and is not empty");
    qt::copy_peft_adapter(args.adapter, args.out, args.model, &config);
    std::cout << qt::Json{{"out", args.out}, {"merged", false}, {"base", base}}.dump() << std::endl;
    return 0;
  }
  const at::Device device = parse_device(args.device);
  // The base as training saw it (NF4, quantized on load, unless --quant none); merged in fp32.
  qt::LoadOptions load{device, at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";
  qt::LlamaModel model = qt::load_llama(base, load);
  qt::load_peft_adapter(model, args.adapter);
  at::ScalarType dtype = at::kBFloat16;  // auto: the base's 16-bit dtype, else bf16
  if (args.dtype == "auto") {
    if (model.config.dtype == at::kHalf || model.config.dtype == at::kBFloat16) dtype = model.config.dtype;
  } else {
    dtype = args.dtype == "fp32" ? at::kFloat : args.dtype == "fp16" ? at::kHalf : at::kBFloat16;
  }
  qt::MergedExportStats s = qt::save_merged_model(model, base, args.out, dtype);
  qt::log::info("merged " + std::to_string(s.merged) + " adapters into " + base + ": " + std::to_string(s.tensors) +
                " tensors, " + std::to_string(s.bytes >> 20) + " MiB in " + std::to_string(s.shards) + " shard(s) at " + args.out);
  std::cout << qt::Json{{"out", args.out}, {"merged", true}, {"base", base}, {"adapters", s.merged},
                        {"dtype", qt::dtype_hf_name(dtype)}, {"shards", s.shards}}.dump()
            << std::endl;
  return 0;
}

// Ids that end generation: the tokenizer's EOS, generation_config.json's and config.json's eos_token_id (an id
// or a list; transformers' generate falls back on the model config's), and Llama 3's end-of-turn token when the
// vocabulary has it, and ChatML's end of turn.
std::vector<int32_t> stop_ids(const std::string& model_dir, const qt::Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  if (tokenizer.eos_id() >= 0) ids.push_back(tokenizer.eos_id());
  for (const char* name : {"generation_config.json", "config.json"}) {
    const std::string gen = qt::files::join(model_dir, name);
    if (!qt::files::exists(gen)) continue;
    const qt::Json j = qt::read_json_file(gen, qt::ErrorKind::Model);
    if (j.contains("eos_token_id")) {
      const qt::Json& e = j["eos_token_id"];
      if (e.is_number_integer()) ids.push_back(e.get<int32_t>());
      else if (e.is_array())
        for (const auto& v : e)
          if (v.is_number_integer()) ids.push_back(v.get<int32_t>());
    }
  }
  for (const char* t : {"<|eot_id|>", "<|end_of_text|>", "<|im_end|>"})
    if (int32_t id = tokenizer.token_to_id(t); id >= 0) ids.push_back(id);
  return ids;
}

// The prompt's tokens: as they are (text: BOS as the tokenizer says), or an alpaca / chat record's prompt as
// training renders and masks it (the tokens before the answer).
std::vector<int32_t> generation_prompt(const GenerateArgs& args, const qt::Tokenizer& tokenizer) {
  if (!args.system.empty() && args.format != "chat")
    qt::fail(qt::ErrorKind::Usage, "--system is the system message of --format chat");
  if (!args.input.empty() && args.format != "alpaca")
    qt::fail(qt::ErrorKind::Usage, "--input is the alpaca record's input (--format alpaca)");
  if (args.format == "text") {
    std::vector<int32_t> prompt;
    if (tokenizer.add_bos() && tokenizer.bos_id() >= 0) prompt.push_back(tokenizer.bos_id());
    for (int32_t id : tokenizer.encode(args.prompt)) prompt.push_back(id);
    return prompt;
  }
  const qt::DataConfig data = record_config("generate", args.format, args.chat_template, false, true);
  const qt::Json record = qt::prompt_record(data.format, args.prompt, args.input, args.system);
  return with_option_names(
      [&] { return qt::prompt_tokens(qt::tokenize_record(record, "--prompt", data, tokenizer)); });
}

int run_generate(const GenerateArgs& args) {
  const at::Device device = parse_device(args.device);
  check_not_adapter(args.model);
  qt::LoadOptions load{device, device.is_cuda() ? at::kBFloat16 : at::kFloat};
  load.quantize_nf4 = args.quant == "nf4";  // as training loads the base
  auto tokenizer = qt::load_tokenizer(args.model);
  const std::vector<int32_t> prompt = generation_prompt(args, *tokenizer);
  qt::LlamaModel model = qt::load_llama(args.model, load);
  if (!args.adapter.empty()) load_adapter(model, args.adapter, args.model);
  apply_plan(model, device, model.config.max_position_embeddings);
  qt::GenerateOptions options;
  options.max_new_tokens = args.max_new_tokens;
  options.temperature = args.temperature;
  options.top_p = args.top_p;
  options.seed = args.seed;
  options.stop_ids = stop_ids(args.model, *tokenizer);
  options.max_seq_len = model.config.max_position_embeddings;
  qt::GenerateResult r = qt::generate_tokens(model, prompt, options);
  std::vector<int32_t> text_ids = r.tokens;
  if (r.stopped) text_ids.pop_back();  // the stop token is not part of the text
  // A byte-level BPE model may stop inside a UTF-8 sequence: the text is made valid as transformers' decode makes
  // it (U+FFFD per maximal ill-formed subpart), for the JSON line and the plain output alike.
  const std::string text = qt::unicode::replace_invalid_utf8(tokenizer->decode(text_ids));
  if (args.json) {
    std::cout << qt::Json{{"prompt_ids", prompt}, {"ids", r.tokens}, {"text", text},
                          {"stop", r.stopped ? "eos" : "length"}}.dump()
              << std::endl;
  } else {
    std::cout << text << std::endl;
  }
  return 0;
}

int run_quantize(const QuantizeArgs& args) {
  qt::QuantizeStats s = qt::quantize_model_dir(args.model, args.out, parse_device(args.device));
  qt::log::info("quantized " + std::to_string(s.linears) + " linears: " + std::to_string(s.input_bytes >> 20) + " MiB -> " +
                std::to_string(s.output_bytes >> 20) + " MiB in " + std::to_string(s.shards) + " shard(s) at " + args.out);
  std::cout << qt::Json{{"linears", s.linears}, {"input_bytes", s.input_bytes}, {"output_bytes", s.output_bytes},
                        {"shards", s.shards}, {"out", args.out}}.dump()
            << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qlora-train: QLoRA fine-tuning of LLaMA-family models (NF4 base, LoRA adapters)"};
  app.set_version_flag("--version", std::string("qlora-train ") + QT_VERSION + " (commit " + QT_GIT_COMMIT +
                                        ", LibTorch " + TORCH_VERSION + ", CUDA kernels " +
                                        (QT_CUDA_BUILD ? "compiled" : "not compiled") + ")");
  // Help texts show each option's default (options added from here on inherit the setting, subcommands' too).
  app.option_defaults()->always_capture_default();
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "debug, info, warn, error or off")
      ->check(CLI::IsMember({"debug", "info", "warn", "error", "off"}));
  app.require_subcommand(0, 1);

  // Training is the default command: `qlora-train --config F` and `qlora-train train --config F` are the same.
  TrainArgs train;
  auto add_train_options = [&](CLI::App* cmd) {
    cmd->add_option("--config", train.config, "run config (JSON), e.g. configs/demo.json");
    cmd->add_option("--set", train.overrides, "override a config key: --set optim.lr=1e-4 (repeatable)");
    cmd->add_option("--resume", train.resume,
                    "auto (the newest complete checkpoint in output_dir; a new run if there is none) or a checkpoint directory");
    cmd->add_flag("--overwrite-output-dir", train.overwrite_output_dir,
                  "replace an earlier run's files in output_dir (checkpoints, adapter, metrics); without it such a "
                  "directory is refused");
    cmd->add_flag("--resume-allow-changes", train.resume_allow_changes,
                  "resume although the schedule length (train.steps / train.epochs) or data.train_file's content "
                  "changed since the checkpoint");
  };
  add_train_options(&app);
  CLI::App* train_cmd = app.add_subcommand("train", "Fine-tune with QLoRA (the default command)");
  add_train_options(train_cmd);

  EvalArgs eval;
  CLI::App* eval_cmd = app.add_subcommand("eval", "Mean token cross-entropy and perplexity over a jsonl file's records (training's formats)");
  eval_cmd->add_option("--model", eval.model, "Hugging Face model directory (config.json, safetensors, tokenizer); "
                                              "required unless --config names it");
  eval_cmd->add_option("--data", eval.data, "jsonl file of records, in any format training reads (--format)")->required();
  eval_cmd->add_option("--max-seq-len", eval.max_seq_len, "truncate each record to this many tokens")
      ->check(CLI::PositiveNumber);
  eval_cmd->add_option("--device", eval.device, "cpu or cuda");
  eval_cmd->add_option("--quant", eval.quant, "nf4 (quantize the base on load, as training does) or none")
      ->check(CLI::IsMember({"nf4", "none"}));

  eval_cmd->add_option("--adapter", eval.adapter, "LoRA adapter directory (PEFT format) applied to the base");
  eval_cmd->add_option("--format", eval.format,
                       "record format, as data.format: auto (each record's keys decide), text, alpaca, chat or tokenized")
      ->check(CLI::IsMember({"auto", "text", "alpaca", "chat", "tokenized"}));
  eval_cmd->add_option("--chat-template", eval.chat_template,
                       "chat records' template, as data.chat_template: auto (from tokenizer_config.json), llama3, "
                       "llama2, mistral or chatml")
      ->check(CLI::IsMember({"auto", "llama3", "llama2", "mistral", "chatml"}));
  eval_cmd->add_flag("--train-on-prompt,!--no-train-on-prompt", eval.train_on_prompt,
                     "prompts are targets too (data.train_on_prompt); by default only answers are, as in training");
  eval_cmd->add_option("--add-eos", eval.add_eos, "text records end with EOS (data.add_eos)")->default_str("true");
  eval_cmd->add_option("--config", eval.config,
                       "a run config (or a run's config.resolved.json): its model.path, data.format, "
                       "data.chat_template, data.train_on_prompt, data.add_eos, data.max_seq_len and model.quant, "
                       "where these options are not given");
  eval_cmd->add_option("--set", eval.overrides, "override a key of --config: --set data.max_seq_len=512 (repeatable)");

  ExportArgs exp;
  CLI::App* export_cmd = app.add_subcommand("export", "Write an adapter in PEFT format, or merged into a 16-bit HF model (--merge)");
  export_cmd->add_option("--adapter", exp.adapter, "LoRA adapter directory (PEFT format)")->required();
  export_cmd->add_option("--model", exp.model, "base model directory (default: adapter_config.json's base_model_name_or_path)");
  export_cmd->add_option("--out", exp.out, "output directory (new or empty)")->required();
  export_cmd->add_flag("--merge", exp.merge, "fold W + scale * B A into the base weights and write a plain HF model");
  export_cmd->add_option("--dtype", exp.dtype, "merged weights: auto (the base's 16-bit dtype, else bf16), bf16, fp16 or fp32")
      ->transform(export_dtype_name, "auto|bf16|fp16|fp32 (or bfloat16, float16, float32)");
  export_cmd->add_option("--device", exp.device, "where to merge: cpu or cuda");
  export_cmd->add_option("--quant", exp.quant, "nf4 (merge onto the NF4 base training saw) or none (the 16-bit base)")
      ->check(CLI::IsMember({"nf4", "none"}));
  export_cmd->add_option("--gguf", exp.gguf, "write the merged model as one GGUF file for llama.cpp / Ollama, with a Modelfile, its weights f16, bf16 or q8_0 (instead of --merge; --dtype does not apply)")
      ->check(CLI::IsMember({"f16", "bf16", "q8_0"}));

  GenerateArgs gen;
  CLI::App* gen_cmd = app.add_subcommand("generate", "Continue a prompt (greedy, or temperature + top-p sampling)");
  gen_cmd->add_option("--model", gen.model, "Hugging Face model directory")->required();
  gen_cmd->add_option("--adapter", gen.adapter, "LoRA adapter directory (PEFT format)");
  gen_cmd->add_option("--prompt", gen.prompt, "prompt text (text: BOS added as the tokenizer says); see --format")->required();
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "at most this many new tokens")->check(CLI::NonNegativeNumber);
  gen_cmd->add_option("--temperature", gen.temperature, "0: greedy; > 0: sample")->check(CLI::NonNegativeNumber);
  gen_cmd->add_option("--top-p", gen.top_p, "nucleus sampling mass in (0, 1]");
  gen_cmd->add_option("--seed", gen.seed, "sampling seed");
  gen_cmd->add_option("--device", gen.device, "cpu or cuda");
  gen_cmd->add_option("--quant", gen.quant, "nf4 (quantize the base on load, as training does) or none")
      ->check(CLI::IsMember({"nf4", "none"}));
  gen_cmd->add_flag("--json", gen.json, "print {prompt_ids, ids, text, stop} instead of the text");
  gen_cmd->add_option("--format", gen.format,
                      "text (the prompt as it is), alpaca (--prompt is the instruction) or chat (--prompt is the user "
                      "message), rendered as training renders the prompt of such a record")
      ->check(CLI::IsMember({"text", "alpaca", "chat"}));
  gen_cmd->add_option("--chat-template", gen.chat_template,
                      "with --format chat, as data.chat_template: auto (from tokenizer_config.json), llama3, llama2, "
                      "mistral or chatml")
      ->check(CLI::IsMember({"auto", "llama3", "llama2", "mistral", "chatml"}));
  gen_cmd->add_option("--system", gen.system, "with --format chat: a system message before the prompt");
  gen_cmd->add_option("--input", gen.input, "with --format alpaca: the record's input (context)");

  QuantizeArgs quantize;
  CLI::App* quantize_cmd = app.add_subcommand("quantize", "Write a pre-quantized NF4 copy of a model directory (bitsandbytes layout)");
  quantize_cmd->add_option("--model", quantize.model, "Hugging Face model directory (16-bit safetensors)")->required();
  quantize_cmd->add_option("--out", quantize.out, "output directory (new or empty)")->required();
  quantize_cmd->add_option("--device", quantize.device, "where to quantize: cpu or cuda");

  qt::BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "Time training steps on a model of random weights (tokens/s, peak memory, MFU)");
  bench_cmd->add_option("--shape", bench.shape, "a named shape: llama-3.2-1b, llama-3.1-8b, ... (or --model)");
  bench_cmd->add_option("--model", bench.model, "a model directory whose config.json gives the shape");
  bench_cmd->add_option("--batch", bench.batch, "rows per step")->check(CLI::PositiveNumber);
  bench_cmd->add_option("--seq", bench.seq, "tokens per row")->check(CLI::PositiveNumber);
  bench_cmd->add_option("--doc-tokens", bench.doc_tokens,
                        "packed rows of random documents of this median length (log-normal; 0: one document a row)")
      ->check(CLI::NonNegativeNumber);
  bench_cmd->add_option("--steps", bench.steps, "timed steps (the median is reported)")->check(CLI::PositiveNumber);
  bench_cmd->add_option("--warmup", bench.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  bench_cmd->add_option("--device", bench.device, "cuda or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  bench_cmd->add_option("--out", bench.out, "working directory (random data, run config, the run)")->required();
  bench_cmd->add_option("--set", bench.overrides, "override a run config key: --set train.attention=flash (repeatable)");

  ConfigArgs config_args;
  CLI::App* config_cmd = app.add_subcommand("config", "Print the resolved run config, every default included");
  config_cmd->add_flag("--print", config_args.print, "print the config as training reads it (JSON) on stdout");
  config_cmd->add_option("--config", config_args.config, "run config (JSON); without it, the defaults");
  config_cmd->add_option("--set", config_args.overrides, "override a config key: --set optim.lr=1e-4 (repeatable)");

  // --log-level after the subcommand too (`qlora-train eval --log-level debug ...`), into the same value.
  for (CLI::App* cmd : app.get_subcommands({}))
    cmd->add_option("--log-level", log_level, "debug, info, warn, error or off")
        ->check(CLI::IsMember({"debug", "info", "warn", "error", "off"}));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : qt::exit_code(qt::ErrorKind::Usage);
  }
  try {
    qt::log::set_level(qt::log::parse_level(log_level));
    if (eval_cmd->parsed()) {
      for (const CLI::Option* o : eval_cmd->get_options())
        if (o->count() > 0)
          for (const auto& name : o->get_lnames()) eval.given.insert("--" + name);
      return run_eval(eval);
    }
    if (train_cmd->parsed() || (!train.config.empty() && app.get_subcommands().empty())) {
      if (train.config.empty()) qt::fail(qt::ErrorKind::Usage, "train: --config FILE is required");
      return run_train(train);
    }
    if (quantize_cmd->parsed()) return run_quantize(quantize);
    if (config_cmd->parsed()) return run_config(config_args);
    if (export_cmd->parsed()) return run_export(exp);
    if (gen_cmd->parsed()) return run_generate(gen);
    if (bench_cmd->parsed()) {
      std::cout << qt::run_bench(bench).dump() << std::endl;
      return 0;
    }
    std::cerr << app.help() << std::endl;
    return qt::exit_code(qt::ErrorKind::Usage);
  } catch (const qt::Error& e) {
    std::cerr << "qlora-train: " << qt::kind_name(e.kind()) << ": " << e.what() << std::endl;
    return qt::exit_code(e.kind());
  } catch (const c10::OutOfMemoryError& e) {
    // Outside a training step (loading, checkpointing, eval, generate): still a device failure, not a bug.
    std::cerr << "qlora-train: " << qt::kind_name(qt::ErrorKind::Device) << ": out of device memory ("
              << e.what_without_backtrace() << "); lower the batch or sequence length, or use a larger device"
              << std::endl;
    return qt::exit_code(qt::ErrorKind::Device);
  } catch (const c10::Error& e) {
    std::cerr << "qlora-train: internal error (torch): " << e.what_without_backtrace() << std::endl;
    return qt::exit_code(qt::ErrorKind::Internal);
  } catch (const std::exception& e) {
    std::cerr << "qlora-train: internal error: " << e.what() << std::endl;
    return qt::exit_code(qt::ErrorKind::Internal);
  }
}
