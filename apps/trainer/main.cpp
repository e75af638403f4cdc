// qlora-train's subcommands other than train: eval, export, generate, quantize, config (apps/trainer/commands.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <torch/headeronly/version.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cctype>
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
#include "apps/trainer/commands.h"

namespace {

using namespace qt::cli;

// Numbers on the command line: CLI11's PositiveNumber / NonNegativeNumber let inf and nan through (nan read as
// unset later) and word their range with the largest double written out in full.
CLI::Validator finite_number(bool zero_allowed) {
  return CLI::Validator(
      [zero_allowed](std::string& text) -> std::string {
        double v = 0;
        size_t used = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != text.size()) return "must be a number, got '" + text + "'";
        if (!std::isfinite(v) || v < 0 || (v == 0 && !zero_allowed))
          return std::string("must be a finite number ") + (zero_allowed ? ">= 0" : "> 0") + ", got " + text;
        return "";
      },
      zero_allowed ? "NONNEGATIVE" : "POSITIVE");
}
const CLI::Validator kPositive = finite_number(false);
const CLI::Validator kNonNegative = finite_number(true);
// A path given as "" (an unset shell variable) is a mistake: `quantize --out ""` wrote the model into the working
// directory, over its files.
const CLI::Validator kPath = CLI::Validator(
    [](std::string& text) -> std::string { return text.empty() ? "is empty: name a file or directory" : ""; }, "PATH");
// (0, 1]: generate's --top-p, checked before the model loads.
const CLI::Validator kUnitInterval = CLI::Validator(
    [](std::string& text) -> std::string {
      std::string copy = text;
      if (std::string e = kPositive(copy); !e.empty()) return e;
      if (std::stod(text) > 1) return "must be in (0, 1], got " + text;
      return "";
    },
    "(0, 1]");

// SIGTERM / SIGINT ask the loop to checkpoint after the current step and stop (a preempted node, Ctrl-C).
// A second signal ends the process at once, and so does the first before the first step (nothing to checkpoint).
// Each says so on stderr (write(2): async-signal-safe).
std::atomic<bool> g_stop_requested{false};
std::atomic<int> g_stop_signal{0};
std::atomic<int> g_phase{qt::kBeforeSteps};
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
  const int phase = g_phase.load();
  if (second || phase == qt::kBeforeSteps) {
    say(second ? " again: exiting now, without checkpointing the current step (--resume auto continues from the last "
                 "complete checkpoint)\n"
               : " before the first step: exiting now (nothing to checkpoint yet)\n");
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  say(phase == qt::kFinishing
          ? " after the last step: completing the run's final evaluation and saves (send it again to exit at once; "
            "--resume auto then completes them)\n"
          : ": checkpointing after the current step, then stopping (send it again to exit at once)\n");
}

// eval, export, generate, quantize and bench are one process's work: under mpirun or torchrun with several ranks
// every rank ran the whole command (export and quantize wrote one output directory from each rank at once: a
// stray model.safetensors.tmp left in it, or "cannot create" on the rank that lost the race).
void require_one_process(const char* command) {
  const qt::LaunchEnv env = qt::read_launch_env();
  if (env.world_size > 1)
    qt::fail(qt::ErrorKind::Usage, std::string(command) + " runs in one process, but this is rank " +
                                       std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                                       " (launcher " + qt::launcher_name(env.launcher) + "): run `qlora-train " +
                                       command + " ...` without mpirun or torchrun (only training uses several ranks)");
}

// "rank R of W: " under a launcher of several ranks (each prints its own error line: a rank's missing data file said
// only "data error: train.jsonl: file not found"), else "".
std::string rank_tag() {
  try {
    const qt::LaunchEnv env = qt::read_launch_env();
    if (env.world_size > 1) return "rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) + ": ";
  } catch (const qt::Error&) {
    // (the launcher variables themselves are what the error says is wrong)
  }
  return "";
}

// "qlora-train: [rank R of W: ]KIND: MESSAGE" in one write, so that the lines other ranks print meanwhile do not land
// inside it; without the tag where the message starts by naming the rank itself (the collectives' errors do).
void print_error(const std::string& kind, const std::string& message) {
  std::string tag = rank_tag();
  const std::string rank = tag.substr(0, tag.find(" of "));  // "rank R"
  const bool named = message.rfind(rank, 0) == 0 &&
                     (message.size() == rank.size() || !std::isdigit(static_cast<unsigned char>(message[rank.size()])));
  if (named) tag.clear();
  std::cerr << ("qlora-train: " + tag + kind + ": " + message + "\n") << std::flush;
}

