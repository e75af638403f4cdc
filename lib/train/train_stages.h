#pragma once
// The stages train() (trainer.cpp) runs in order, each a function of what the ones before made (torchtune's recipe
// stages; ../shared/ARCHITECTURE.md): the session (launcher, device, communicator), the data, the model (plan,
// load, LoRA, init_from), the resume point, the parallel strategy, the optimizer, the evaluator and the
// checkpointer. The step itself is in train_step.cpp.
#include <ATen/core/Tensor.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/comm/communicator.h"
#include "lib/comm/launch_env.h"
#include "lib/data/tokenizer.h"
#include "lib/dist/parallel.h"
#include "lib/model/exec_plan.h"
#include "lib/model/hf_loader.h"
#include "lib/model/llama.h"
#include "lib/model/lora.h"
#include "lib/model/weight_streaming.h"
#include "lib/train/adamw.h"
#include "lib/train/checkpoint.h"
#include "lib/train/metrics.h"
#include "lib/train/run_config.h"
#include "lib/train/train_data.h"
#include "lib/train/trainer.h"

namespace qt {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t);

// The test hooks of the environment (QT_TEST_*, QT_PROFILE_STEP), read once when the run starts; 0 / -1: off.
struct TestHooks {
  int64_t oom_at_step = -1;           // QT_TEST_OOM_AT_STEP=N[:cublas]: an out-of-memory error in step N's forward
  bool oom_as_cublas = false;         //   ":cublas": as cuBLAS's status check raises it
  bool oom_as_pinned = false;         //   ":pinned": as the offload's pinned host pool raises it
  int64_t nan_loss_at_step = -1;      // QT_TEST_NAN_LOSS_AT_STEP=N: step N's loss not finite
  int64_t step_delay_ms = 0;          // QT_TEST_STEP_DELAY_MS: a sleep after each step (a test signals between)
  int64_t setup_delay_ms = 0;         // QT_TEST_SETUP_DELAY_MS: a sleep before the first step (a test signals there)
  int64_t finish_delay_ms = 0;        // QT_TEST_FINISH_DELAY_MS: a sleep after the last step, before the final saves
  int64_t sleep_after_checkpoint_ms = 0;  // QT_TEST_SLEEP_AFTER_CHECKPOINT_MS: time to kill after a checkpoint
  int64_t profile_step = -1;          // QT_PROFILE_STEP=N: a per-kernel profile of step N into output_dir
  int64_t profile_steps = 1;          // QT_PROFILE_STEPS=K: of steps N to N + K - 1 (K > 1: their boundaries too)
  double loss_scale = 0;              // QT_TEST_LOSS_SCALE: fp16's initial loss scale (an overflow at once)
  int64_t oom_plans = 0;              // QT_TEST_OOM_PLANS=N[:load]: the first N plans run out of memory in their
  bool oom_plans_at_load = false;     //   first step (":load": as their model loads)
  bool overlap_steps = true;          // QT_OVERLAP_STEPS=0: each step read back before the next is queued (A/B)
  int sync_debug = 0;                 // QT_TEST_SYNC_DEBUG=1 (warn) or 2 (error): CUDA's sync debug mode while a step
                                      //   is queued behind another (any host sync there stalls the overlap)
  std::string memory_history;         // QT_MEMORY_HISTORY=FILE: the caching allocator's history (every allocation
                                      //   with its C++ stack) written to FILE after step 1, and to FILE.oom at an
                                      //   out-of-memory error in a step, as torch.cuda.memory._dump_snapshot writes it
  static TestHooks from_env();
};

// Dynamic loss scaling for fp16 compute (torch.amp.GradScaler's rule and defaults, as HF Trainer's fp16 uses it): the
// loss is multiplied by `scale` before the backward pass so that small gradients survive fp16, and the gradients
// divided back before clipping; a step whose gradients overflow is not applied and the scale halves; after
// `growth_interval` steps without overflow it doubles.
struct LossScaler {
  double scale = 65536.0;
  int64_t good_steps = 0;
  int64_t growth_interval = 2000;
  void update(bool overflow) {
    if (overflow) {
      scale /= 2;
      good_steps = 0;
    } else if (++good_steps >= growth_interval) {
      scale *= 2;
      good_steps = 0;
    }
  }
};

