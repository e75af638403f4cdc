#include "lib/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>
#include <cmath>
#include <limits>
#include <cstdio>
#include <optional>
#include <sstream>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/data/tokenizer.h"
#include "lib/comm/communicator.h"
#include "lib/comm/launch_env.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/model/hf_loader.h"
#include "lib/model/lora.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/random_init.h"
#include "lib/train/adamw.h"
#include "lib/train/checkpoint.h"
#include "lib/train/exact_match.h"
#include "lib/dist/fully_shard.h"
#include "lib/train/metrics.h"
#include "lib/kernels/streamed_linear_ce.h"
#include "lib/train/neftune.h"
#include "lib/train/step_profile.h"
#include "lib/train/train_data.h"

namespace qt {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

at::Device resolve_device(const std::string& name, const LaunchEnv& env) {
  if (name == "cpu") return at::kCPU;
  if (name == "cuda" || (name == "auto" && at::hasCUDA())) {
    if (!at::hasCUDA()) fail(ErrorKind::Device, "model.device is cuda but no CUDA device is available");
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  }
  return at::kCPU;
}

c10::ScalarType resolve_dtype(const std::string& name, const at::Device& device) {
  if (const auto named = user_dtype(name)) return *named;
  return device.is_cuda() ? at::kBFloat16 : at::kFloat;
}

double gib(int64_t bytes) { return static_cast<double>(bytes) / static_cast<double>(int64_t{1} << 30); }

std::string fixed2(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

// The caching allocator throws c10::OutOfMemoryError; a library that allocates on its own (cuBLAS workspaces,
// cuDNN, NCCL buffers) surfaces as a c10::Error from a CUDA status check instead.
bool is_out_of_memory(const c10::Error& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e)) return true;
  const std::string m = e.what_without_backtrace();
  return m.find("out of memory") != std::string::npos || m.find("ALLOC_FAILED") != std::string::npos;
}

// The message of an out-of-memory error in a training step (`phase`: "step 3", "evaluation after step 3"):
// where, how big, how much memory, what lowers it. One line: main prints it after "device: ".
std::string oom_message(const RunConfig& cfg, const at::Device& device, const std::string& phase, int64_t micro,
                        int64_t seq_len, const Decision& decision, const std::string& what) {
  std::string mem = "memory not tracked on " + device.str();
  if (device.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    mem = "in use " + fixed2(gib(stats.allocated_bytes[0].current)) + " GiB, reserved " +
          fixed2(gib(stats.reserved_bytes[0].current)) + " GiB, peak in use " +
          fixed2(gib(stats.allocated_bytes[0].peak)) + " GiB on " + device.str();
  }
  std::string first = what.substr(0, what.find('\n'));
  if (first.size() > 300) first = first.substr(0, 300) + "...";
  const double predicted = decision.footprint.total() / static_cast<double>(int64_t{1} << 30);
  return phase + ": out of GPU memory with micro-batches of " + std::to_string(micro) + " x " +
         std::to_string(seq_len) + " tokens (" + mem + "; the plan, " + describe(decision) + ", predicted " +
         fixed2(predicted) + " GiB). Lower train.micro_batch_size (now " + std::to_string(micro) +
         ") or data.max_seq_len (now " + std::to_string(seq_len) +
         "), or give train.memory.gpu_memory_gib a figure below " + fixed2(predicted) +
         " so that the plan chooses leaner settings (checkpointing, offload, the embeddings and lm_head on the "
         "host), or free the settings forced in train.memory. The last checkpoint in " + cfg.output_dir +
         " is kept (resume with --resume auto). [torch: " + first + "]";
}

double gpu_peak_gib(const at::Device& device, bool reserved = false) {
  if (!device.is_cuda()) return -1;
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  const auto& stat = reserved ? stats.reserved_bytes[0] : stats.allocated_bytes[0];
  return static_cast<double>(stat.peak) / static_cast<double>(int64_t{1} << 30);
}

void reset_gpu_peak(const at::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
}

// Sum of the cross-entropy over the batch's targets: the fused loss (never holds [tokens, vocab] logits) or the
// plain reference path.
at::Tensor loss_sum(const LlamaModel& model, const at::Tensor& hidden, const at::Tensor& targets, bool fused) {
  at::Tensor h = hidden.reshape({-1, hidden.size(-1)});
  // lm_head_weight() requires grad when lm_head is trained (modules_to_save): the fused loss then also gives dW.
  const at::Tensor w = model.lm_head_weight();
  // The fused loss takes the targets from the host (checked and counted there: no sync with the GPU).
  if (fused && model.lm_head_on_host()) return streamed_linear_cross_entropy(h, w, targets.reshape({-1}));
  if (fused) return fused_linear_cross_entropy(h, w, targets.reshape({-1})).loss_sum;
  at::Tensor t = targets.reshape({-1}).to(hidden.device());
  at::Tensor logits = at::linear(h, w).to(at::kFloat);
  return at::cross_entropy_loss(logits, t, /*weight=*/{}, at::Reduction::Sum, /*ignore_index=*/-100);
}

