#include "lib/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/train/lr_schedule.h"
#include "lib/train/neftune.h"
#include "lib/train/output_dir.h"
#include "lib/train/step_profile.h"
#include "lib/train/train_stages.h"

namespace qt {
namespace {

// What one optimizer step did, read back from the device in the step's one sync.
struct StepOutcome {
  double loss = 0, grad_norm = 0, lr = 0;
  // preference objectives: their statistics over the step's pairs (PreferenceObjective::statistics)
  std::vector<std::pair<std::string, double>> dpo;
  int64_t targets = 0, inputs = 0;  // tokens in the loss and input tokens of the global step
  bool overflow = false;            // fp16: the scaled gradients overflowed, the update was not applied
};

// What a non-finite loss or gradient norm at `step` (0-based) leaves and what to look at: before any update of this
// run's first step the learning rate is not the cause, the model, the adapter it starts from or the data are.
std::string nonfinite_advice(const RunConfig& cfg, int64_t step) {
  const std::optional<std::string> last = find_latest_checkpoint(cfg.output_dir);
  const std::string kept = last ? "the last checkpoint (" + *last + ") is intact"
                                : "no checkpoint was written in " + cfg.output_dir;
  // An adapter scaled far past PEFT's usual 0.5 - 4 (lora.alpha 1e30, say) overflows before anything else does.
  if (const double scale = cfg.parsed_lora.scale(); scale > 1e3) {
    std::ostringstream os;
    os << "; the adapter's scale lora.alpha / lora.r" << (cfg.parsed_lora.use_rslora ? " (rsLoRA: / sqrt(r))" : "")
       << " is " << scale << " (lora.alpha " << cfg.parsed_lora.alpha << "): lower lora.alpha";
    return kept + os.str();
  }
  if (step == 0)
    return kept + "; at the first step, before any update: the base model's weights (config.json, safetensors), " +
           "the adapter it starts from (lora.init_from) or the data give a non-finite value, not the learning rate";
  return kept + " (lower optim.lr?)";
}

// A step queued on the device and not yet read back: its loss and gradient norm on their way to the host.
struct QueuedStep {
  int64_t step = 0;             // the steps done before it
  double lr = 0, targets = 0, inputs = 0;
  double pairs = 0;             // DPO: the pairs of the global step (the loss is their mean)
  at::Tensor read;              // [loss sum, (pairs: the rest of DpoTerms::sums,) gradient norm] in fp64: pinned host
                                // memory the device copies into
                                // without blocking (CUDA), or the values themselves (CPU)
  std::shared_ptr<at::cuda::CUDAEvent> copied;  // recorded on the compute stream after that copy (CUDA)
  Clock::time_point queued_at;  // when the host began to queue it
  Clock::time_point queued_by;  // when queue_step returned: on the CPU the step's work is done by then
};

// CUDA's sync debug mode (1: warn, 2: error) for a scope, then off again.
struct SyncDebug {
  explicit SyncDebug(int level) : on(level > 0) {
    if (on)
      c10::cuda::warning_state().set_sync_debug_mode(level > 1 ? c10::cuda::SyncDebugMode::L_ERROR
                                                               : c10::cuda::SyncDebugMode::L_WARN);
  }
  void end() {
    if (on) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
    on = false;
  }
  ~SyncDebug() { end(); }
  SyncDebug(const SyncDebug&) = delete;
  SyncDebug& operator=(const SyncDebug&) = delete;
  bool on;
};

// One optimizer step (`step`: the steps done before it) queued: this rank's micro-batches forward and backward, the
// gradients reduced over the ranks and clipped, AdamW, then the loss and norm copied to the host together, without
// waiting for them (finish_step reads them). `oom`: the test hook's out-of-memory error in this step
// (QT_TEST_OOM_AT_STEP, QT_TEST_OOM_PLANS).
QueuedStep queue_step(const RunConfig& cfg, Session& s, ModelStage& m, DataStage& d, Parallel& parallel, AdamW& opt,
                      const LrSchedule& schedule, int64_t step, const TestHooks& hooks, bool oom, LossScaler* scaler) {
  QueuedStep q;
  q.step = step;
  q.queued_at = Clock::now();
  LlamaModel& model = *m.model;
  Communicator& comm = *s.comm;
  model.set_training(true);
  // (RECORD_USER_SCOPE: the host's phases named in QT_PROFILE_STEP's trace, where scripts/trace_summary.py lists
  // what the host ran while the GPU waited)
  std::vector<Batch> micro_batches;
  {
    RECORD_USER_SCOPE("qt::next_batch");
    micro_batches = d.data->next_step(cfg.train.batch_size, comm.rank(), s.world);
  }
  // Normalise by the targets of the whole global step, so that accumulation over micro-batches and ranks gives the
  // gradient of the mean over all of them (not a mean of per-micro-batch means).
  // Preference pairs (DPO, CPO, ORPO) normalise by the pairs of the step instead: their loss is the pairs' mean.
  const PreferenceObjective pref = cfg.preference();
  const bool on_pairs = static_cast<bool>(pref);
  int64_t local_targets = 0, local_inputs = 0, local_pairs = 0;
  for (const auto& b : micro_batches)
    local_targets += b.num_targets, local_inputs += b.num_tokens, local_pairs += b.num_pairs;
  double step_targets = static_cast<double>(local_targets);
  double step_inputs = static_cast<double>(local_inputs);  // for tokens/s alone
  double step_pairs = static_cast<double>(local_pairs);
  if (s.world > 1) {  // (one rank: no round trip through the device, which would wait for the last step's kernels)
    at::Tensor count = at::tensor({step_targets, step_inputs, step_pairs}, at::kDouble);
    count = count.to(s.device.is_cuda() ? at::kFloat : at::kDouble).to(s.device);
    comm.all_reduce(count);
    count = count.to(at::kCPU, at::kDouble);
    step_targets = count[0].item<double>();
    step_inputs = count[1].item<double>();
    step_pairs = count[2].item<double>();
  }
  if (step_targets <= 0) fail(ErrorKind::Data, "step " + std::to_string(step + 1) + ": the batch has no target tokens (all masked?)");
  if (on_pairs && step_pairs <= 0)
    fail(ErrorKind::Data, "step " + std::to_string(step + 1) + ": train.objective \"" + cfg.train.objective +
                              "\" and the batch holds no pair");
  const double step_norm = on_pairs ? step_pairs : step_targets;
  const auto out_of_memory = [&](const c10::Error& e) {
    // The kernels and copies already queued finish before the step's tensors and the model's buffers (pinned host
    // blocks among them) go: the run may start again in this process (train.memory.replan_on_oom).
    if (s.device.is_cuda()) c10::cuda::device_synchronize();
    if (!hooks.memory_history.empty() && s.rank0) {
      try {  // (never in the way of the out-of-memory error and its replan)
        write_memory_history(s.device, hooks.memory_history + ".oom");
      } catch (const std::exception& w) {
        log::warn(std::string("QT_MEMORY_HISTORY: ") + w.what());
      }
    }
    throw OutOfMemory(oom_message(cfg, s.device, "step " + std::to_string(step + 1), s.micro, d.data->max_seq_len(),
                                  m.decision, e.what_without_backtrace()));
  };
  // The loss stays on the device until the update is queued: the host reads it with the gradient norm in one sync at
  // the end of the step, so that it queues the clipping and the optimizer while the GPU still runs the backward pass
  // (a non-finite loss or norm makes the update leave the parameters as they were).
  at::Tensor local_loss;
  const bool fused = cfg.train.loss == "fused";
  // Outside the try block: an out-of-memory error's handler synchronizes while the micro-batch's graph (its pinned
  // offload blocks among it) is still alive.
  at::Tensor embeds, hidden, l;
  try {
    for (const auto& b : micro_batches) {
      // DPO: the reference pass first (ReferenceAdapters, no gradient), then the policy's below (CPO, ORPO: that
      // alone). KTO's passes each take one half of the rows (split_pairs; the packer keeps each within half a row, as
      // the plan counts): the reference's and the policy's over the KL sequences without gradient first (as TRL's),
      // then the records with it. (apo_zero_unpaired's second sequences, one token each, go through no pass.)
      at::Tensor sequences, reference, kl_policy;
      std::optional<PairHalves> halves;
      if (pref.kto) {
        RECORD_USER_SCOPE("qt::reference");
        halves = split_pairs(b);
        sequences = halves->first_sequences;
        const KtoLogps l = kto_logps_without_gradient(model, *m.reference, *halves, pref.kto->kl(), /*records=*/false,
                                                      fused, /*training=*/true);
        reference = l.reference;
        kl_policy = l.policy;
      } else if (on_pairs) {
        sequences = pair_sequences(b);
      }
      if (pref.dpo) {
        RECORD_USER_SCOPE("qt::reference");
        reference = reference_logps(model, *m.reference, b, sequences, fused, /*training=*/true);
      }
      const Batch& pass = halves ? halves->first : b;
      {
        GatherScope g(parallel.sharded(), FullyShard::Root::Embeddings);  // (no-op unless the embeddings are sharded)
        embeds = neftune_noise(model.embed(pass.input_ids), cfg.train.neftune_alpha);
      }
      {
        RECORD_USER_SCOPE("qt::forward");
        hidden = model.forward_hidden(embeds, pass);
      }
      // The embedding output is the first block's input: kept by its checkpoint where that keeps it, else (offloaded)
      // not needed past the forward pass: 1 H a token.
      embeds = at::Tensor();
      at::Tensor sums;  // pairs: the loss and statistics summed over the micro-batch's pairs
      {
        GatherScope g(parallel.sharded(), FullyShard::Root::LmHead);
        if (on_pairs) {
          DpoTerms terms = dpo_policy_terms(model, hidden, pass, sequences, reference, pref, fused, &comm, kl_policy);
          l = terms.loss_sum;
          sums = terms.sums;
        } else {
          l = loss_sum(model, hidden, b.targets, fused);
        }
      }
      // The final norm's output is not needed past the loss's forward pass (the fused loss keeps dh; a trained
      // lm_head's node keeps its own reference): 1 H a token freed for the backward pass.
      hidden = at::Tensor();
      // Test hooks: an out-of-memory error at this step, with the forward graph alive, thrown as CUDA's caching
      // allocator throws it (on any device) or as cuBLAS's status check does; a loss that is not finite.
      if (oom) {
        if (hooks.oom_as_pinned)
          TORCH_CHECK_WITH(OutOfMemoryError, false,
                           "pinned host memory: cannot allocate 1 MiB for an offloaded block input (QT_TEST_OOM_AT_STEP)");
        if (hooks.oom_as_cublas)
          TORCH_CHECK(false, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (QT_TEST_OOM_AT_STEP)");
        TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory (QT_TEST_OOM_AT_STEP)");
      }
      if (hooks.nan_loss_at_step == step + 1) l = l * std::numeric_limits<double>::quiet_NaN();
      {
        RECORD_USER_SCOPE("qt::backward");
        (l * ((scaler ? scaler->scale : 1.0) / step_norm)).backward();
      }
      if (on_pairs && hooks.nan_loss_at_step == step + 1) sums = sums * std::numeric_limits<double>::quiet_NaN();
      const at::Tensor done = on_pairs ? sums : l.detach();
      local_loss = local_loss.defined() ? local_loss + done : done;
    }
  } catch (const c10::Error& e) {
    if (!is_out_of_memory(e)) throw;
    out_of_memory(e);
  }
  parallel.reduce_gradients();
  if (scaler) {  // the gradients back to their true size before clipping (an overflow stays non-finite)
    std::vector<at::Tensor> grads;
    for (const auto& [n, p] : parallel.parameters())
      if (p.grad().defined()) grads.push_back(p.mutable_grad());
    if (!grads.empty()) at::_foreach_mul_(grads, 1.0 / scaler->scale);
  }
  const auto wire = s.device.is_cuda() ? at::kFloat : at::kDouble;
  const int64_t values_n = on_pairs ? pref.sums_size() : 1;
  at::Tensor loss_t = local_loss.defined() ? local_loss.reshape({values_n}).to(wire)
                                           : at::zeros({values_n}, at::TensorOptions().dtype(wire).device(s.device));
  comm.all_reduce(loss_t);
  const at::Tensor norm_t = parallel.clip_grad_norm(cfg.optim.max_grad_norm, s.device);
  const at::Tensor found_inf =
      at::logical_not(at::isfinite(loss_t.narrow(0, 0, 1))).reshape({}).logical_or(
          at::logical_not(at::isfinite(norm_t)).reshape({}));
  q.lr = schedule.at(step);
  try {
    RECORD_USER_SCOPE("qt::optimizer");
    opt.step(q.lr, found_inf);
  } catch (const c10::Error& e) {
    if (!is_out_of_memory(e)) throw;
    out_of_memory(e);
  }
  // (the gradients go now: the next step's backward pass, which may be queued before this step is read, makes new ones)
  opt.zero_grad();
  q.targets = step_targets;
  q.inputs = step_inputs;
  q.pairs = on_pairs ? step_pairs : 0;
  const at::Tensor values = at::cat({loss_t.to(at::kDouble), norm_t.reshape({1}).to(at::kDouble)});
  if (s.device.is_cuda()) {
    q.read = at::empty({values_n + 1}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
    q.read.copy_(values, /*non_blocking=*/true);
    q.copied = std::make_shared<at::cuda::CUDAEvent>();
    q.copied->record(c10::cuda::getCurrentCUDAStream(s.device.index()));
  } else {
    q.read = values.to(at::kCPU);
  }
  return q;
}

// A queued step's outcome: waits for its loss and norm (the step's one sync), fails on a loss or norm that is not
// finite (fp16: an overflow skips the update and halves the loss scale instead).
StepOutcome finish_step(const RunConfig& cfg, QueuedStep& q, AdamW& opt, LossScaler* scaler) {
  {
    RECORD_USER_SCOPE("qt::read_loss_and_norm");
    if (q.copied) q.copied->synchronize();
  }
  const int64_t step = q.step;
  StepOutcome r;
  r.lr = q.lr;
  const int64_t n = q.read.numel();
  r.loss = q.read[0].item<double>() / (q.pairs > 0 ? q.pairs : q.targets);
  if (q.pairs > 0) {
    std::vector<double> sums;
    for (int64_t i = 0; i + 1 < n; ++i) sums.push_back(q.read[i].item<double>());
    r.dpo = cfg.preference().statistics(sums, q.pairs);
  }
  r.grad_norm = q.read[n - 1].item<double>();
  if (!std::isfinite(r.loss))
    fail(ErrorKind::Numeric, "step " + std::to_string(step + 1) + ": the loss is not finite (" + std::to_string(r.loss) +
                                 "); " + nonfinite_advice(cfg, step));
  r.overflow = scaler && !std::isfinite(r.grad_norm);
  if (r.overflow) opt.step_skipped();
  if (scaler) scaler->update(r.overflow);
  if (!std::isfinite(r.grad_norm) && !r.overflow)
    fail(ErrorKind::Numeric, "step " + std::to_string(step + 1) + ": the gradient norm is not finite; " +
                                 nonfinite_advice(cfg, step));
  r.targets = static_cast<int64_t>(q.targets);
  r.inputs = static_cast<int64_t>(q.inputs);
  return r;
}

// All ranks stop after the same step: a signal reaches them at different moments (or only one of them), and the
// checkpoint's collectives would otherwise pair with another rank's next step.
bool stop_requested(const TrainOptions& options, Session& s) {
  bool stop = options.stop_requested && options.stop_requested->load();
  if (s.world == 1) return stop;
  at::Tensor any = at::tensor({stop ? 1.0 : 0.0}, at::kDouble).to(s.device.is_cuda() ? at::kFloat : at::kDouble).to(s.device);
  s.comm->all_reduce(any, ReduceOp::Max);
  return any.to(at::kCPU, at::kDouble).item<double>() > 0;
}

std::string trained_text(const RunConfig& cfg, const ModelStage& m) {
  if (m.full) return " parameters (full fine-tuning)";
  std::string saved;
  for (const auto& mod : m.lora.modules_to_save) saved += (saved.empty() ? " with " : " and ") + mod;
  if (!saved.empty()) {
    saved += m.model->config.tie_word_embeddings ? " in full (fp32; tied: one tensor for both" : " in full (fp32";
    if (cfg.optim.embedding_lr >= 0) {
      std::ostringstream lr_text;
      lr_text << cfg.optim.embedding_lr;
      saved += ", lr " + lr_text.str();
    }
    saved += ")";
  }
  std::string plus;
  if (cfg.optim.loraplus_lr_ratio > 0) {
    std::ostringstream r;
    r << cfg.optim.loraplus_lr_ratio;
    plus = std::string(", LoRA+: B") + (m.lora.use_dora ? " and magnitudes" : "") + " at lr x " + r.str();
  }
  return (m.lora.use_dora ? " DoRA" : " LoRA") + std::string(" parameters (r=") + std::to_string(m.lora.r) + plus + ")" +
         saved;
}

// What train_under() got to before it ran out of memory: the plan it ran under, the steps it completed.
struct Attempt {
  int index = 0;  // 0: the first plan
  std::optional<Decision> decision;
  int64_t steps_done = 0;
  Json earlier = Json::array();  // the plans that ran out of memory before this one, for metrics.jsonl
};

// The run under a plan (train()'s stages after the session, the data and the plan): the model, the resume point,
// the parallel strategy, the optimizer, the steps.
TrainSummary train_under(const RunConfig& cfg, const TrainOptions& options, const TestHooks& hooks, Session& s,
                         DataStage& d, const MicroDecision& planned, Clock::time_point t_start, Attempt& attempt) {
  attempt.decision = planned.decision;
  s.micro = planned.micro_batch;
  d.data->set_micro_batch(s.micro);
  ModelStage m = build_model(cfg, s, d, /*resuming=*/!options.resume.empty(), *attempt.decision);
  if (hooks.oom_plans_at_load && attempt.index < hooks.oom_plans)  // test hook: as the caching allocator throws it
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory (QT_TEST_OOM_PLANS, loading)");
  std::optional<ResumePoint> resume = load_resume_point(cfg, options, m);
  std::unique_ptr<Parallel> parallel = make_parallel(cfg, m, *s.comm);
  std::unique_ptr<AdamW> opt = make_optimizer(cfg, parallel->parameters(), m.decision.plan.optimizer_on_host);
  LlamaModel& model = *m.model;
  TrainData& data = *d.data;
  int64_t trainable = 0;
  for (const auto& [n, p] : parallel->parameters()) trainable += p.numel() / std::max<int64_t>(1, p.size(0)) * parallel->full_rows(n, p);

  const int64_t steps_per_epoch = data.steps_per_epoch(cfg.train.batch_size);
  // (The product wrapped: train.epochs 2^62 ran no step and saved an untrained adapter with exit 0.)
  if (cfg.train.steps == 0 &&
      cfg.train.epochs > std::numeric_limits<int64_t>::max() / std::max<int64_t>(1, steps_per_epoch))
    fail_key(ErrorKind::Config, cfg.file, "train.epochs",
             std::to_string(cfg.train.epochs) + " epochs of " + std::to_string(steps_per_epoch) +
                 " steps are more steps than a 64-bit count holds");
  const int64_t total_steps = cfg.train.steps > 0 ? cfg.train.steps : cfg.train.epochs * steps_per_epoch;
  const LrSchedule schedule = lr_schedule_of(cfg, total_steps);
  TrainerState state;
  state.seed = cfg.train.seed;
  state.config = cfg.to_json();  // every default filled in, as config.resolved.json
  state.train_file_hash = d.train_file_hash;
  state.reference_hash = m.reference_hash;
  state.train_records = static_cast<int64_t>(data.train_set().size());
  state.records_left_out = data.untrained_left_out();
  state.total_steps = total_steps;
  if (resume) {
    const CheckpointContents& ck = resume->contents;
    check_resume_progress(ck.state, state, cfg.optim.schedule != LrScheduleType::Constant || cfg.optim.warmup_ratio > 0,
                          options.allow_resume_changes, resume->dir, cfg.file);
    opt->load_state(optimizer_state_for(ck, parallel->parameters(), *parallel, resume->dir),
                    ck.state.optimizer_steps >= 0 ? ck.state.optimizer_steps : ck.state.step);
    restore_rng_states(ck.rng);
    state.step = ck.state.step;
    state.data = ck.state.data;
    state.tokens_seen = ck.state.tokens_seen;
    state.loss_scale = ck.state.loss_scale;
    state.loss_scale_good_steps = ck.state.loss_scale_good_steps;
    if (s.rank0) log::info("resumed from " + resume->dir + " at step " + std::to_string(state.step));
    if (s.rank0 && files::real_path(files::parent(resume->dir)) != files::real_path(cfg.output_dir))
      log::warn("resumed from a checkpoint outside output_dir (" + resume->dir + "): " + cfg.output_dir +
                "'s checkpoints after step " + std::to_string(state.step) + " are moved aside and its metrics.jsonl " +
                "goes on from that step");
    if (s.rank0)
      for (const std::string& moved : set_aside_checkpoints_after(cfg.output_dir, state.step))
        log::warn("resumed at step " + std::to_string(state.step) + " before a later checkpoint of the run it departs " +
                  "from: moved aside to " + moved + " (--resume auto passes over it)");
  }
  data.seek(state.data);
  if (parallel->sharded() && s.rank0) log::info(parallel->describe());

  const bool bar = cfg.progress == "bar" || (cfg.progress == "auto" && ::isatty(2));
  // Written with the metrics, once the data and the model have loaded (a run that fails before leaves nothing that
  // would make its output_dir another run's): the config as this run reads it, every default included (`qlora-train
  // config --print` prints the same), and the held-out records as they were in their file (`qlora-train eval --data
  // output_dir/eval.jsonl` recomputes the logged eval_loss).
  if (s.rank0) {
    replace_earlier_run(cfg.output_dir, options.replace);
    write_json_file(files::join(cfg.output_dir, "config.resolved.json"), cfg.to_json());
    data.write_eval_records(files::join(cfg.output_dir, "eval.jsonl"));
  }
  MetricsLog metrics(files::join(cfg.output_dir, "metrics.jsonl"), bar, s.rank0, /*resume_step=*/state.step);
  Json plan_record = {{"plan", to_json(m.decision)}, {"step", state.step}, {"micro_batch", s.micro}};
  if (!attempt.earlier.empty()) plan_record["out_of_memory_under"] = attempt.earlier;
  metrics.record(plan_record);
  if (state.step > 0) metrics.load_history(files::join(cfg.output_dir, "metrics.jsonl"), state.step);
  metrics.set_plot(files::join(cfg.output_dir, "loss.html"), "qlora-train: " + cfg.output_dir);
  metrics.set_tensorboard(cfg.output_dir, state.step);
  if (s.rank0)
    log::info("training " + std::to_string(trainable) + trained_text(cfg, m) + " on " + s.device.str() + " in " +
              std::string(c10::toString(s.dtype)) + ", " + std::to_string(s.world) + " rank(s), " +
              std::to_string(total_steps) + " steps of " + std::to_string(cfg.train.batch_size) + " x " +
              std::to_string(data.max_seq_len()) + " tokens (" + std::to_string(s.per_rank / s.micro) +
              " micro-batch(es) of " + std::to_string(s.micro) + " per rank)" +
              (opt->eight_bit_tensors() > 0 ? ", AdamW with 8-bit moments for " +
                                                  std::to_string(opt->eight_bit_tensors()) + " of " +
                                                  std::to_string(opt->params().size()) + " tensors"
                                            : std::string()));
  if (s.rank0 && s.device.is_cuda()) {
    static const char* kBackends[] = {"math (unfused)", "FlashAttention-2", "memory-efficient", "cuDNN", "overrideable"};
    const int64_t b = model.dense_attention_backend(std::min<int64_t>(data.max_seq_len(), 8192), s.device, s.dtype);
    log::info(std::string("attention: ") + (b >= 0 && b < 5 ? kBackends[b] : "none") +
              " for rows of one whole document, FlashAttention-2 varlen for rows with several documents or padding");
  }
  if (s.rank0 && cfg.train.neftune_alpha > 0) {
    std::ostringstream a;
    a << cfg.train.neftune_alpha;
    log::info("NEFTune: uniform noise, alpha " + a.str() + ", on the input embeddings of training steps");
  }
  // fp16 compute: dynamic loss scaling (continued from the checkpoint when resuming).
  std::optional<LossScaler> scaler;
  if (s.dtype == at::kHalf) {
    scaler.emplace();
    if (hooks.loss_scale > 0) scaler->scale = hooks.loss_scale;
    if (state.loss_scale > 0) {
      scaler->scale = state.loss_scale;
      scaler->good_steps = state.loss_scale_good_steps;
    }
    state.loss_scale = scaler->scale;
    if (s.rank0) log::info("fp16: dynamic loss scaling from " + std::to_string(static_cast<int64_t>(scaler->scale)));
  }
  Evaluator evaluator(cfg, s, m, d, *parallel, metrics);
  Checkpointer checkpointer(cfg, s, m, d, *parallel, *opt, metrics, hooks);
  // checkpoint.save_best and train.early_stopping_patience: the lowest held-out loss so far and the evaluations since
  // it (a resumed run's evaluations up to its checkpoint, as metrics.jsonl holds them). A best adapter written after
  // that step, by the run this one resumes (it went on, then stopped), goes: this run computes those steps again and
  // writes it anew where it is still the best.
  double best_loss = std::numeric_limits<double>::infinity();
  int64_t evals_since_best = 0;
  const int64_t patience = cfg.train.early_stopping_patience;
  if ((cfg.checkpoint.save_best || patience > 0) && !evaluator.has_data() && s.rank0)
    log::warn(std::string(cfg.checkpoint.save_best ? "checkpoint.save_best" : "train.early_stopping_patience") +
              ": no held-out record holds a target token (the data's warnings say why), so nothing judges the run: "
              "no best adapter is written and the run does not stop early");
  // (A non-finite held-out loss is no improvement: NaN compares false.)
  for (const auto& [step, loss] : metrics.eval_losses()) {
    evals_since_best = loss < best_loss ? 0 : evals_since_best + 1;
    if (loss < best_loss) best_loss = loss;
  }
  // Whatever this run's setting: a best directory from after the resume point is of steps this run computes again.
  const std::string best_dir = files::join(cfg.output_dir, best_dir_name(m.full));
  if (s.rank0 && state.step > 0 && files::exists(best_dir)) {
    const std::optional<BestRecord> best = read_best_record(best_dir);
    if (!best || best->step > state.step) {
      files::remove_tree(best_dir);
      log::warn("removed " + best_dir + " (" +
                (!best ? std::string("its ") + kBestFile + " unreadable"
                       : "from step " + std::to_string(best->step) + ", after the resume point " +
                             std::to_string(state.step)) +
                "): this run writes the best adapter of its own evaluations");
    }
  }
  // A run resumed from the checkpoint of its early stop has nothing left to train: the patience reached at the
  // checkpoint's own evaluation, before the end of the run that wrote it (a run that completed and is given more
  // steps goes on).
  const int64_t checkpoint_total = resume ? resume->contents.state.total_steps : 0;
  bool stopped_early = patience > 0 && evals_since_best >= patience && !metrics.eval_losses().empty() &&
                       metrics.eval_losses().back().first == state.step && state.step < total_steps &&
                       state.step < checkpoint_total;
  if (s.world > 1 && (cfg.checkpoint.save_best || patience > 0)) {
    // Every rank decides alike (write_best gathers a sharded adapter; all stop together), as rank 0 read its files.
    at::Tensor t = at::tensor({best_loss, static_cast<double>(evals_since_best), stopped_early ? 1.0 : 0.0}, at::kDouble)
                       .to(s.device);
    s.comm->broadcast(t, 0);
    t = t.to(at::kCPU);
    best_loss = t[0].item<double>();
    evals_since_best = static_cast<int64_t>(t[1].item<double>());
    stopped_early = t[2].item<double>() != 0;
  }
  // After an evaluation: the adapter in best_adapter where its held-out loss is the lowest so far; true where the
  // evaluations since the lowest reach the patience (the run ends early).
  const auto judge = [&](double eval_loss) {
    if (!(eval_loss < best_loss)) return patience > 0 && ++evals_since_best >= patience;
    best_loss = eval_loss;
    evals_since_best = 0;
    if (cfg.checkpoint.save_best) {
      const std::string dir = checkpointer.write_best(state.step, eval_loss);
      if (s.rank0) metrics.line("best held-out loss so far (step " + std::to_string(state.step) + "): saved " + dir);
    }
    return false;
  };
  const auto early_stop_text = [&] {
    std::ostringstream o;
    o << "early stopping after step " << state.step << ": " << evals_since_best << " evaluation(s) without a held-out "
      << "loss under the lowest, " << best_loss << " (train.early_stopping_patience " << patience << ")";
    return o.str();
  };
  if (stopped_early)
    metrics.line("resumed at its early stop: " + early_stop_text() + "; raise train.early_stopping_patience (or set it "
                 "to 0) to train on");

  TrainSummary summary;
  if (!cfg.eval.exact_match_file.empty() && state.step == 0)
    summary.exact_match_before = evaluator.task_metric("before training", state.step);
  double first_loss = NAN, last_loss = NAN;
  int64_t run_tokens = 0, run_inputs = 0;  // target and input tokens of the steps this process ran
  const auto t_loop = Clock::now();
  const int64_t start_step = state.step;
  // The first step in which the allocator gave cached memory back to the driver (cudaFree, a device
  // synchronization; then, if that was not enough, all of its cache and a retry) is reported, once a run: a run at
  // its budget's edge goes on, slower.
  bool edge_reported = !s.device.is_cuda();
  if (hooks.setup_delay_ms > 0)  // a slow start, so that a test can signal the process before the first step
    std::this_thread::sleep_for(std::chrono::milliseconds(hooks.setup_delay_ms));
  if (options.phase) options.phase->store(kInSteps);
  // QT_PROFILE_STEP=N (QT_PROFILE_STEPS=K): a per-kernel profile of steps N to N + K - 1 into output_dir (rank 0).
  std::unique_ptr<StepProfile> profile;
  // Steps overlap on one device: step N + 1 is queued before the host waits for step N's loss and norm and logs them,
  // so the GPU does not wait for the host at the boundary (2 ms a step at 8B 2 x 2048 on an H100, 2026-12-05). A
  // boundary where the host needs the model as step N left it (a checkpoint, an evaluation, a stop signal, the last
  // step, the end of a profile, an attempt's first step) waits for step N first, as every boundary did before.
  // Not with fp16's loss scaling (the next step's scale depends on this one's overflow) nor over several ranks (the
  // stop signal is agreed on in a collective each step). QT_OVERLAP_STEPS=0: no overlap (A/B measurements).
  const bool overlap = hooks.overlap_steps && s.world == 1 && !scaler;
  std::optional<QueuedStep> pending;  // queued, not yet read back
  int64_t queued = state.step;        // steps queued (state.step: steps read back)
  // The peak memory and the allocator's counts are taken from the last read back (or the queueing of a step after a
  // boundary that waited): a step's worth of the host's queueing either way.
  GpuAllocatorCounts since_counts = gpu_allocator_counts(s.device);
  Clock::time_point last_read = t_loop;
  const auto read_back = [&](QueuedStep& q) {
    const StepOutcome r = finish_step(cfg, q, *opt, scaler ? &*scaler : nullptr);
    ++state.step;
    // The last step is done: a signal from here on (its log line written, its evaluation) finds the run's steps done,
    // and the final evaluation and saves complete it. (The phase changed only after the loop, and a SIGTERM sent on
    // seeing the last step's line could land before that and stop the run as if in mid-training.)
    if (state.step == total_steps && options.phase) options.phase->store(kFinishing);
    if (++attempt.steps_done == 1 && s.rank0) write_memory_history(s.device, hooks.memory_history);
    state.optimizer_steps = opt->steps() - (queued - state.step);  // (a step queued after this one counted too)
    if (scaler) {
      state.loss_scale = scaler->scale;
      state.loss_scale_good_steps = scaler->good_steps;
      if (r.overflow)
        metrics.line("step " + std::to_string(state.step) + ": the fp16 gradients overflowed at loss scale " +
                     std::to_string(static_cast<int64_t>(scaler->scale * 2)) + ": the update was not applied; the "
                     "scale is now " + std::to_string(static_cast<int64_t>(scaler->scale)));
    }
    const GpuAllocatorCounts counts = gpu_allocator_counts(s.device);
    if (!edge_reported && (counts.device_frees > since_counts.device_frees ||
                           counts.alloc_retries > since_counts.alloc_retries)) {
      metrics.line(edge_of_budget_message(state.step, counts.device_frees - since_counts.device_frees,
                                          counts.alloc_retries - since_counts.alloc_retries, m.decision));
      edge_reported = true;
    }
    // The step's time: from its queueing, or from the last read back where it was queued before that (overlap).
    const auto now = Clock::now();
    // (On the CPU the work runs while the step is queued: from its queueing to its end, not to its read back, which
    // an overlapped step's comes after the next step's work.)
    const double step_s =
        s.device.is_cuda() ? std::chrono::duration<double>(now - std::max(q.queued_at, last_read)).count()
                           : std::chrono::duration<double>(q.queued_by - q.queued_at).count();
    last_read = now;
    state.tokens_seen += r.targets;
    run_tokens += r.targets;
    run_inputs += r.inputs;
    if (std::isnan(first_loss)) first_loss = r.loss;
    last_loss = r.loss;
    if (state.step % cfg.train.log_every == 0 || state.step == total_steps) {
      RECORD_USER_SCOPE("qt::log_step");
      StepMetrics sm;
      sm.step = state.step;
      sm.total_steps = total_steps;
      sm.loss = r.loss;
      sm.lr = r.lr;
      sm.grad_norm = r.grad_norm;
      sm.step_s = step_s;
      sm.tokens = r.inputs;
      sm.tokens_per_s = r.inputs / std::max(1e-9, sm.step_s);
      sm.target_tokens = r.targets;
      sm.target_tokens_per_s = r.targets / std::max(1e-9, sm.step_s);
      sm.gpu_mem_gib = gpu_peak_gib(s.device);
      sm.gpu_reserved_gib = gpu_peak_gib(s.device, /*reserved=*/true);
      sm.gpu_alloc_retries = counts.alloc_retries;
      sm.gpu_device_allocs = counts.device_allocs;
      sm.gpu_device_frees = counts.device_frees;
      for (const auto& stat : r.dpo) sm.extra.push_back(stat);
      const double per_step = seconds_since(t_loop) / static_cast<double>(state.step - start_step);
      sm.eta_s = per_step * static_cast<double>(total_steps - state.step);
      metrics.step(sm);
    }
    reset_gpu_peak(s.device);
    since_counts = counts;
  };
  while (queued < total_steps && !stopped_early) {
    if (!pending) {
      reset_gpu_peak(s.device);
      since_counts = gpu_allocator_counts(s.device);
    }
    if (s.rank0 && hooks.profile_step == queued + 1) profile = std::make_unique<StepProfile>(s.device.is_cuda());
    const bool oom = hooks.oom_at_step == queued + 1 ||
                     (!hooks.oom_plans_at_load && attempt.steps_done == 0 && attempt.index < hooks.oom_plans);
    // QT_TEST_SYNC_DEBUG: a step queued behind another must not wait for the device (CUDA's sync debug mode names
    // the call that would); the mode is process-wide, so autograd's device thread is covered too.
    SyncDebug sync_debug(pending && s.device.is_cuda() ? hooks.sync_debug : 0);
    std::optional<QueuedStep> queued_step;
    try {
      queued_step = queue_step(cfg, s, m, d, *parallel, *opt, schedule, queued, hooks, oom, scaler ? &*scaler : nullptr);
    } catch (...) {
      // The step before still gets its log line (its loss is on the host by now) before this step's error ends the
      // run; its own failure, if it has one, is not the error reported.
      sync_debug.end();
      if (pending) {
        const std::exception_ptr first = std::current_exception();
        try {
          read_back(*pending);
        } catch (...) {
        }
        std::rethrow_exception(first);
      }
      throw;
    }
    sync_debug.end();
    QueuedStep q = std::move(*queued_step);
    q.queued_by = Clock::now();
    ++queued;
    if (pending) {  // the step before, read back and logged while this one runs
      read_back(*pending);
      pending.reset();
      ++summary.steps_overlapped;
    }
    if (hooks.step_delay_ms > 0)  // slow steps, so that a test can signal the process between two of them
      std::this_thread::sleep_for(std::chrono::milliseconds(hooks.step_delay_ms));
    const bool checkpoint_due = cfg.checkpoint.every > 0 && queued % cfg.checkpoint.every == 0;
    const bool eval_due = evaluator.has_data() && cfg.train.eval_every > 0 && queued % cfg.train.eval_every == 0;
    const bool profile_ends = profile && (queued >= hooks.profile_step + hooks.profile_steps - 1 || queued == total_steps);
    const bool signalled = options.stop_requested && options.stop_requested->load();
    if (overlap && attempt.steps_done > 0 && queued < total_steps && !checkpoint_due && !eval_due && !profile_ends &&
        !signalled) {
      pending = std::move(q);
      continue;
    }
    read_back(q);
    if (profile_ends) {
      if (s.device.is_cuda()) c10::cuda::device_synchronize();
      metrics.line(profile->finish(cfg.output_dir));
      profile.reset();
    }
    if (eval_due) {
      auto [el, et] = evaluator.loss(state.step);
      metrics.eval(state.step, el, et, cfg.preference() ? cfg.preference().name() : nullptr);
      stopped_early = judge(el) && state.step < total_steps;
    }
    // (after the last step a request stops nothing: the run completes; every rank skips the collective alike)
    const bool stop = !stopped_early && state.step < total_steps && stop_requested(options, s);
    if (checkpoint_due || stop) checkpointer.save(state);
    if (stopped_early) {
      metrics.line(early_stop_text());
      break;
    }
    if (stop) {
      metrics.line("stopped by a signal after step " + std::to_string(state.step) + "; resume with --resume auto");
      metrics.write_plot();
      summary.steps = state.step;
      summary.stopped = true;
      return summary;
    }
  }
  // A stop signal from here on finds the run's steps done: the final evaluation and saves complete it.
  if (options.phase) options.phase->store(kFinishing);
  if (hooks.finish_delay_ms > 0)  // a slow finish, so that a test can signal the process after the last step
    std::this_thread::sleep_for(std::chrono::milliseconds(hooks.finish_delay_ms));
  if (evaluator.has_data()) {
    if (metrics.eval_losses().empty() || metrics.eval_losses().back().first != state.step) {
      auto [el, et] = evaluator.loss(state.step);
      metrics.eval(state.step, el, et, cfg.preference() ? cfg.preference().name() : nullptr);
      judge(el);
    }
    summary.eval_loss = metrics.eval_losses().back().second;
  }
  if (cfg.checkpoint.every == 0 || state.step % cfg.checkpoint.every != 0) checkpointer.save(state);
  if (!cfg.eval.exact_match_file.empty())
    summary.exact_match_after = evaluator.task_metric("after training", state.step);
  summary.adapter_dir = checkpointer.write_final();
  if (cfg.checkpoint.save_best && evaluator.has_data() && s.rank0) {
    if (const std::optional<BestRecord> best = read_best_record(best_dir)) {
      summary.best_step = best->step;
      summary.best_eval_loss = best->eval_loss;
      summary.best_dir = best_dir;
    } else {
      log::warn("checkpoint.save_best: no " + best_dir + ": the run's lowest held-out loss came before this process "
                "started (before the resume point, with save_best off then, or its adapter replaced by one of steps "
                "computed again otherwise)");
    }
  }
  summary.steps = state.step;
  summary.stopped_early = stopped_early;
  summary.first_loss = first_loss;
  summary.last_loss = last_loss;
  summary.seconds = seconds_since(t_start);
  summary.tokens_per_s = run_inputs / std::max(1e-9, seconds_since(t_loop));
  summary.target_tokens_per_s = run_tokens / std::max(1e-9, seconds_since(t_loop));
  return summary;
}

std::string gib_text(double v) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(2);
  o << v;
  return o.str();
}

// At most this many leaner plans after the first runs out of memory.
constexpr int kMaxReplans = 3;

}  // namespace

// One process that runs out of device memory before its first step completes (loading the model, the CUDA
// libraries' handles, step 1) starts again under a leaner plan: the budget 5% under the lesser of the last plan's
// budget and its predicted footprint, so that the plan that did not fit cannot be chosen again; the model loads
// anew, the seed and the data position are reset, so the run is the one a user would start under that plan. Several
// processes do not (the others wait in a collective), nor does a run that completed a step (its budget was right
// then), nor train.memory.replan_on_oom false.
TrainSummary train(const RunConfig& cfg, const TrainOptions& options) {
  const auto t_start = Clock::now();
  const TestHooks hooks = TestHooks::from_env();
  Session s = start_session(cfg);
  start_memory_history(s.device, hooks.memory_history);
  watch_out_of_memory(s.device);
  // Rank 0 holds output_dir for the run (before the collective below, which the other ranks pass only after it): a
  // second run into it at the same time is refused.
  std::unique_ptr<OutputDirLock> lock;
  if (s.rank0) lock = std::make_unique<OutputDirLock>(cfg.output_dir, cfg.file);
  // Every rank resumes the same checkpoint or starts a new run: a rank that saw another output_dir (a node without
  // the shared filesystem) or was given other flags would pair its collectives with other steps.
  if (s.world > 1)
    check_same_across_ranks(*s.comm, options.resume.empty() ? std::string("a new run") : files::base_name(options.resume),
                            "resume point (--resume, and the checkpoints each rank sees in output_dir)");
  // Sharded checkpoints are written by every rank into rank 0's directory: every rank must see one output_dir (the
  // lock file rank 0 took in it says whose it is; a node without the shared file system sees none or another).
  if (s.world > 1 && cfg.train.shard == "blocks") {
    const std::string lock_file = output_dir_lock_file(cfg.output_dir);
    check_same_across_ranks(*s.comm, files::is_file(lock_file) ? files::read_file(lock_file) : std::string(),
                            "output_dir " + cfg.output_dir + " (sharded checkpoints need one that every rank sees)");
  }
  DataStage d = load_data(cfg, s);
  MicroDecision planned = decide_run_plan(cfg, s, d);
  Json earlier = Json::array();
  for (int index = 0;; ++index) {
    Attempt attempt;
    attempt.index = index;
    attempt.earlier = earlier;
    std::string what, phase;
    // Not for pinned host memory (activation_offload's pool): a leaner device plan may pin more of the host.
    const auto may_replan = [&](const std::string& message) {
      return cfg.train.memory.replan_on_oom && s.world == 1 && attempt.decision && attempt.steps_done == 0 &&
             attempt.decision->budget_gib > 0 && index < kMaxReplans &&
             message.find("pinned host memory") == std::string::npos;
    };
    take_out_of_memory_need_gib();  // (a failure before this attempt is not its own)
    try {
      return train_under(cfg, options, hooks, s, d, planned, t_start, attempt);
    } catch (const OutOfMemory& e) {
      if (!may_replan(e.what())) {
        if (index == 0) throw;
        throw OutOfMemory(std::string(e.what()) + " (" + std::to_string(index) + " plan(s) before this one ran out of "
                          "memory too; the first within " + gib_text(earlier[0]["budget_gib"].get<double>()) + " GiB)");
      }
      what = e.what();
      phase = what.substr(0, what.find(':'));
    } catch (const c10::Error& e) {
      if (!is_out_of_memory(e) || !may_replan(e.what_without_backtrace())) throw;
      const std::string first = e.what_without_backtrace();
      phase = "before the first step";
      what = "out of GPU memory " + phase + " (" + first.substr(0, std::min<size_t>(first.find('\n'), 300)) + ")";
    }
    // Everything of the attempt is gone with its scope; its cached device memory goes back to the driver, and the
    // pinned host blocks torch's host allocator kept (the embeddings' rows, pin_memory() copies) to the host.
    if (s.device.is_cuda()) {
      c10::cuda::CUDACachingAllocator::emptyCache();
      at::getHostAllocator(at::kCUDA)->empty_cache();
    }
    const Decision& last = *attempt.decision;
    const double predicted = last.footprint.total() / static_cast<double>(int64_t{1} << 30);
    const std::optional<double> needed = take_out_of_memory_need_gib();
    const double next = replan_budget_gib(last.budget_gib, last.footprint, needed);
    try {
      planned = decide_run_plan(cfg, s, d, next);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::Config) throw;
      fail(ErrorKind::Device, what + " No leaner plan fits " + gib_text(next) + " GiB either: " + e.what());
    }
    earlier.push_back(Json{{"plan", describe(last)}, {"predicted_gib", predicted}, {"budget_gib", last.budget_gib},
                           {"error", what.substr(0, 400)}});
    if (needed) earlier.back()["needed_gib"] = *needed;
    if (s.rank0)
      log::warn(phase + ": out of GPU memory under the plan " + describe(last) +
                (needed ? " (its tensors needed at least " + gib_text(*needed) + " GiB when an allocation failed)" : "") +
                ". Starting again under a leaner plan within " + gib_text(next) +
                " GiB (the model loads again; train.memory.replan_on_oom false stops instead)");
    at::manual_seed(cfg.train.seed);
  }
}

}  // namespace qt