// Launch: the launcher's environment, the device and dtype, the communicator, the rows of each rank and forward.
struct Session {
  LaunchEnv env;
  at::Device device = at::kCPU;
  c10::ScalarType dtype = at::kFloat;
  std::unique_ptr<Communicator> comm;
  bool rank0 = true;
  int world = 1;
  int64_t per_rank = 0;  // rows of a step on each rank
  // (`micro`: rows per forward pass: train.micro_batch_size, or the plan's where that is 0; set with the plan)
  int64_t micro = 0;     // rows of one forward pass
  // The host link's pinned copy rate (host_link_bytes_per_s, measured once at the start on a GPU with the cost
  // model's rates, device_has_reference_rates; else 0, the reference's): the plan's PCIe terms scale by it.
  double host_link_bytes_per_s = 0;
};
Session start_session(const RunConfig& cfg);

// Data: the tokenizer (or ids only for a random model without one) and the tokenized, ordered training data.
struct DataStage {
  bool random_init = false;
  LlamaConfig model_config;  // the model's shape (config.json, or the named random shape)
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<TrainData> data;
  std::string train_file_hash;  // data.train_file's content (checkpoints record it; every rank reads the same)
};
// With several ranks, every one has read the same training data (a node-local copy that differs would train a
// different run on each rank), checked before the model loads.
DataStage load_data(const RunConfig& cfg, const Session& s);

// Model: the plan decided from the budget, the base loaded where the plan puts it, LoRA attached (or every tensor
// trained), lora.init_from applied.
struct ModelStage {
  Decision decision;
  LoadOptions load;
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<StreamedWeights> streamed;  // plan.streamed_blocks > 0: the block hooks that fetch them (after model)
  LoraConfig lora;
  bool full = false;          // train.full_finetune
  std::string base_name;      // the adapter's base_model_name_or_path (from the root)
  std::shared_ptr<ReferenceAdapters> reference;  // train.objective "dpo": what the policy is compared with
  std::string reference_hash;  // DPO from lora.init_from: its adapter file's hash (checkpoints record it)
};
// The plan and the micro-batch (train.micro_batch_size, 0: the plan's), before the model loads: a run that cannot
// fit its GPU memory budget is refused here. `budget_gib`, when set, stands for train.memory.gpu_memory_gib (a
// leaner plan after running out of memory).
MicroDecision decide_run_plan(const RunConfig& cfg, const Session& s, const DataStage& d,
                              std::optional<double> budget_gib = std::nullopt);
// decide_micro_batch from the least free device memory and host share over the ranks, so that every rank runs one
// plan: a rank's own figures differ by what else its GPU holds and when its CUDA context started, and plans that
// differ in their micro-batch run different numbers of passes a step (sharded blocks gather once a pass: the ranks
// would wait on each other).
MicroDecision decide_plan_across_ranks(Communicator& comm, PlanInputs in, const PlanRequest& request, double free_gib,
                                       int64_t per_rank, int64_t forced);
// The model under `decision`: the allocator's settings and the CUDA libraries' handles first, then the base loaded
// where the plan keeps it, LoRA attached (or init_from's adapter).
ModelStage build_model(const RunConfig& cfg, const Session& s, const DataStage& d, bool resuming, Decision decision);
PlanInputs plan_inputs(const RunConfig& cfg, const LlamaConfig& mc, int64_t micro, int64_t seq, const at::Device& device,
                       c10::ScalarType dtype, int world, int local_world);

// Resume point: the checkpoint --resume names (checked against this run's config), its weights loaded into the
// model (before any sharding: the files hold whole tensors).
struct ResumePoint {
  std::string dir;
  CheckpointContents contents;
};
std::optional<ResumePoint> load_resume_point(const RunConfig& cfg, const TrainOptions& options, ModelStage& m);

// The parallel strategy (lib/dist/parallel.h): train.shard "blocks" shards the blocks, else data parallel over the
// trained tensors. Places the frozen embeddings and lm_head as the plan says first.
std::unique_ptr<Parallel> make_parallel(const RunConfig& cfg, ModelStage& m, Communicator& comm);