// Mean loss over the targets of `batches` without gradients (held-out evaluation).
// train.full_finetune resume: every trained tensor from the checkpoint's model directory (written in the training
// dtype), copied into the model in place so that the optimizer's parameter list stays valid.
void load_full_weights(LlamaModel& model, const std::string& dir, const LoadOptions& load) {
  LlamaModel saved = load_llama(dir, load);
  auto into = model.named_tensors();
  auto from = saved.named_tensors();
  QT_CHECK(into.size() == from.size(), ErrorKind::Checkpoint,
           dir + ": holds " + std::to_string(from.size()) + " tensors, the model " + std::to_string(into.size()));
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < into.size(); ++i) {
    QT_CHECK(into[i].first == from[i].first && into[i].second->sizes() == from[i].second->sizes(), ErrorKind::Checkpoint,
             dir + ": " + from[i].first + " does not match the model's " + into[i].first);
    into[i].second->copy_(*from[i].second);
  }
}

std::pair<double, int64_t> evaluate(LlamaModel& model, const std::vector<Batch>& batches, bool fused, Communicator& comm,
                                    FullyShard* fsdp) {
  at::NoGradGuard no_grad;
  model.set_training(false);
  GatherScope embeddings(fsdp, FullyShard::Root::Embeddings), head(fsdp, FullyShard::Root::LmHead);
  // Sharded blocks gather collectively: a rank with fewer held-out batches runs discarded forwards until every
  // rank has run as many as the busiest one.
  size_t forwards = batches.size();
  if (fsdp) {
    at::Tensor n = at::tensor({static_cast<double>(batches.size())}, at::kDouble)
                       .to(comm.device().is_cuda() ? at::kFloat : at::kDouble).to(comm.device());
    comm.all_reduce(n, ReduceOp::Max);
    forwards = static_cast<size_t>(std::llround(n.to(at::kCPU, at::kDouble).item<double>()));
  }
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < forwards; ++i) {
    if (i >= batches.size()) {
      model.forward_hidden(model.embed(at::zeros({1, 1}, at::TensorOptions().dtype(at::kLong).device(model.device()))));
      continue;
    }
    const Batch& b = batches[i];
    at::Tensor hidden = model.forward_hidden(model.embed(b.input_ids), b);
    sum += loss_sum(model, hidden, b.targets, fused).item<double>();
    count += b.num_targets;
  }
  at::Tensor totals = at::tensor({sum, static_cast<double>(count)}, at::kDouble).to(comm.device().is_cuda() ? at::kFloat : at::kDouble).to(comm.device());
  comm.all_reduce(totals);
  totals = totals.to(at::kCPU, at::kDouble);
  const double all_sum = totals[0].item<double>();
  const int64_t all_count = static_cast<int64_t>(std::llround(totals[1].item<double>()));
  return {all_count ? all_sum / static_cast<double>(all_count) : 0.0, all_count};
}

}  // namespace

PlanInputs plan_inputs(const RunConfig& cfg, const LlamaConfig& mc, int64_t micro, int64_t seq, const at::Device& device,
                       c10::ScalarType dtype, int world, int local_world) {
  PlanInputs in;
  in.model = mc;
  in.micro_batch = micro;
  in.seq = seq;
  in.cuda = device.is_cuda();
  in.nf4 = cfg.model.quant == "nf4";
  in.element_size = static_cast<int64_t>(c10::elementSize(dtype));
  in.sharded = cfg.train.shard == "blocks";
  in.world = world;
  in.file = cfg.file;
  // This rank's share of the host: the ranks on one host offload side by side.
  in.host_bytes = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGE_SIZE)) /
                  static_cast<uint64_t>(std::max(1, local_world));
  const int64_t H = mc.hidden_size, I = mc.intermediate_size, L = mc.num_hidden_layers, V = mc.vocab_size;
  if (cfg.train.full_finetune) {
    in.full_params = L * (H * mc.q_size() * 2 + 2 * H * mc.kv_size() + 3 * H * I) + V * H * (mc.tie_word_embeddings ? 1 : 2);
    in.embeddings_trained = in.lm_head_trained = true;
    return in;
  }
  const LoraConfig lora = LoraConfig::from_json(cfg.lora, cfg.file);
  const std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> shapes = {
      {"q_proj", {H, mc.q_size()}}, {"k_proj", {H, mc.kv_size()}}, {"v_proj", {H, mc.kv_size()}},
      {"o_proj", {mc.q_size(), H}}, {"gate_proj", {H, I}},         {"up_proj", {H, I}},
      {"down_proj", {I, H}}};
  for (const auto& [name, io] : shapes)
    if (lora.targets_module(name)) in.lora_params += L * lora.r * (io.first + io.second);
  for (const auto& m : lora.modules_to_save) {
    (m == "embed_tokens" ? in.embeddings_trained : in.lm_head_trained) = true;
    in.full_params += V * H;
  }
  if (mc.tie_word_embeddings && (in.embeddings_trained || in.lm_head_trained)) {
    in.embeddings_trained = in.lm_head_trained = true;
    in.full_params = V * H;
  }
  return in;
}