int run_train(const TrainArgs& args) {
  // Before output_dir is looked at: what every rank finds there (an incomplete checkpoint) is said once, by rank 0.
  qt::log::set_rank(qt::read_launch_env().rank);
  qt::RunConfig config = qt::RunConfig::load(args.config, args.overrides);
  if (!args.log_level.empty()) config.log_level = args.log_level;
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  qt::TrainOptions options;
  // Decided before anything is read from or written to output_dir: resume, a new run, or a refusal.
  options.resume = qt::prepare_output_dir(config.output_dir, args.resume, args.overwrite_output_dir, options.replace,
                                          config.file);
  options.allow_resume_changes = args.resume_allow_changes;
  options.stop_requested = &g_stop_requested;
  options.phase = &g_phase;
  qt::TrainSummary s = qt::train(config, options);
  // 143 for SIGTERM, 130 for SIGINT, as shells report. A signal after the last step let the run complete: its summary
  // and exit 0.
  // A rank stopped by another rank's signal (the ranks agree to stop together) exits as the signalled one would.
  if (s.stopped) return 128 + (g_stop_signal.load() != 0 ? g_stop_signal.load() : SIGTERM);
  qt::Json out = {{"steps", s.steps}, {"first_loss", s.first_loss}, {"last_loss", s.last_loss},
                  {"seconds", s.seconds}, {"tokens_per_s", s.tokens_per_s},
                  {"target_tokens_per_s", s.target_tokens_per_s}, {"steps_overlapped", s.steps_overlapped},
                  {"adapter", s.adapter_dir}};
  if (s.eval_loss >= 0) out["eval_loss"] = s.eval_loss;
  if (s.stopped_early) out["stopped_early"] = true;
  if (!s.best_dir.empty()) out["best"] = {{"dir", s.best_dir}, {"step", s.best_step}, {"eval_loss", s.best_eval_loss}};
  if (s.exact_match_before >= 0) out["exact_match_before"] = s.exact_match_before;
  if (s.exact_match_after >= 0) out["exact_match_after"] = s.exact_match_after;
  if (qt::read_launch_env().rank == 0) std::cout << out.dump() << std::endl;  // one summary line per job
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A file past the process's file size limit (ulimit -f, a batch system's quota) fails its write with EFBIG, which
  // the writers report naming the file (exit 8, the last checkpoint kept), instead of SIGXFSZ killing the process
  // with no word of its own and a half-written checkpoint directory (fuzzing round 10).
  std::signal(SIGXFSZ, SIG_IGN);
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
    cmd->add_option("--config", train.config, "run config (JSON), e.g. configs/demo.json")->check(kPath);
    cmd->add_option("--set", train.overrides, "override a config key: --set optim.lr=1e-4 (repeatable)");
    cmd->add_option("--resume", train.resume,
                    "auto (the newest complete checkpoint in output_dir; a new run if there is none) or a checkpoint directory");
    cmd->add_flag("--overwrite-output-dir", train.overwrite_output_dir,
                  "replace an earlier run's files in output_dir (checkpoints, adapter, metrics); without it such a "
                  "directory is refused");
    cmd->add_flag("--resume-allow-changes", train.resume_allow_changes,
                  "resume although the schedule length (train.steps / train.epochs) or data.train_file's content "
                  "changed since the checkpoint, or the model and data files are at other paths");
  };
  add_train_options(&app);
  CLI::App* train_cmd = app.add_subcommand("train", "Fine-tune with QLoRA (the default command)");
  add_train_options(train_cmd);

  EvalArgs eval;
  CLI::App* eval_cmd = app.add_subcommand("eval", "Mean token cross-entropy and perplexity over a jsonl file's records (training's formats)");
  eval_cmd
      ->add_option("--model", eval.model,
                   "Hugging Face model directory (config.json, safetensors, tokenizer); "
                   "required unless --config names it")
      ->check(kPath);
  eval_cmd->add_option("--data", eval.data, "jsonl file of records, in any format training reads (--format)")
      ->required()
      ->check(kPath);
  eval_cmd->add_option("--max-seq-len", eval.max_seq_len, "truncate each record to this many tokens")
      ->check(kPositive);
  eval_cmd->add_option("--device", eval.device, "cpu or cuda");
  eval_cmd->add_option("--quant", eval.quant, "nf4 (quantize the base on load, as training does) or none")
      ->check(CLI::IsMember({"nf4", "none"}));

  eval_cmd->add_option("--adapter", eval.adapter, "LoRA adapter directory (PEFT format) applied to the base")
      ->check(kPath);
  eval_cmd->add_option("--format", eval.format,
                       "record format, as data.format: auto (each record's keys decide), text, alpaca, chat, "
                       "completion, preference (DPO's loss over {prompt, chosen, rejected} pairs) or tokenized")
      ->check(CLI::IsMember({"auto", "text", "alpaca", "chat", "completion", "preference", "tokenized"}));
  eval_cmd->add_option("--beta", eval.dpo.beta,
                       "preference pairs: DPO's beta (default: --config's dpo.beta, else 0.1; its dpo.loss_type "
                       "too; a config with train.objective \"cpo\" or \"orpo\": that section, this over its beta)")
      ->check(CLI::PositiveNumber);
  eval_cmd->add_option("--reference-adapter", eval.reference_adapter,
                       "preference pairs: the reference is the base with this adapter (a DPO run's lora.init_from; "
                       "default: --config's lora.init_from, else the base alone)")
      ->check(kPath);
  eval_cmd->add_option("--chat-template", eval.chat_template,
                       "chat records' template, as data.chat_template: auto (from tokenizer_config.json) or a "
                       "built-in one")
      ->check(CLI::IsMember(qt::chat_template_names()));
  eval_cmd->add_option("--chat-format", eval.chat_format,
                       "with --chat-template custom: a JSON file holding the format, as data.chat_format")
      ->check(kPath);
  eval_cmd->add_flag("--train-on-prompt,!--no-train-on-prompt", eval.train_on_prompt,
                     "prompts are targets too (data.train_on_prompt); by default only answers are, as in training");
  eval_cmd->add_option("--add-eos", eval.add_eos, "text records end with EOS (data.add_eos)")->default_str("true");
  eval_cmd
      ->add_option("--config", eval.config,
                   "a run config (or a run's config.resolved.json): its model.path, data.format, "
                   "data.chat_template, data.train_on_prompt, data.add_eos, data.max_seq_len and model.quant, "
                   "where these options are not given")
      ->check(kPath);
  eval_cmd->add_option("--set", eval.overrides, "override a key of --config: --set data.max_seq_len=512 (repeatable)");
  CLI::Option* exact_match_opt = eval_cmd->add_option("--exact-match", eval.exact_match,
                       "also the exact-match accuracy of greedy answers to the first N records, as training's "
                       "eval.exact_match_file measures it (answers: alpaca's output, a completion, a last assistant "
                       "message)")
      ->check(kPositive);
  eval_cmd->add_option("--max-new-tokens", eval.max_new_tokens, "with --exact-match: tokens generated per answer")
      ->check(kPositive)
      ->needs(exact_match_opt);

  ExportArgs exp;
  CLI::App* export_cmd = app.add_subcommand("export", "Write an adapter in PEFT format, or merged into a 16-bit HF model (--merge)");
  export_cmd->add_option("--adapter", exp.adapter, "LoRA adapter directory (PEFT format)")->required()->check(kPath);
  export_cmd
      ->add_option("--model", exp.model,
                   "base model directory (default: adapter_config.json's base_model_name_or_path)")
      ->check(kPath);
  export_cmd->add_option("--out", exp.out, "output directory (new or empty)")->required()->check(kPath);
  export_cmd->add_flag("--merge", exp.merge, "fold W + scale * B A into the base weights and write a plain HF model");
  export_cmd->add_option("--dtype", exp.dtype, "merged weights: auto (the base's 16-bit dtype, else bf16), bf16, fp16 or fp32")
      ->transform(export_dtype_name, "auto|bf16|fp16|fp32 (or bfloat16, float16, float32)");
  export_cmd->add_option("--device", exp.device, "where to merge: cpu or cuda");
  export_cmd->add_option("--quant", exp.quant, "nf4 (merge onto the NF4 base training saw) or none (the 16-bit base)")
      ->check(CLI::IsMember({"nf4", "none"}));
  export_cmd
      ->add_option("--gguf", exp.gguf,
                   "write the merged model as one GGUF file for llama.cpp / Ollama, with a Modelfile, its weights f16, "
                   "bf16, q8_0, or (the others) as llama-quantize makes them of the f16 file (instead of --merge; "
                   "--dtype does not apply)")
      ->check(CLI::IsMember(qt::gguf_file_type_names()));
  export_cmd
      ->add_option("--gguf-lora", exp.gguf_lora,
                   "write the adapter alone as a llama.cpp LoRA adapter GGUF (llama-cli -m BASE.gguf --lora FILE; "
                   "Ollama's ADAPTER), its tensors f32, f16 or bf16 (instead of --merge / --gguf)")
      ->check(CLI::IsMember(qt::gguf_lora_type_names()))
      ->excludes("--gguf")
      ->excludes("--merge");

  GenerateArgs gen;
  CLI::App* gen_cmd = app.add_subcommand("generate", "Continue a prompt (greedy, or temperature + top-p sampling)");
  gen_cmd->add_option("--model", gen.model, "Hugging Face model directory")->required()->check(kPath);
  gen_cmd->add_option("--adapter", gen.adapter, "LoRA adapter directory (PEFT format)")->check(kPath);
  CLI::Option* prompt_opt =
      gen_cmd->add_option("--prompt", gen.prompt, "prompt text (text: BOS added as the tokenizer says); see --format");
  gen_cmd
      ->add_option("--prompts", gen.prompts,
                   "instead of --prompt: a JSON Lines file of {\"prompt\"} records (\"input\" and \"system\" as the "
                   "options, which they override), generated together; one JSON line {line, prompt_ids, ids, text, "
                   "stop} a record, in file order")
      ->excludes(prompt_opt);
  gen_cmd->add_option("--batch-tokens", gen.batch_tokens,
                      "with --prompts: at most this many tokens (rows x (longest prompt + --max-new-tokens)) a batch")
      ->check(kPositive);
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "at most this many new tokens")->check(kNonNegative);
  gen_cmd->add_option("--temperature", gen.temperature, "0: greedy; > 0: sample")->check(kNonNegative);
  gen_cmd->add_option("--top-p", gen.top_p, "nucleus sampling mass in (0, 1]")->check(kUnitInterval);
  gen_cmd->add_option("--seed", gen.seed, "sampling seed");
  gen_cmd->add_option("--device", gen.device, "cpu or cuda");
  gen_cmd->add_option("--quant", gen.quant, "nf4 (quantize the base on load, as training does) or none")
      ->check(CLI::IsMember({"nf4", "none"}));
  gen_cmd->add_flag("--json", gen.json, "print {prompt_ids, ids, text, stop} instead of the text");
  gen_cmd->add_option("--format", gen.format,
                      "text (the prompt as it is), alpaca (--prompt is the instruction), completion (--prompt is a "
                      "prompt-completion record's prompt) or chat (--prompt is the user message), rendered as training "
                      "renders the prompt of such a record")
      ->check(CLI::IsMember({"text", "alpaca", "completion", "chat"}));
  gen_cmd->add_option("--chat-template", gen.chat_template,
                      "with --format chat, as data.chat_template: auto (from tokenizer_config.json) or a built-in "
                      "one")
      ->check(CLI::IsMember(qt::chat_template_names()));
  gen_cmd->add_option("--chat-format", gen.chat_format,
                      "with --chat-template custom: a JSON file holding the format, as data.chat_format")
      ->check(kPath);
  gen_cmd->add_option("--system", gen.system, "with --format chat: a system message before the prompt");
  gen_cmd->add_option("--input", gen.input, "with --format alpaca: the record's input (context)");

  QuantizeArgs quantize;
  CLI::App* quantize_cmd = app.add_subcommand("quantize", "Write a pre-quantized NF4 copy of a model directory (bitsandbytes layout)");
  quantize_cmd->add_option("--model", quantize.model, "Hugging Face model directory (16-bit safetensors)")
      ->required()
      ->check(kPath);
  quantize_cmd->add_option("--out", quantize.out, "output directory (new or empty)")->required()->check(kPath);
  quantize_cmd->add_option("--device", quantize.device, "where to quantize: cpu or cuda");

  qt::BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "Time training steps on a model of random weights (tokens/s, peak memory, MFU)");
  bench_cmd->add_option("--shape", bench.shape, "a named shape: llama-3.2-1b, llama-3.1-8b, ... (or --model)");
  bench_cmd->add_option("--model", bench.model, "a model directory whose config.json gives the shape")->check(kPath);
  bench_cmd->add_option("--batch", bench.batch, "rows per step")->check(kPositive);
  bench_cmd->add_option("--seq", bench.seq, "tokens per row")->check(kPositive);
  bench_cmd->add_option("--doc-tokens", bench.doc_tokens,
                        "packed rows of random documents of this median length (log-normal; 0: one document a row)")
      ->check(kNonNegative);
  bench_cmd->add_option("--steps", bench.steps, "timed steps (the median is reported)")->check(kPositive);
  bench_cmd->add_option("--warmup", bench.warmup, "untimed steps first")->check(kNonNegative);
  bench_cmd->add_option("--device", bench.device, "cuda or cpu")->check(CLI::IsMember({"cuda", "cpu"}));
  bench_cmd->add_option("--out", bench.out, "working directory (random data, run config, the run)")
      ->required()
      ->check(kPath);
  bench_cmd->add_option("--set", bench.overrides, "override a run config key: --set train.memory.attention=flash (repeatable)");
  bench_cmd->add_option("--generate", bench.generate,
                        "time generation instead: this many random prompts continued greedily through the key / value "
                        "cache in batches of at most --batch x --seq tokens, against a few without it (--uncached)")
      ->check(kPositive);
  bench_cmd->add_option("--prompt-tokens", bench.prompt_tokens, "with --generate: the prompts' median length")
      ->check(kPositive);
  bench_cmd->add_option("--max-new-tokens", bench.max_new_tokens, "with --generate: tokens generated per prompt")
      ->check(kPositive);
  bench_cmd->add_option("--uncached", bench.uncached,
                        "with --generate: prompts also generated one at a time without the cache")
      ->check(kNonNegative);

  PlanArgs plan_args;
  CLI::App* plan_cmd = app.add_subcommand("plan", "Print the execution plan training would take for a GPU memory budget (no GPU needed): what is checkpointed, offloaded, kept on the host, the predicted device memory and step time, or why it does not fit");
  plan_cmd
      ->add_option("--config", plan_args.config,
                   "run config (JSON): its model, lora, data.max_seq_len, batch sizes and train.memory")
      ->check(kPath);
  plan_cmd->add_option("--set", plan_args.overrides, "override a run config key: --set lora.r=64 (repeatable)");
  plan_cmd->add_option("--shape", plan_args.shape, "a named shape: llama-3.1-8b, qwen3-8b, ... (instead of the config's model)");
  plan_cmd->add_option("--model", plan_args.model, "a model directory whose config.json gives the shape")->check(kPath);
  plan_cmd->add_option("--batch", plan_args.batch, "rows per micro-batch (default: the config's train.micro_batch_size, or where that is 0 the plan's among the sizes dividing its per-rank batch; else 1)")->check(kPositive);
  plan_cmd->add_option("--seq", plan_args.seq, "tokens per row (default: the config's data.max_seq_len)")->check(kPositive);
  plan_cmd->add_option("--gpu-memory-gib", plan_args.gpu_memory_gib, "the GPU memory budget in GiB (default: train.memory.gpu_memory_gib, else this machine's free GPU memory)")
      ->check(kPositive & CLI::Range(0.0, 1048576.0));
  plan_cmd->add_option("--host-gib", plan_args.host_gib, "the host's memory in GiB (default: this machine's)")
      ->check(kPositive & CLI::Range(0.0, 1048576.0));
  plan_cmd->add_option("--memory-tb-s", plan_args.memory_tb_s,
                       "the GPU's memory bandwidth in TB/s, for the predicted step time (default: this machine's GPU's, "
                       "else an H200's 4.92; an H100 SXM: 3.35)")
      ->check(kPositive & CLI::Range(0.0, 1000.0));
  plan_cmd->add_option("--host-link-gb-s", plan_args.host_link_gb_s,
                       "the host link's pinned copy rate in GB/s, for the predicted cost of offloading and streaming "
                       "(default: this machine's GPU's, measured, on a Hopper GPU; else PCIe 5.0 x16's 55; PCIe 4.0 x16: about 25)")
      ->check(kPositive & CLI::Range(0.0, 10000.0));
  plan_cmd->add_option("--world", plan_args.world, "ranks on the host")->check(kPositive);
  plan_cmd->add_flag("--longest", plan_args.longest,
                     "the longest row (a multiple of 128 tokens, at most 4,194,304) whose plan fits the budget and the "
                     "host, with its plan (instead of --seq)");
  plan_cmd->add_option("--alternatives", plan_args.alternatives, "also print the N fastest other plans that fit the budget, with their predicted memory and step time (default 0)")->check(kNonNegative);

  DataArgs data_args;
  CLI::App* data_cmd = app.add_subcommand(
      "data", "Show the training data as training reads it: the first records with their targets marked, the counts "
              "and steps per epoch (no weights are loaded)");
  data_cmd->add_option("--config", data_args.config, "run config (JSON): its model.path (the tokenizer) and data")
      ->required()
      ->check(kPath);
  data_cmd->add_option("--set", data_args.overrides, "override a config key: --set data.max_seq_len=512 (repeatable)");
  data_cmd->add_option("--show", data_args.show, "records printed, from the start of data.train_file (default 2)")
      ->check(kNonNegative);
  data_cmd->add_flag("--json", data_args.json,
                     "one JSON object a record ({record, ids, loss, runs: [text, in the loss]}), then {counts}");

  ConfigArgs config_args;
  CLI::App* config_cmd = app.add_subcommand("config", "Print the resolved run config, every default included");
  config_cmd->add_flag("--print", config_args.print, "print the config as training reads it (JSON) on stdout");
  config_cmd->add_option("--config", config_args.config, "run config (JSON); without it, the defaults")->check(kPath);
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
    for (CLI::App* cmd : {eval_cmd, quantize_cmd, export_cmd, gen_cmd, bench_cmd})
      if (cmd->parsed()) require_one_process(cmd->get_name().c_str());
    if (eval_cmd->parsed()) {
      for (const CLI::Option* o : eval_cmd->get_options())
        if (o->count() > 0)
          for (const auto& name : o->get_lnames()) eval.given.insert("--" + name);
      if (app.get_option("--log-level")->count() > 0) eval.given.insert("--log-level");
      return run_eval(eval);
    }
    if (train_cmd->parsed() || (!train.config.empty() && app.get_subcommands().empty())) {
      if (train.config.empty()) qt::fail(qt::ErrorKind::Usage, "train: --config FILE is required");
      // --log-level given, before or after `train`: it wins over the config's logging.level.
      if (app.get_option("--log-level")->count() > 0 || train_cmd->get_option("--log-level")->count() > 0)
        train.log_level = log_level;
      return run_train(train);
    }
    if (quantize_cmd->parsed()) return run_quantize(quantize);
    if (config_cmd->parsed()) return run_config(config_args);
    if (data_cmd->parsed()) return run_data(data_args);
    if (plan_cmd->parsed()) return run_plan(plan_args);
    if (export_cmd->parsed()) return run_export(exp);
    if (gen_cmd->parsed()) return run_generate(gen);
    if (bench_cmd->parsed()) {
      if (app.get_option("--log-level")->count() > 0 || bench_cmd->get_option("--log-level")->count() > 0)
        bench.log_level = log_level;
      std::cout << (bench.generate > 0 ? qt::run_generate_bench(bench) : qt::run_bench(bench)).dump() << std::endl;
      return 0;
    }
    std::cerr << app.help() << std::endl;
    return qt::exit_code(qt::ErrorKind::Usage);
  } catch (const qt::Error& e) {
    print_error(qt::kind_name(e.kind()), e.what());
    return qt::exit_code(e.kind());
  } catch (const c10::OutOfMemoryError& e) {
    // Outside a training step (loading, checkpointing, eval, generate): still a device failure, not a bug.
    print_error(qt::kind_name(qt::ErrorKind::Device),
                std::string("out of device memory (") + e.what_without_backtrace() +
                    "); lower the batch or sequence length, or use a larger device");
    return qt::exit_code(qt::ErrorKind::Device);
  } catch (const c10::Error& e) {
    print_error("internal error (torch)", e.what_without_backtrace());
    return qt::exit_code(qt::ErrorKind::Internal);
  } catch (const std::exception& e) {
    print_error("internal error", e.what());
    return qt::exit_code(qt::ErrorKind::Internal);
  }
}