// AdamW over the strategy's parameters, modules_to_save at optim.embedding_lr.
// state_on_host: the execution plan's optimizer_on_host (AdamW's moments in pinned host memory).
std::unique_ptr<AdamW> make_optimizer(const RunConfig& cfg, const NamedTensors& params, bool state_on_host);

// Sum of the cross-entropy over the batch's targets: the fused loss (never the [tokens, vocab] logits; lm_head
// streamed when it lives on the host) or the plain reference path.
at::Tensor loss_sum(const LlamaModel& model, const at::Tensor& hidden, const at::Tensor& targets, bool fused);

// The cross-entropy of each token, [B * S] fp32 (0 where a token has no target), differentiable with respect to
// hidden: the fused loss's rows (never the logits; lm_head frozen, on the device) or the plain path.
at::Tensor token_losses(const LlamaModel& model, const at::Tensor& hidden, const at::Tensor& targets, bool fused);

// DPO's reference for a micro-batch of pairs: each sequence's log-probability (sequence_logps, [2 * pairs]) under
// `reference` (ReferenceAdapters), without gradient, in evaluation mode; the model is left in `training` mode after.
at::Tensor reference_logps(LlamaModel& model, ReferenceAdapters& reference, const Batch& b, const at::Tensor& sequences,
                           bool fused, bool training);

// The policy's sequence_logps of a micro-batch without gradient, in evaluation mode (no dropout, as TRL's KTO passes
// with its default disable_dropout), under `reference` where not null (reference_logps); `training` restored after.
at::Tensor logps_without_gradient(LlamaModel& model, ReferenceAdapters* reference, const Batch& b,
                                  const at::Tensor& sequences, bool fused, bool training);

// KTO's passes without gradient over a micro-batch of its pairs cut by split_pairs, each pass over one half of the
// rows (as the plan counts them): the reference's over the records and (with the KL term, `kl`) their KL sequences,
// and the policy's over the KL sequences and, with `records`, over the records too (held-out evaluation). Each
// [2 * pairs], the slots of what a pass did not take 0; `policy` undefined where the policy took no pass.
struct KtoLogps {
  at::Tensor reference, policy;
};
KtoLogps kto_logps_without_gradient(LlamaModel& model, ReferenceAdapters& reference, const PairHalves& halves, bool kl,
                                    bool records, bool fused, bool training);

// The preference loss terms (DPO, CPO, ORPO, KTO) of a micro-batch of pairs under the policy (the model as it is:
// with gradient where grad mode is on); DPO's and KTO's against the reference's log-probabilities (undefined for CPO
// and ORPO). KTO: `comm` (training's, where every rank runs as many micro-batches) averages the KL baseline over the
// ranks, as TRL gathers it; null (held-out evaluation) leaves each micro-batch's own. kl_policy: KTO's KL sequences'
// log-probabilities from their own pass without gradient (split_pairs: `b` and `hidden` then hold the records alone,
// `sequences` their first_sequences); undefined: `b` holds both.
DpoTerms dpo_policy_terms(const LlamaModel& model, const at::Tensor& hidden, const Batch& b,
                          const at::Tensor& sequences, const at::Tensor& reference, const PreferenceObjective& pref,
                          bool fused, Communicator* comm = nullptr, const at::Tensor& kl_policy = {});

// The message of an out-of-memory error in `phase` ("step 3", "evaluation after step 3"): where, how big, how much
// memory, what lowers it.
bool is_out_of_memory(const c10::Error& e);
// Running out of device memory in a training step, with oom_message's text (kind Device, exit 9).
class OutOfMemory : public Error {
 public:
  explicit OutOfMemory(std::string message) : Error(ErrorKind::Device, std::move(message)) {}
};
std::string oom_message(const RunConfig& cfg, const at::Device& device, const std::string& phase, int64_t micro,
                        int64_t seq_len, const Decision& decision, const std::string& what);