TrainSummary train(const RunConfig& cfg, const TrainOptions& options) {
  const auto t_start = Clock::now();
  log::set_level(log::parse_level(cfg.log_level));
  const LaunchEnv env = read_launch_env();
  log::set_rank(env.rank);
  const at::Device device = resolve_device(cfg.model.device, env);
  const c10::ScalarType dtype = resolve_dtype(cfg.model.dtype, device);
  std::unique_ptr<Communicator> comm = make_communicator(env, device);
  check_same_across_ranks(*comm, cfg.resolved.dump(), "run config");
  const bool rank0 = comm->rank() == 0;
  const int world = comm->world_size();
  if (cfg.train.batch_size % world != 0)
    fail_key(ErrorKind::Config, cfg.file, "train.batch_size",
             std::to_string(cfg.train.batch_size) + " is not divisible by the world size " + std::to_string(world));
  const int64_t per_rank = cfg.train.batch_size / world;
  const int64_t micro = cfg.train.micro_batch_size > 0 ? std::min(cfg.train.micro_batch_size, per_rank) : per_rank;
  if (!cfg.model.path.empty() && files::exists(files::join(cfg.model.path, kAdapterConfigFile)) &&
      !files::exists(files::join(cfg.model.path, "config.json")))
    fail_key(ErrorKind::Config, cfg.file, "model.path",
             cfg.model.path + " is a LoRA adapter (adapter_config.json); give its base as model.path (and the adapter "
             "as lora.init_from to train on from it)");
  if (rank0) files::make_dirs(cfg.output_dir);

  // Model: NF4 base (quantized as it streams in) with LoRA adapters in fp32.
  at::manual_seed(cfg.train.seed);
  LoadOptions load{device, dtype};
  load.quantize_nf4 = cfg.model.quant == "nf4";
  const bool random_init = cfg.model.init == "random";
  const LlamaConfig random_shape = !random_init ? LlamaConfig{}
                                   : cfg.model.shape.empty()
                                       ? LlamaConfig::from_file(files::join(cfg.model.path, "config.json"))
                                       : shape_config(cfg.model.shape, cfg.file, "model.shape");
  // A random model without tokenizer files has ids only (pre-tokenized data).
  const bool has_tokenizer = !cfg.model.path.empty() && (!random_init ||
                                                         files::exists(files::join(cfg.model.path, "tokenizer.json")) ||
                                                         files::exists(files::join(cfg.model.path, "tokenizer.model")));
  std::unique_ptr<Tokenizer> tokenizer =
      has_tokenizer ? load_tokenizer(cfg.model.path)
                    : ids_only_tokenizer(static_cast<int32_t>(random_shape.vocab_size),
                                         static_cast<int32_t>(random_shape.bos_token_id),
                                         static_cast<int32_t>(random_shape.eos_token_id));
  // Data: tokenized once (before the model loads, so that bad data fails fast), ordered deterministically per
  // epoch, cut into this rank's micro-batches per step.
  TrainData data(cfg.data, cfg.file, *tokenizer, micro);
  // The execution plan, before the model loads: a run that cannot fit its GPU memory budget is refused here, and the
  // allocator's settings apply before the model's allocations.
  const LlamaConfig model_config =
      random_init ? random_shape : LlamaConfig::from_file(files::join(cfg.model.path, "config.json"));
  const PlanInputs plan_in = plan_inputs(cfg, model_config, micro, data.max_seq_len(), device, dtype, world,
                                         env.local_world_size);
  const Decision decision = decide_plan(plan_in, cfg.train.memory, device_free_gib(device.is_cuda(), device.index()));
  if (device.is_cuda()) apply_allocator_settings(decision.plan);
  if (rank0) log::info("plan: " + describe(decision));
  load.embeddings_on_host = decision.plan.embeddings_on_host;
  load.lm_head_on_host = decision.plan.lm_head_on_host;
  LlamaModel model = random_init ? random_llama(random_shape, load, cfg.train.seed) : load_llama(cfg.model.path, load);
  // The adapter's base_model_name_or_path: from the root, so that PEFT's AutoPeftModelForCausalLM finds the base from
  // any directory.
  const std::string base_name = cfg.model.path.empty() ? "random:" + cfg.model.shape : files::absolute(cfg.model.path);
  model.plan = decision.plan;
  // The training shape first among the shapes cuDNN is admitted for, before an exact-match evaluation's
  // generation (a new length every token) could take the slots.
  if (device.is_cuda()) model.cudnn_admits(micro, data.max_seq_len());
  const bool full = cfg.train.full_finetune;
  const LoraConfig lora = LoraConfig::from_json(cfg.lora, cfg.file);
  std::vector<std::pair<std::string, at::Tensor>> params;
  if (full) {
    if (!lora.init_from.empty())
      fail_key(ErrorKind::Config, cfg.file, "lora.init_from", "is not supported with train.full_finetune");
    if (!lora.modules_to_save.empty())
      fail_key(ErrorKind::Config, cfg.file, "lora.modules_to_save",
               "is not used with train.full_finetune (every tensor is trained already)");
    for (auto& [name, t] : model.named_tensors()) {
      t->requires_grad_(true);
      params.emplace_back(name, *t);
    }
  } else {
    attach_lora(model, lora, cfg.train.seed, device, at::kFloat);
    attach_modules_to_save(model, lora, device);
    // lora.init_from: start from an adapter instead of the fresh init (a resume loads its checkpoint's instead).
    if (!lora.init_from.empty() && options.resume.empty()) {
      PeftAdapterConfig from = read_peft_adapter_config(lora.init_from);
      // Tied embeddings: lm_head, embed_tokens or both name the same one tensor (PEFT rewrites the list so).
      if (model.config.tie_word_embeddings && !lora.modules_to_save.empty() && !from.lora.modules_to_save.empty())
        from.lora.modules_to_save = lora.modules_to_save;
      const std::vector<std::string> differ = lora.differences_from(from.lora);
      if (!differ.empty()) {
        std::string msg = "lora.init_from " + lora.init_from + ": the adapter does not match the lora section:";
        for (const auto& d : differ) msg += " " + d + ";";
        fail_at(ErrorKind::Config, cfg.file, msg);
      }
      load_peft_adapter(model, lora.init_from);
      std::string named;
      if (rank0 && !random_init && adapter_names_other_base(lora.init_from, cfg.model.path, &named))
        log::warn("lora.init_from " + lora.init_from + " was trained on " + named + ", not on model.path " +
                  cfg.model.path + " (adapter_config.json's base_model_name_or_path)");
      // The adapter file's lora_dropout is the run that made it; this run's is the config's.
      model.for_each_linear([&](const std::string&, Linear& l) {
        if (l.lora) l.lora->dropout = lora.dropout;
      });
      if (rank0) log::info("LoRA adapters initialised from " + lora.init_from);
    }
  }
  // A resumed run loads its adapter before the blocks are sharded (the adapter file holds whole tensors).
  std::optional<CheckpointContents> resumed;
  std::string resume_dir;
  if (!options.resume.empty()) {
    resume_dir = options.resume;
    if (resume_dir == "auto") {
      auto latest = find_latest_checkpoint(cfg.output_dir);
      if (!latest) fail_at(ErrorKind::Checkpoint, cfg.output_dir, "--resume auto: no complete checkpoint to resume from");
      resume_dir = *latest;
    }
    resumed = load_checkpoint(resume_dir);
    // Compared with every default filled in on both sides, so that a key written out at its default is no change;
    // a checkpoint whose config this version no longer reads (keys of earlier versions) is compared as typed.
    std::optional<Json> saved_full;
    try {
      saved_full = RunConfig::from_json(resumed->state.config, resume_dir).to_json();
    } catch (const Error&) {
    }
    if (saved_full) check_resume_compatible(*saved_full, cfg.to_json(), resume_dir);
    else check_resume_compatible(resumed->state.config, cfg.resolved, resume_dir);
    if (full) load_full_weights(model, files::join(resume_dir, "model"), load);
    else load_peft_adapter(model, resume_dir);
  }
  // The plan's placement of the frozen embeddings and lm_head (decide_plan keeps trained or sharded ones here).
  model.to_host(model.plan.embeddings_on_host, model.plan.lm_head_on_host);
  // FullyShard: each rank keeps 1/N of every block's tensors; the optimizer steps the LoRA shards.
  std::unique_ptr<FullyShard> fsdp;
  if (cfg.train.shard == "blocks") {
    FullyShardOptions so;
    so.shard_embeddings = cfg.train.shard_embeddings;
    fsdp = std::make_unique<FullyShard>(model, *comm, so);
    params = fsdp->parameters();
  } else if (!full) {
    params = lora_parameters(model);
  }
  AdamW opt(params, {cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay});
  if (cfg.optim.embedding_lr >= 0) {
    int scaled = 0;
    for (const auto& [n, p] : params)
      if (n == peft_module_key("embed_tokens") || n == peft_module_key("lm_head")) {
        opt.set_lr_scale(n, cfg.optim.embedding_lr / cfg.optim.lr);
        ++scaled;
      }
    if (scaled == 0)
      fail_key(ErrorKind::Config, cfg.file, "optim.embedding_lr",
               "is the learning rate of the tensors lora.modules_to_save trains in full, and there are none: add "
               "lora.modules_to_save or drop the key");
  }
  int64_t trainable = 0;
  for (const auto& [n, p] : params) trainable += fsdp ? p.numel() / p.size(0) * fsdp->full_rows(n) : p.numel();

  const int64_t steps_per_epoch = data.steps_per_epoch(cfg.train.batch_size);
  const int64_t total_steps = cfg.train.steps > 0 ? cfg.train.steps : cfg.train.epochs * steps_per_epoch;
  const LrSchedule schedule{cfg.optim.schedule, cfg.optim.lr,
                            warmup_steps_of(cfg.optim.warmup_steps, cfg.optim.warmup_ratio, total_steps), total_steps,
                            cfg.optim.min_lr_ratio};
  const std::vector<Batch> eval_batches = data.eval_batches(comm->rank(), world);

  TrainerState state;
  state.seed = cfg.train.seed;
  state.config = cfg.to_json();  // every default filled in, as config.resolved.json
  state.train_file_hash = train_file_hash(data.config().train_file);
  state.total_steps = total_steps;
  if (resumed) {
    const std::string& dir = resume_dir;
    const CheckpointContents& ck = *resumed;
    check_resume_progress(ck.state, state, cfg.optim.schedule != LrScheduleType::Constant || cfg.optim.warmup_ratio > 0,
                          options.allow_resume_changes, dir, cfg.file);
    opt.load_state(optimizer_state_for(ck, params, fsdp.get(), dir), ck.state.step);
    restore_rng_states(ck.rng);
    state.step = ck.state.step;
    state.data = ck.state.data;
    state.tokens_seen = ck.state.tokens_seen;
    if (rank0) log::info("resumed from " + dir + " at step " + std::to_string(state.step));
  }
  data.seek(state.data);
  if (fsdp && rank0)
    log::info("FullyShard: each rank holds " + std::to_string(fsdp->sharded_bytes()) + " bytes of the sharded parameters (of " +
              std::to_string(fsdp->unsharded_bytes()) + " unsharded) over " + std::to_string(world) + " rank(s)");

  std::string saved_modules;
  for (const auto& m : lora.modules_to_save) saved_modules += (saved_modules.empty() ? " with " : " and ") + m;
  if (!saved_modules.empty())
    saved_modules += model.config.tie_word_embeddings ? " in full (fp32; tied: one tensor for both" : " in full (fp32";
  if (!saved_modules.empty() && cfg.optim.embedding_lr >= 0) {
    std::ostringstream lr_text;
    lr_text << cfg.optim.embedding_lr;
    saved_modules += ", lr " + lr_text.str();
  }
  if (!saved_modules.empty()) saved_modules += ")";
  const bool bar = cfg.progress == "bar" || (cfg.progress == "auto" && ::isatty(2));
  // Written with the metrics, once the data and the model have loaded (a run that fails before leaves nothing that
  // would make its output_dir another run's): the config as this run reads it, every default included (`qlora-train
  // config --print` prints the same), and the held-out records as they were in their file (`qlora-train eval --data
  // output_dir/eval.jsonl` recomputes the logged eval_loss).
  if (rank0) {
    write_json_file(files::join(cfg.output_dir, "config.resolved.json"), cfg.to_json());
    data.write_eval_records(files::join(cfg.output_dir, "eval.jsonl"));
  }
  MetricsLog metrics(files::join(cfg.output_dir, "metrics.jsonl"), bar, rank0, /*resume=*/state.step > 0);
  metrics.record(Json{{"plan", to_json(decision)}, {"step", state.step}});
  if (state.step > 0) metrics.load_history(files::join(cfg.output_dir, "metrics.jsonl"), state.step);
  metrics.set_plot(files::join(cfg.output_dir, "loss.html"), "qlora-train: " + cfg.output_dir);
  metrics.set_tensorboard(cfg.output_dir);
  if (rank0)
    log::info("training " + std::to_string(trainable) +
              (full ? " parameters (full fine-tuning)"
                    : (lora.use_dora ? " DoRA" : " LoRA") + std::string(" parameters (r=") + std::to_string(lora.r) +
                          ")" + saved_modules) +
              " on " +
              device.str() + " in " + std::string(c10::toString(dtype)) + ", " + std::to_string(world) + " rank(s), " +
              std::to_string(total_steps) + " steps of " + std::to_string(cfg.train.batch_size) + " x " +
              std::to_string(data.max_seq_len()) + " tokens (" + std::to_string(per_rank / micro) +
              " micro-batch(es) of " + std::to_string(micro) + " per rank)");

  if (rank0 && device.is_cuda()) {
    static const char* kBackends[] = {"math (unfused)", "FlashAttention-2", "memory-efficient", "cuDNN", "overrideable"};
    const int64_t b = model.dense_attention_backend(std::min<int64_t>(data.max_seq_len(), 8192), device, dtype);
    log::info(std::string("attention: ") + (b >= 0 && b < 5 ? kBackends[b] : "none") +
              " for rows of one whole document, FlashAttention-2 varlen for rows with several documents or padding");
  }
  if (rank0 && cfg.train.neftune_alpha > 0) {
    std::ostringstream a;
    a << cfg.train.neftune_alpha;
    log::info("NEFTune: uniform noise, alpha " + a.str() + ", on the input embeddings of training steps");
  }
  auto write_adapter = [&](const std::string& dir) {
    // Full fine-tuning checkpoints hold the weights in the training dtype, so that a resume continues exactly.
    if (full) save_merged_model(model, cfg.model.path, files::join(dir, "model"), model.dtype());
    else save_peft_adapter(model, lora, dir, base_name);
  };
  auto checkpoint = [&] {
    CheckpointContents c;
    c.state = state;
    c.optimizer = opt.state_tensors();
    c.rng = capture_rng_states();
    c.state.data = data.position();
    int64_t tmp_pid = -1;
    if (fsdp) {
      // Every rank writes its optimizer shard into rank 0's temporary directory; rank 0 writes the rest (the
      // adapter from the gathered LoRA weights) and completes the checkpoint.
      at::Tensor pid = at::tensor({static_cast<int64_t>(::getpid())}, at::kLong).to(device);
      comm->broadcast(pid, 0);
      tmp_pid = pid.to(at::kCPU).item<int64_t>();
      const std::string tmp = checkpoint_tmp_dir(cfg.output_dir, state.step, tmp_pid);
      if (rank0) begin_checkpoint_dir(tmp);
      comm->barrier();
      write_optimizer_shard(tmp, comm->rank(), world, c.optimizer);
      c.optimizer.clear();
      c.optimizer_shards = world;
      fsdp->gather_lora();
      comm->barrier();
    }
    if (rank0) {
      std::string path = save_checkpoint(cfg.output_dir, c, write_adapter, cfg.checkpoint.keep_last, tmp_pid);
      metrics.line("checkpoint saved: " + path);
    }
    if (fsdp) fsdp->release_lora();
    comm->barrier();
    // Test hook: time for a test to kill the process right after a complete checkpoint.
    if (const char* ms = std::getenv("QT_TEST_SLEEP_AFTER_CHECKPOINT_MS"))
      std::this_thread::sleep_for(std::chrono::milliseconds(std::atol(ms)));
  };

  const bool fused = cfg.train.loss == "fused";
  TrainSummary summary;
  auto evaluate_guarded = [&] {
    try {
      return evaluate(model, eval_batches, fused, *comm, fsdp.get());
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e)) throw;
      fail(ErrorKind::Device, oom_message(cfg, device, "evaluation after step " + std::to_string(state.step), micro,
                                          data.max_seq_len(), decision, e.what_without_backtrace()));
    }
  };
  auto task_metric = [&](const char* when) {
    GatherScope embeddings(fsdp.get(), FullyShard::Root::Embeddings), head(fsdp.get(), FullyShard::Root::LmHead);
    ExactMatchResult em = exact_match(model, *tokenizer, data.config(), cfg.eval.exact_match_file,
                                      cfg.eval.max_examples, cfg.eval.max_new_tokens);
    std::string line = std::string("exact-match accuracy ") + when + ": " + std::to_string(em.correct) + "/" +
                       std::to_string(em.total) + " (" + std::to_string(100.0 * em.accuracy()).substr(0, 5) + "%)";
    for (const auto& s : em.samples) line += "\n    e.g. " + s;
    metrics.line(line);
    metrics.exact_match(state.step, em.correct, em.total);
    return em.accuracy();
  };
  // Sharded blocks gather collectively: every rank generates (the same greedy tokens); rank 0 logs.
  const bool run_task_metric = rank0 || fsdp;
  if (!cfg.eval.exact_match_file.empty() && state.step == 0 && run_task_metric) summary.exact_match_before = task_metric("before training");
  double first_loss = NAN, last_loss = NAN;
  int64_t run_tokens = 0, run_inputs = 0;  // target and input tokens of the steps this process ran
  const int64_t profile_step = std::getenv("QT_PROFILE_STEP") ? std::atoll(std::getenv("QT_PROFILE_STEP")) : -1;
  const auto t_loop = Clock::now();
  const int64_t start_step = state.step;
  while (state.step < total_steps) {
    const auto t_step = Clock::now();
    reset_gpu_peak(device);
    // QT_PROFILE_STEP=N: a per-kernel profile of step N into output_dir (rank 0).
    std::unique_ptr<StepProfile> profile;
    if (rank0 && profile_step == state.step + 1) profile = std::make_unique<StepProfile>(device.is_cuda());
    model.set_training(true);
    std::vector<Batch> micro_batches = data.next_step(cfg.train.batch_size, comm->rank(), world);
    // Normalise by the targets of the whole global step, so that accumulation over micro-batches and ranks gives
    // the gradient of the mean over all of them (not a mean of per-micro-batch means).
    int64_t local_targets = 0, local_inputs = 0;
    for (const auto& b : micro_batches) local_targets += b.num_targets, local_inputs += b.num_tokens;
    double step_targets = static_cast<double>(local_targets);
    double step_inputs = static_cast<double>(local_inputs);  // for tokens/s alone
    if (world > 1) {  // (one rank: no round trip through the device, which would wait for the last step's kernels)
      at::Tensor count = at::tensor({step_targets, step_inputs}, at::kDouble);
      count = count.to(device.is_cuda() ? at::kFloat : at::kDouble).to(device);
      comm->all_reduce(count);
      count = count.to(at::kCPU, at::kDouble);
      step_targets = count[0].item<double>();
      step_inputs = count[1].item<double>();
    }
    if (step_targets <= 0) fail(ErrorKind::Data, "step " + std::to_string(state.step + 1) + ": the batch has no target tokens (all masked?)");
    // The loss stays on the device until the update is queued: the host reads it with the gradient norm in one
    // sync at the end of the step, so that it queues the clipping and the optimizer while the GPU still runs the
    // backward pass (a non-finite loss or norm makes the update leave the parameters as they were).
    at::Tensor local_loss;
    try {
      for (const auto& b : micro_batches) {
        at::Tensor embeds;
        {
          GatherScope g(fsdp.get(), FullyShard::Root::Embeddings);  // (no-op unless the embeddings are sharded)
          embeds = neftune_noise(model.embed(b.input_ids), cfg.train.neftune_alpha);
        }
        at::Tensor hidden = model.forward_hidden(embeds, b);
        at::Tensor l;
        {
          GatherScope g(fsdp.get(), FullyShard::Root::LmHead);
          l = loss_sum(model, hidden, b.targets, fused);
        }
        // Test hook: an out-of-memory error at this step, with the forward graph alive, thrown as CUDA's caching
        // allocator throws it (on any device); "N:cublas" throws it as cuBLAS's status check does.
        if (const char* at_step = std::getenv("QT_TEST_OOM_AT_STEP"); at_step && std::atol(at_step) == state.step + 1) {
          if (std::string(at_step).find(":cublas") != std::string::npos)
            TORCH_CHECK(false, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (QT_TEST_OOM_AT_STEP)");
          TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory (QT_TEST_OOM_AT_STEP)");
        }
        // Test hook: a loss that is not finite at this step (the gradients then are not either).
        if (const char* at_step = std::getenv("QT_TEST_NAN_LOSS_AT_STEP"); at_step && std::atol(at_step) == state.step + 1)
          l = l * std::numeric_limits<double>::quiet_NaN();
        (l / step_targets).backward();
        local_loss = local_loss.defined() ? local_loss + l.detach() : l.detach();
      }
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e)) throw;
      fail(ErrorKind::Device, oom_message(cfg, device, "step " + std::to_string(state.step + 1), micro, data.max_seq_len(), decision, e.what_without_backtrace()));
    }
    // Data parallel: sum the LoRA gradients (already divided by the global count) and the loss over ranks.
    if (world > 1 && !fsdp) {  // (FullyShard has reduce-scattered them already, block by block)
      for (auto& [n, p] : params)
        if (p.grad().defined()) comm->all_reduce(p.mutable_grad());
    }
    if (fsdp) fsdp->reduce_replicated_grads();  // modules_to_save: whole on every rank
    const auto wire = device.is_cuda() ? at::kFloat : at::kDouble;
    at::Tensor loss_t = local_loss.defined() ? local_loss.reshape({1}).to(wire) : at::zeros({1}, at::TensorOptions().dtype(wire).device(device));
    comm->all_reduce(loss_t);
    // Unsharded, the norm stays on the GPU until the update is queued too.
    const at::Tensor norm_t = fsdp ? at::Tensor() : clip_grad_norm_async(params, cfg.optim.max_grad_norm);
    double grad_norm = fsdp ? fsdp->clip_grad_norm(cfg.optim.max_grad_norm) : 0.0;  // (sharded: read at once)
    const auto non_finite_norm = [&] {
      fail(ErrorKind::Numeric, "step " + std::to_string(state.step + 1) + ": the gradient norm is not finite; the last "
                               "checkpoint in " + cfg.output_dir + " is intact");
    };
    if (fsdp && !std::isfinite(grad_norm)) non_finite_norm();
    at::Tensor found_inf = at::logical_not(at::isfinite(loss_t)).reshape({});
    if (norm_t.defined()) found_inf = found_inf.logical_or(at::logical_not(at::isfinite(norm_t)).reshape({}));
    const double lr = schedule.at(state.step);
    try {
      opt.step(lr, found_inf);
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e)) throw;
      fail(ErrorKind::Device, oom_message(cfg, device, "step " + std::to_string(state.step + 1), micro, data.max_seq_len(), decision, e.what_without_backtrace()));
    }
    // The step's one sync: the loss and the norm together.
    const at::Tensor read = (norm_t.defined() ? at::cat({loss_t.to(at::kDouble), norm_t.reshape({1}).to(at::kDouble)})
                                              : loss_t.to(at::kDouble)).to(at::kCPU);
    const double loss = read[0].item<double>() / step_targets;
    if (norm_t.defined()) grad_norm = read[1].item<double>();
    if (!std::isfinite(loss))
      fail(ErrorKind::Numeric, "step " + std::to_string(state.step + 1) + ": the loss is not finite (" + std::to_string(loss) +
                                   "); the last checkpoint in " + cfg.output_dir + " is intact (lower optim.lr?)");
    if (!std::isfinite(grad_norm)) non_finite_norm();
    opt.zero_grad();
    ++state.step;
    if (profile) {
      if (device.is_cuda()) c10::cuda::device_synchronize();
      metrics.line(profile->finish(cfg.output_dir));
      profile.reset();
    }
    const int64_t tokens = static_cast<int64_t>(step_targets);
    const int64_t inputs = static_cast<int64_t>(step_inputs);
    state.tokens_seen += tokens;
    run_tokens += tokens;
    run_inputs += inputs;
    if (std::isnan(first_loss)) first_loss = loss;
    last_loss = loss;

    if (state.step % cfg.train.log_every == 0 || state.step == total_steps) {
      StepMetrics m;
      m.step = state.step;
      m.total_steps = total_steps;
      m.loss = loss;
      m.lr = lr;
      m.grad_norm = grad_norm;
      m.step_s = seconds_since(t_step);
      m.tokens = inputs;
      m.tokens_per_s = inputs / std::max(1e-9, m.step_s);
      m.target_tokens = tokens;
      m.target_tokens_per_s = tokens / std::max(1e-9, m.step_s);
      m.gpu_mem_gib = gpu_peak_gib(device);
      m.gpu_reserved_gib = gpu_peak_gib(device, /*reserved=*/true);
      const double per_step = seconds_since(t_loop) / static_cast<double>(state.step - start_step);
      m.eta_s = per_step * static_cast<double>(total_steps - state.step);
      metrics.step(m);
    }
    if (!eval_batches.empty() && cfg.train.eval_every > 0 && state.step % cfg.train.eval_every == 0) {
      auto [el, et] = evaluate_guarded();
      metrics.eval(state.step, el, et);
    }
    // Test hook: slow steps, so that a test can signal the process between two of them.
    if (const char* ms = std::getenv("QT_TEST_STEP_DELAY_MS"))
      std::this_thread::sleep_for(std::chrono::milliseconds(std::atol(ms)));
    bool stop = options.stop_requested && options.stop_requested->load();
    if (world > 1) {
      // A signal reaches the ranks at different moments (or only one of them): all stop after the same step, or
      // the checkpoint's collectives would pair with another rank's next step.
      at::Tensor any = at::tensor({stop ? 1.0 : 0.0}, at::kDouble).to(device.is_cuda() ? at::kFloat : at::kDouble).to(device);
      comm->all_reduce(any, ReduceOp::Max);
      stop = any.to(at::kCPU, at::kDouble).item<double>() > 0;
    }
    if ((cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0) || stop) checkpoint();
    if (stop) {
      metrics.line("stopped by a signal after step " + std::to_string(state.step) + "; resume with --resume auto");
      metrics.write_plot();
      summary.steps = state.step;
      return summary;
    }
  }
  if (!eval_batches.empty()) {
    if (metrics.eval_losses().empty() || metrics.eval_losses().back().first != state.step) {
      auto [el, et] = evaluate_guarded();
      metrics.eval(state.step, el, et);
    }
    summary.eval_loss = metrics.eval_losses().back().second;
  }
  if (cfg.checkpoint.every == 0 || state.step % cfg.checkpoint.every != 0) checkpoint();
  if (!cfg.eval.exact_match_file.empty() && run_task_metric) summary.exact_match_after = task_metric("after training");
  summary.adapter_dir = files::join(cfg.output_dir, full ? "model" : "adapter");
  if (fsdp) fsdp->gather_lora();
  if (rank0) {
    files::remove_tree(summary.adapter_dir);
    if (full) {
      save_merged_model(model, cfg.model.path, summary.adapter_dir, model.config.dtype);
    } else {
      files::make_dirs(summary.adapter_dir);
      write_adapter(summary.adapter_dir);
    }
    metrics.write_plot();
  }
  if (fsdp) fsdp->release_lora();
  summary.steps = state.step;
  summary.first_loss = first_loss;
  summary.last_loss = last_loss;
  summary.seconds = seconds_since(t_start);
  summary.tokens_per_s = run_inputs / std::max(1e-9, seconds_since(t_loop));
  summary.target_tokens_per_s = run_tokens / std::max(1e-9, seconds_since(t_loop));
  return summary;
}

}  // namespace qt