// What the user is told, once a run, of a step in which the allocator gave `frees` blocks of its cache back to the
// driver and retried `retries` allocations after giving back all of it: the plan's figures and the budget that
// would let the plan pick leaner settings.
std::string edge_of_budget_message(int64_t step, int64_t frees, int64_t retries, const Decision& decision);
double gpu_peak_gib(const at::Device& device, bool reserved = false);
void reset_gpu_peak(const at::Device& device);
// The device memory the caching allocator's last failed allocation needed (GiB): its bytes in use then, plus that
// allocation; taken once (nullopt when none failed since, or off CUDA). watch_out_of_memory attaches the observer
// that records it (once a process).
void watch_out_of_memory(const at::Device& device);
std::optional<double> take_out_of_memory_need_gib();
// QT_MEMORY_HISTORY: start recording the caching allocator's history (CUDA; a no-op when `file` is empty), and write
// what it recorded to `file` (replacing it).
void start_memory_history(const at::Device& device, const std::string& file);
void write_memory_history(const at::Device& device, const std::string& file);
// The caching allocator's counts since the process started: the allocations that failed and were retried after it
// gave its cache back to the driver (each a device synchronization: a run at its budget's edge), and its
// cudaMalloc / cudaFree calls (with expandable segments, the maps and unmaps of pages). -1 each off CUDA.
struct GpuAllocatorCounts {
  int64_t alloc_retries = -1;
  int64_t device_allocs = -1;
  int64_t device_frees = -1;
};
GpuAllocatorCounts gpu_allocator_counts(const at::Device& device);

// Held-out loss and the exact-match metric, guarded for out-of-memory errors.
class Evaluator {
 public:
  Evaluator(const RunConfig& cfg, Session& s, ModelStage& m, DataStage& d, Parallel& parallel, MetricsLog& metrics);
  // Held-out data on any rank: every rank then calls loss(), also one whose share is empty (fewer held-out batches
  // than ranks), or the ranks' collectives pair up wrongly.
  bool has_data() const { return d_.data->has_eval(); }
  // The mean loss over the held-out targets and their count (collective).
  std::pair<double, int64_t> loss(int64_t step);
  // Logs the exact-match accuracy of greedy answers; its accuracy (collective: every rank calls it).
  double task_metric(const char* when, int64_t step);

 private:
  const RunConfig& cfg_;
  Session& s_;
  ModelStage& m_;
  DataStage& d_;
  Parallel& parallel_;
  MetricsLog& metrics_;
  std::vector<Batch> batches_;
};

// Crash-safe checkpoints of the run (rank 0 writes, sharded optimizer state from every rank) and the final adapter.
// checkpoint.save_best's directory in output_dir, and the file in it that names its step and held-out loss.
inline const char* best_dir_name(bool full) { return full ? "best_model" : "best_adapter"; }
inline constexpr const char* kBestFile = "best.json";
struct BestRecord {
  int64_t step = 0;
  double eval_loss = 0;
};
// `dir`'s best.json; nullopt where it is missing or not {step, eval_loss}.
std::optional<BestRecord> read_best_record(const std::string& dir);

class Checkpointer {
 public:
  Checkpointer(const RunConfig& cfg, Session& s, ModelStage& m, DataStage& d, Parallel& parallel, AdamW& opt,
               MetricsLog& metrics, const TestHooks& hooks);
  void save(const TrainerState& state);
  // The adapter (or the full model) into output_dir; returns its directory.
  std::string write_final();
  // checkpoint.save_best: the adapter (the full model) after `step`, whose held-out loss `eval_loss` is the run's
  // lowest so far, into output_dir/best_adapter (best_model) with best.json; returns its directory. Every rank
  // calls it (the sharded adapter is gathered), rank 0 writes.
  std::string write_best(int64_t step, double eval_loss);

 private:
  void write_adapter(const std::string& dir);
  // The adapter (the full model) into output_dir/`name`, written beside it and put in its place whole, with
  // `extra` (when set) adding files to the new directory first.
  std::string write_whole(const std::string& name, const std::function<void(const std::string&)>& extra);
  const RunConfig& cfg_;
  Session& s_;
  ModelStage& m_;
  DataStage& d_;
  Parallel& parallel_;
  AdamW& opt_;
  MetricsLog& metrics_;
  const TestHooks& hooks_;
};

}  // namespace qt
