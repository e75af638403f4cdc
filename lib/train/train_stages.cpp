#include "lib/train/train_stages.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/cuda/memory_snapshot.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "lib/data/chat_template.h"
#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/kernels/attention_core.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/streamed_linear_ce.h"
#include "lib/model/merge.h"
#include "lib/model/peft_adapter.h"
#include "lib/model/random_init.h"
#include "lib/train/exact_match.h"

namespace qt {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

TestHooks TestHooks::from_env() {
  TestHooks h;
  auto number = [](const char* name, int64_t off) {
    const char* v = std::getenv(name);
    return v ? static_cast<int64_t>(std::atoll(v)) : off;
  };
  h.oom_at_step = number("QT_TEST_OOM_AT_STEP", -1);
  if (const char* v = std::getenv("QT_TEST_OOM_AT_STEP")) {
    h.oom_as_cublas = std::string(v).find(":cublas") != std::string::npos;
    h.oom_as_pinned = std::string(v).find(":pinned") != std::string::npos;
  }
  h.nan_loss_at_step = number("QT_TEST_NAN_LOSS_AT_STEP", -1);
  h.step_delay_ms = number("QT_TEST_STEP_DELAY_MS", 0);
  h.setup_delay_ms = number("QT_TEST_SETUP_DELAY_MS", 0);
  h.finish_delay_ms = number("QT_TEST_FINISH_DELAY_MS", 0);
  h.sleep_after_checkpoint_ms = number("QT_TEST_SLEEP_AFTER_CHECKPOINT_MS", 0);
  h.profile_step = number("QT_PROFILE_STEP", -1);
  h.profile_steps = std::max<int64_t>(1, number("QT_PROFILE_STEPS", 1));
  if (const char* v = std::getenv("QT_TEST_LOSS_SCALE")) h.loss_scale = std::atof(v);
  h.oom_plans = number("QT_TEST_OOM_PLANS", 0);
  if (const char* v = std::getenv("QT_TEST_OOM_PLANS")) h.oom_plans_at_load = std::string(v).find(":load") != std::string::npos;
  h.overlap_steps = number("QT_OVERLAP_STEPS", 1) != 0;
  h.sync_debug = static_cast<int>(std::clamp<int64_t>(number("QT_TEST_SYNC_DEBUG", 0), 0, 2));
  if (const char* v = std::getenv("QT_MEMORY_HISTORY")) h.memory_history = v;
  return h;
}

namespace {

// The CUDA libraries' handles, made before the model takes the device's memory. cuBLAS, cuBLASLt and cuDNN make a
// handle per thread on first use (cublasCreate and cudnnCreate allocate device memory outside the caching
// allocator), and the backward pass runs on autograd's device thread, whose first GEMM would otherwise make them in
// the first step's backward pass, when a run planned to its budget's edge has left nothing outside the allocator's
// segments: 8B 1 x 61100 at a 14.9 GiB budget ended in CUBLAS_STATUS_ALLOC_FAILED from cublasCreate (H200,
// 2026-12-04). A small forward and backward pass through a GEMM, a GEMM with a bias and causal attention in the
// compute dtype makes them on both threads. Their memory is part of the plan's context_and_libraries term.
void warm_cuda_libraries(const at::Device& device, c10::ScalarType dtype) {
  const auto opt = at::TensorOptions().device(device).dtype(dtype);
  at::Tensor x = at::randn({128, 64}, opt).requires_grad_(true);
  at::Tensor w = at::randn({64, 64}, opt).requires_grad_(true);
  at::Tensor b = at::randn({64}, opt).requires_grad_(true);
  at::Tensor y = at::addmm(b, at::mm(x, w), w.t());
  if (dtype != at::kFloat) {
    at::Tensor q = y.view({1, 128, 1, 64}).transpose(1, 2);
    if (causal_attention_supported(q)) y = causal_attention(q, q, q, 0.125, /*prefer_cudnn=*/true, nullptr);
  }
  y.to(at::kFloat).sum().backward();
}

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

// pref (DPO, CPO): the held-out pairs' loss, its mean over the pairs and their count (else the targets').
std::pair<double, int64_t> evaluate(LlamaModel& model, const std::vector<Batch>& batches, bool fused, Communicator& comm,
                                    FullyShard* fsdp, const PreferenceObjective& pref, ReferenceAdapters* reference) {
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
  KtoHeldOut kto;  // KTO: the KL baseline over the whole held-out set (KtoHeldOut), the losses once it is known
  for (size_t i = 0; i < forwards; ++i) {
    if (i >= batches.size()) {
      model.forward_hidden(model.embed(at::zeros({1, 1}, at::TensorOptions().dtype(at::kLong).device(model.device()))));
      continue;
    }
    const Batch& b = batches[i];
    if (pref.kto) {  // (each pass over one half of the rows, as training's)
      const KtoLogps l = kto_logps_without_gradient(model, *reference, split_pairs(b), pref.kto->kl(),
                                                    /*records=*/true, fused, /*training=*/false);
      kto.add(l.policy, l.reference, b.pair_labels);
      count += b.num_pairs;
      continue;
    }
    if (pref) {
      const at::Tensor seqs = pair_sequences(b);
      const at::Tensor ref = pref.needs_reference()
                                 ? reference_logps(model, *reference, b, seqs, fused, /*training=*/false)
                                 : at::Tensor();
      const at::Tensor hidden = model.forward_hidden(model.embed(b.input_ids), b);
      sum += dpo_policy_terms(model, hidden, b, seqs, ref, pref, fused).loss_sum.item<double>();
      count += b.num_pairs;
      continue;
    }
    at::Tensor hidden = model.forward_hidden(model.embed(b.input_ids), b);
    sum += loss_sum(model, hidden, b.targets, fused).item<double>();
    count += b.num_targets;
  }
  if (pref.kto) {
    const auto wire = comm.device().is_cuda() ? at::kFloat : at::kDouble;
    at::Tensor kl = kto.kl_sums().to(wire).to(comm.device());
    comm.all_reduce(kl);
    sum = kto.terms(kl, *pref.kto).loss_sum.item<double>();
  }
  at::Tensor totals = at::tensor({sum, static_cast<double>(count)}, at::kDouble).to(comm.device().is_cuda() ? at::kFloat : at::kDouble).to(comm.device());
  comm.all_reduce(totals);
  totals = totals.to(at::kCPU, at::kDouble);
  const double all_sum = totals[0].item<double>();
  const int64_t all_count = static_cast<int64_t>(std::llround(totals[1].item<double>()));
  return {all_count ? all_sum / static_cast<double>(all_count) : 0.0, all_count};
}

}  // namespace

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
         ") or data.max_seq_len (now " + std::to_string(cfg.parsed_data.max_seq_len) +
         (cfg.preference() ? ", a pair's sequence: a row holds two" : "") +
         "), or give train.memory.gpu_memory_gib a figure below " + fixed2(predicted) +
         " so that the plan chooses leaner settings (checkpointing, offload, the embeddings and lm_head on the "
         "host), or free the settings forced in train.memory. The last checkpoint in " + cfg.output_dir +
         " is kept (resume with --resume auto). [torch: " + first + "]";
}

std::string edge_of_budget_message(int64_t step, int64_t frees, int64_t retries, const Decision& decision) {
  const double predicted = decision.footprint.total() / static_cast<double>(int64_t{1} << 30);
  std::string budget = "no budget";
  std::string lower = "give train.memory.gpu_memory_gib a figure";
  if (decision.budget_gib > 0) {
    budget = "a budget of " + fixed2(decision.budget_gib) + " GiB";
    lower = "a train.memory.gpu_memory_gib of " + fixed2(std::max(0.5, decision.budget_gib - 0.5)) +
            " (now " + fixed2(decision.budget_gib) + ")";
  }
  const auto count = [](int64_t n, const char* one, const char* many) {
    return std::to_string(n) + " " + (n == 1 ? one : many);
  };
  std::string what = "gave " + count(frees, "block", "blocks") + " of its cache back to the driver";
  if (retries > 0) what += " and retried " + count(retries, "allocation", "allocations") + " after freeing all of it";
  return "step " + std::to_string(step) + ": GPU memory ran short: the caching allocator " + what +
         " (each cudaFree synchronizes the device). The run goes on, slower: the plan's footprint was predicted at " +
         fixed2(predicted) + " GiB of " + budget + ". With " + lower +
         " the plan picks leaner settings, which may run faster. (Said once a run.)";
}

double gpu_peak_gib(const at::Device& device, bool reserved) {
  if (!device.is_cuda()) return -1;
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  const auto& stat = reserved ? stats.reserved_bytes[0] : stats.allocated_bytes[0];
  return static_cast<double>(stat.peak) / static_cast<double>(int64_t{1} << 30);
}

GpuAllocatorCounts gpu_allocator_counts(const at::Device& device) {
  if (!device.is_cuda()) return {};
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  return {stats.num_alloc_retries, stats.num_device_alloc, stats.num_device_free};
}

void reset_gpu_peak(const at::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
}

namespace {
std::atomic<int64_t> g_out_of_memory_need{-1};  // bytes; -1: none since last taken
}  // namespace

void watch_out_of_memory(const at::Device& device) {
  static std::once_flag once;
  if (!device.is_cuda()) return;
  std::call_once(once, [] {
    // The allocator attaches observers to the devices it has set up: CUDA initialized first.
    at::globalContext().lazyInitDevice(at::kCUDA);
    try {
      // Called by the allocator after it has released its lock, before it throws.
      c10::cuda::CUDACachingAllocator::attachOutOfMemoryObserver(
          [](int64_t dev, size_t requested, size_t /*device_total*/, size_t /*device_free*/) {
            const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(dev));
            g_out_of_memory_need.store(stats.allocated_bytes[0].current + static_cast<int64_t>(requested));
          });
    } catch (const c10::Error& e) {  // another allocator backend (PYTORCH_CUDA_ALLOC_CONF backend:cudaMallocAsync)
      log::warn(std::string("no out-of-memory observer on this allocator (a plan that runs out of memory is followed "
                            "by one 5% leaner only): ") + e.what_without_backtrace());
    }
  });
}

std::optional<double> take_out_of_memory_need_gib() {
  const int64_t bytes = g_out_of_memory_need.exchange(-1);
  if (bytes < 0) return std::nullopt;
  return static_cast<double>(bytes) / static_cast<double>(int64_t{1} << 30);
}

void start_memory_history(const at::Device& device, const std::string& file) {
  if (!device.is_cuda() || file.empty()) return;
  try {
    // Stacks "all": the C++ frames (a process without Python has no Python frames to add).
    torch::cuda::_record_memory_history("all", "all", "all", /*max_entries=*/1000000);
  } catch (const c10::Error& e) {
    log::warn("QT_MEMORY_HISTORY: the allocator's history cannot be recorded: " + std::string(e.what_without_backtrace()));
    return;
  }
  log::info("recording the caching allocator's history for " + file + " (QT_MEMORY_HISTORY; slower)");
}

void write_memory_history(const at::Device& device, const std::string& file) {
  if (!device.is_cuda() || file.empty()) return;
  const std::string pickled = torch::cuda::_memory_snapshot_pickled();
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(pickled.data(), static_cast<std::streamsize>(pickled.size()));
  if (!out.flush()) fail(ErrorKind::Io, file + ": cannot write the allocator's history (QT_MEMORY_HISTORY)");
  log::info("wrote the caching allocator's history to " + file);
}

at::Tensor loss_sum(const LlamaModel& model, const at::Tensor& hidden, const at::Tensor& targets, bool fused) {
  at::Tensor h = hidden.reshape({-1, hidden.size(-1)});
  // lm_head_weight() requires grad when lm_head is trained (modules_to_save): the fused loss then also gives dW.
  const at::Tensor w = model.lm_head_weight();
  // The fused loss takes the targets from the host (checked and counted there: no sync with the GPU).
  if (fused && model.lm_head_on_host()) return streamed_linear_cross_entropy(h, w, targets.reshape({-1}));
  if (fused) {
    // A frozen lm_head's logits in the plan's tiles (ExecPlan::loss_chunk_tokens; 0: the loss's own rule).
    FusedLinearCeOptions options;
    if (!w.requires_grad()) options.chunk_tokens = model.plan.loss_chunk_tokens;
    return fused_linear_cross_entropy(h, w, targets.reshape({-1}), options).loss_sum;
  }
  at::Tensor t = targets.reshape({-1}).to(hidden.device());
  at::Tensor logits = at::linear(h, w).to(at::kFloat);
  return at::cross_entropy_loss(logits, t, /*weight=*/{}, at::Reduction::Sum, /*ignore_index=*/-100);
}

at::Tensor token_losses(const LlamaModel& model, const at::Tensor& hidden, const at::Tensor& targets, bool fused) {
  const at::Tensor h = hidden.reshape({-1, hidden.size(-1)});
  const at::Tensor w = model.lm_head_weight();
  QT_CHECK(!model.lm_head_on_host(), ErrorKind::Internal, "token_losses: lm_head streamed from the host");
  if (fused) {
    FusedLinearCeOptions options;
    options.chunk_tokens = model.plan.loss_chunk_tokens;
    return fused_linear_cross_entropy_rows(h, w, targets.reshape({-1}), options);
  }
  const at::Tensor t = targets.reshape({-1}).to(hidden.device());
  return at::cross_entropy_loss(at::linear(h, w).to(at::kFloat), t, /*weight=*/{}, at::Reduction::None,
                                /*ignore_index=*/-100);
}

at::Tensor logps_without_gradient(LlamaModel& model, ReferenceAdapters* reference, const Batch& b,
                                  const at::Tensor& sequences, bool fused, bool training) {
  at::NoGradGuard no_grad;
  struct Mode {  // (restored on an error too: an out-of-memory error's replan trains on)
    LlamaModel& m;
    bool training;
    ~Mode() { m.set_training(training); }
  } mode{model, training};
  model.set_training(false);
  std::optional<ReferenceAdapters::Scope> scope;
  if (reference) scope.emplace(*reference);
  const at::Tensor hidden = model.forward_hidden(model.embed(b.input_ids), b);
  return sequence_logps(token_losses(model, hidden, b.targets, fused), sequences, b.num_pairs);
}

at::Tensor reference_logps(LlamaModel& model, ReferenceAdapters& reference, const Batch& b, const at::Tensor& sequences,
                           bool fused, bool training) {
  return logps_without_gradient(model, &reference, b, sequences, fused, training);
}

KtoLogps kto_logps_without_gradient(LlamaModel& model, ReferenceAdapters& reference, const PairHalves& h, bool kl,
                                    bool records, bool fused, bool training) {
  KtoLogps out;
  out.reference = reference_logps(model, reference, h.first, h.first_sequences, fused, training);
  if (records) out.policy = logps_without_gradient(model, nullptr, h.first, h.first_sequences, fused, training);
  if (!kl) return out;
  out.reference = out.reference + reference_logps(model, reference, h.second, h.second_sequences, fused, training);
  const at::Tensor second = logps_without_gradient(model, nullptr, h.second, h.second_sequences, fused, training);
  out.policy = out.policy.defined() ? out.policy + second : second;
  return out;
}

DpoTerms dpo_policy_terms(const LlamaModel& model, const at::Tensor& hidden, const Batch& b,
                          const at::Tensor& sequences, const at::Tensor& reference, const PreferenceObjective& pref,
                          bool fused, Communicator* comm, const at::Tensor& kl_policy) {
  if (pref.kto) {
    // KTO: the records from `hidden`, their KL sequences from kl_policy (kto_logps_without_gradient); the KL
    // baseline from the latter.
    QT_CHECK(b.pair_labels.defined(), ErrorKind::Internal, "dpo_policy_terms: KTO's records without their labels");
    at::Tensor policy = sequence_logps(token_losses(model, hidden, b.targets, fused), sequences, b.num_pairs);
    if (kl_policy.defined()) policy = policy + kl_policy.detach();
    at::Tensor kl = at::zeros({}, policy.options().dtype(at::kFloat));
    if (pref.kto->kl()) {
      kl = kto_kl(policy, reference);
      if (comm && comm->world_size() > 1) {  // TRL's gather of the ranks' means, then their mean
        kl = kl.reshape({1}).clone();
        comm->all_reduce(kl);
        kl = kl.reshape({}) / static_cast<double>(comm->world_size());
      }
      kl = kl.clamp_min(0);
    }
    return kto_terms(policy, reference, to_device_async(b.pair_labels, policy.device()), kl, *pref.kto);
  }
  if (pref.needs_prompt_nll()) {
    // ORPO: one pass of the loss over the completions' targets and the chosen prompts' (whole_chosen_targets); the
    // log-probabilities over the completions alone, the NLL over the whole chosen sequences.
    const at::Tensor whole = whole_chosen_targets(b.input_ids, b.targets, sequences, b.num_pairs);
    const at::Tensor losses = token_losses(model, hidden, whole, fused);
    const at::Tensor completion =
        to_device_async(b.targets.reshape({-1}).ne(-100).to(losses.scalar_type()), losses.device());
    const at::Tensor policy = sequence_logps(losses * completion, sequences, b.num_pairs);
    const at::Tensor all = sequence_logps(losses, sequences, b.num_pairs).reshape({-1, 2}).select(1, 0);
    const double chosen_tokens =
        sequence_targets(whole, sequences, b.num_pairs, at::kCPU).view({-1, 2}).select(1, 0).sum().item<double>();
    const at::Tensor nll = -all.sum() / std::max(1.0, chosen_tokens);
    return pref.terms(policy, reference, sequence_targets(b, sequences, policy.device()), nll);
  }
  const at::Tensor policy = sequence_logps(token_losses(model, hidden, b.targets, fused), sequences, b.num_pairs);
  const at::Tensor lengths = pref.needs_lengths() ? sequence_targets(b, sequences, policy.device()) : at::Tensor();
  return pref.terms(policy, reference, lengths);
}

namespace {
// A block's seven linears: HF module name, (in features, out features).
std::vector<std::pair<std::string, std::pair<int64_t, int64_t>>> block_linear_shapes(const LlamaConfig& mc) {
  const int64_t H = mc.hidden_size, I = mc.intermediate_size;
  return {{"q_proj", {H, mc.q_size()}}, {"k_proj", {H, mc.kv_size()}}, {"v_proj", {H, mc.kv_size()}},
          {"o_proj", {mc.q_size(), H}}, {"gate_proj", {H, I}},         {"up_proj", {H, I}},
          {"down_proj", {I, H}}};
}
}  // namespace

PlanInputs plan_inputs(const RunConfig& cfg, const LlamaConfig& mc, int64_t micro, int64_t seq, const at::Device& device,
                       c10::ScalarType dtype, int world, int local_world) {
  PlanInputs in;
  in.model = mc;
  in.micro_batch = micro;
  in.seq = seq;
  in.cuda = device.is_cuda();
  in.memory_bytes_per_s = device_memory_bytes_per_s(in.cuda, device.has_index() ? device.index() : 0);
  in.nf4 = cfg.model.quant == "nf4";
  in.element_size = static_cast<int64_t>(c10::elementSize(dtype));
  in.sharded = cfg.train.shard == "blocks";
  in.world = world;
  in.file = cfg.file;
  if (cfg.optim.name == "adamw_8bit") in.optimizer_state_bytes = kEightBitMomentBytes;
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
  const auto shapes = block_linear_shapes(mc);
  for (const auto& [name, io] : shapes)
    if (lora.targets_module(name)) in.lora_params += L * lora.r * (io.first + io.second);
  in.dpo_reference = cfg.preference().needs_reference();  // DPO, KTO
  // KTO: each pass over one half of the rows (split_pairs; the packer keeps each half within half a row)
  if (cfg.preference().kto) {
    in.seq = std::max<int64_t>(1, seq / 2);
    in.kto_kl = cfg.preference().kto->kl();
  }
  in.reference_adapters = in.dpo_reference && !lora.init_from.empty();
  in.mlp_dropout = lora.dropout > 0 && (lora.targets_module("gate_proj") || lora.targets_module("up_proj") ||
                                        lora.targets_module("down_proj"));
  if (lora.dropout > 0)
    for (const auto& [name, io] : shapes)
      if (lora.targets_module(name)) {
        in.dropout_width = std::max(in.dropout_width, io.first);
        in.dropout_widths += io.first;
      }
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

Session start_session(const RunConfig& cfg) {
  log::set_level(log::parse_level(cfg.log_level));
  Session s;
  s.env = read_launch_env();
  log::set_rank(s.env.rank);
  s.device = resolve_device(cfg.model.device, s.env);
  s.dtype = resolve_dtype(cfg.model.dtype, s.device);
  CommOptions comm_options;
  comm_options.timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.train.collective_timeout_s * 1000));
  s.comm = make_communicator(s.env, s.device, comm_options);
  check_same_across_ranks(*s.comm, cfg.resolved.dump(), "run config");
  s.rank0 = s.comm->rank() == 0;
  s.world = s.comm->world_size();
  if (cfg.train.batch_size % s.world != 0)
    fail_key(ErrorKind::Config, cfg.file, "train.batch_size",
             std::to_string(cfg.train.batch_size) + " is not divisible by the world size " + std::to_string(s.world));
  s.per_rank = cfg.train.batch_size / s.world;
  if (cfg.train.micro_batch_size > 0 && s.per_rank % cfg.train.micro_batch_size != 0)
    fail_key(ErrorKind::Config, cfg.file, "train.micro_batch_size",
             std::to_string(cfg.train.micro_batch_size) + " does not divide a rank's " + std::to_string(s.per_rank) +
                 " rows (train.batch_size " + std::to_string(cfg.train.batch_size) + " over " +
                 std::to_string(s.world) + " ranks)");
  s.micro = cfg.train.micro_batch_size > 0 ? cfg.train.micro_batch_size : s.per_rank;
  // (On a device whose compute the cost model's rates describe: see device_has_reference_rates.)
  const int index = s.device.is_cuda() ? s.device.index() : 0;
  if (device_has_reference_rates(s.device.is_cuda(), index))
    s.host_link_bytes_per_s = host_link_bytes_per_s(true, index);
  if (!cfg.model.path.empty() && files::exists(files::join(cfg.model.path, kAdapterConfigFile)) &&
      !files::exists(files::join(cfg.model.path, "config.json")))
    fail_key(ErrorKind::Config, cfg.file, "model.path",
             cfg.model.path + " is a LoRA adapter (adapter_config.json); give its base as model.path (and the adapter "
             "as lora.init_from to train on from it)");
  if (s.rank0) files::make_dirs(cfg.output_dir);
  at::manual_seed(cfg.train.seed);
  return s;
}

namespace {
// What the data and the config ask of the model, checked before it loads (each would otherwise fail inside the first
// step or abort the process): token ids within its vocabulary, LoRA ranks within its linears, CPU masks within the
// host.
void check_data_fits_model(const RunConfig& cfg, const Session& s, const DataStage& d) {
  // A tokenizer with more ids than the model has embeddings (a config.json and tokenizer that do not belong
  // together) would fail inside the first step's embedding lookup.
  const auto [max_id, where] = d.data->max_token_id();
  if (max_id >= d.model_config.vocab_size)
    fail_key(ErrorKind::Model, d.random_init && cfg.model.path.empty() ? cfg.file : files::join(cfg.model.path, "config.json"),
             d.random_init && cfg.model.path.empty() ? "model.shape" : "vocab_size",
             std::to_string(d.model_config.vocab_size) + " embeddings, but the data holds token id " +
                 std::to_string(max_id) + " (" + where + ", as the tokenizer gives it): the tokenizer and the "
                 "model do not belong together");
  // A LoRA rank above a targeted linear's smaller side adds parameters, not rank (lora.r 1e8 asked the host for
  // 16,000 GiB and ended in an abort).
  if (!cfg.train.full_finetune) {
    const LoraConfig lora = LoraConfig::from_json(cfg.lora, cfg.file);
    for (const auto& [name, io] : block_linear_shapes(d.model_config))
      if (lora.targets_module(name) && lora.r > std::min(io.first, io.second))
        fail_key(ErrorKind::Config, cfg.file, "lora.r",
                 std::to_string(lora.r) + " is more than " + name + "'s smaller side (" + std::to_string(io.first) +
                     " in, " + std::to_string(io.second) + " out): a rank above it adds parameters, not rank");
  }
  // On the CPU, rows of several documents (or padding) attend through a block-diagonal [rows, S, S] mask, built in
  // a few boolean temporaries: refused where those alone would take half the host.
  if (!s.device.is_cuda() && d.data->varlen_rows()) {
    const double S = static_cast<double>(d.data->max_seq_len());
    const double mask_bytes = 4.0 * static_cast<double>(s.micro) * S * S;
    const double host = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
    if (mask_bytes > host / 2)
      fail_key(ErrorKind::Config, cfg.file, "data.max_seq_len",
               std::to_string(d.data->max_seq_len()) + " tokens a row: on the CPU, rows of several documents attend "
               "through masks of " + std::to_string(static_cast<int64_t>(mask_bytes / (1 << 30))) + " GiB (" +
               std::to_string(s.micro) + " rows of S x S), more than half this host's memory; lower data.max_seq_len "
               "or train.micro_batch_size, or train on a GPU");
  }
}
}  // namespace

namespace {

// How the lora section differs from the adapter in `dir` (its adapter_config.json), " difference;" each; "" when it
// does not. Tied embeddings: lm_head, embed_tokens or both name the same one tensor (PEFT rewrites the list so).
std::string adapter_differences(const LoraConfig& lora, const LlamaModel& model, const std::string& dir) {
  PeftAdapterConfig adapter = read_peft_adapter_config(dir);
  if (model.config.tie_word_embeddings && !lora.modules_to_save.empty() && !adapter.lora.modules_to_save.empty())
    adapter.lora.modules_to_save = lora.modules_to_save;
  std::string out;
  for (const auto& diff : lora.differences_from(adapter.lora)) out += " " + diff + ";";
  return out;
}

// What a model directory holds, cheaply, for comparing ranks (a node whose copy differs would train another model in
// its half of the gradients, or of a sharded block): config.json and the tokenizer files whole; each safetensors
// file's size, header and 64 KiB of its data at the start, middle and end.
std::string model_fingerprint(const std::string& dir) {
  std::string out;
  for (const std::string& name : files::list_dir(dir)) {
    const std::string path = files::join(dir, name);
    const bool whole = name == "config.json" || name.rfind("tokenizer", 0) == 0 || name == "special_tokens_map.json";
    const bool tensors = name.size() > 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0;
    if ((!whole && !tensors) || !files::is_file(path)) continue;
    out += name + "\n";
    if (whole) {
      out += files::read_file(path);
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    const int64_t size = files::file_size(path);
    out += std::to_string(size) + "\n";
    uint64_t header = 0;
    if (size < 8 || !in.read(reinterpret_cast<char*>(&header), 8)) continue;
    const int64_t data_begin = 8 + static_cast<int64_t>(std::min<uint64_t>(header, static_cast<uint64_t>(size - 8)));
    const auto take = [&](int64_t from, int64_t n) {
      n = std::max<int64_t>(0, std::min(n, size - from));
      std::string bytes(static_cast<size_t>(n), '\0');
      in.clear();
      in.seekg(from);
      in.read(bytes.data(), n);
      out += bytes.substr(0, static_cast<size_t>(in.gcount()));
    };
    take(8, data_begin - 8);  // the header: names, dtypes, shapes, offsets
    constexpr int64_t kSample = 64 * 1024;
    for (int64_t at : {data_begin, data_begin + (size - data_begin) / 2, size - kSample}) take(std::max(at, data_begin), kSample);
  }
  return out;
}

}  // namespace

DataStage load_data(const RunConfig& cfg, const Session& s) {
  DataStage d;
  d.random_init = cfg.model.init == "random";
  const LlamaConfig random_shape = !d.random_init ? LlamaConfig{}
                                   : cfg.model.shape.empty()
                                       ? LlamaConfig::from_file(files::join(cfg.model.path, "config.json"))
                                       : shape_config(cfg.model.shape, cfg.file, "model.shape");
  // A random model without tokenizer files has ids only (pre-tokenized data).
  const bool has_tokenizer = !cfg.model.path.empty() && (!d.random_init ||
                                                         files::exists(files::join(cfg.model.path, "tokenizer.json")) ||
                                                         files::exists(files::join(cfg.model.path, "tokenizer.model")));
  d.tokenizer = has_tokenizer ? load_tokenizer(cfg.model.path)
                              : ids_only_tokenizer(static_cast<int32_t>(random_shape.vocab_size),
                                                   static_cast<int32_t>(random_shape.bos_token_id),
                                                   static_cast<int32_t>(random_shape.eos_token_id));
  // Tokenized once (before the model loads, so that bad data fails fast), ordered deterministically per epoch, cut
  // into this rank's micro-batches per step.
  // KTO's KL groups: the configured micro-batch size, never the plan's (a resume on a card with other free memory
  // makes the same KL sequences).
  std::optional<KtoSection> kto;
  if (cfg.preference().kto) {
    kto = cfg.kto;
    kto->kl_group_size = cfg.kto.group(cfg.train.micro_batch_size);
  }
  d.data = std::make_unique<TrainData>(cfg.data, cfg.file, *d.tokenizer, s.micro, kto ? &*kto : nullptr);
  const bool on_pairs = static_cast<bool>(cfg.preference());
  if (on_pairs != d.data->pairs())
    fail_key(ErrorKind::Data, cfg.file, "train.objective",
             on_pairs ? "\"" + cfg.train.objective + "\" trains on preference pairs, and the records of " +
                       d.data->config().train_file +
                       " are not: each needs \"prompt\", \"chosen\" and \"rejected\" (data.format \"preference\")"
                 : "\"" + cfg.train.objective + "\", and the records of " + d.data->config().train_file +
                       " are preference pairs {prompt, chosen, rejected}: set train.objective to \"dpo\", "
                       "\"cpo\", \"orpo\" or \"kto\"");
  d.model_config = d.random_init ? random_shape : LlamaConfig::from_file(files::join(cfg.model.path, "config.json"));
  check_data_fits_model(cfg, s, d);
  d.train_file_hash = train_files_hash(d.data->config().train_files);
  if (s.world > 1) {
    check_same_across_ranks(*s.comm, d.train_file_hash, "content of data.train_file");
    // Held-out and exact-match files: ranks that evaluate other records pair their collectives wrongly (other
    // sizes) or average other losses.
    const std::string& eval_file = d.data->config().eval_file;
    check_same_across_ranks(*s.comm, eval_file.empty() ? "" : train_file_hash(eval_file), "content of data.eval_file");
    check_same_across_ranks(*s.comm, cfg.eval.exact_match_file.empty() ? "" : train_file_hash(cfg.eval.exact_match_file),
                            "content of eval.exact_match_file");
    if (!d.random_init)
      check_same_across_ranks(*s.comm, model_fingerprint(cfg.model.path), "model directory (model.path)");
  }
  return d;
}

MicroDecision decide_run_plan(const RunConfig& cfg, const Session& s, const DataStage& d,
                              std::optional<double> budget_gib) {
  PlanInputs plan_in = plan_inputs(cfg, d.model_config, s.per_rank, d.data->max_seq_len(), s.device, s.dtype, s.world,
                                   s.env.local_world_size);
  plan_in.attention_span = d.data->attention_span();
  plan_in.varlen = d.data->varlen_rows();
  plan_in.host_link_bytes_per_s = s.host_link_bytes_per_s;
  PlanRequest request = cfg.train.memory;
  if (budget_gib) request.gpu_memory_gib = *budget_gib;
  return decide_plan_across_ranks(*s.comm, plan_in, request, device_free_gib(s.device.is_cuda(), s.device.index()),
                                  s.per_rank, cfg.train.micro_batch_size);
}

MicroDecision decide_plan_across_ranks(Communicator& comm, PlanInputs in, const PlanRequest& request, double free_gib,
                                       int64_t per_rank, int64_t forced) {
  if (comm.world_size() > 1) {
    // (the slowest host link: an unmeasured one counts as the reference's)
    const double link = in.host_link_bytes_per_s > 0 ? in.host_link_bytes_per_s : kReferenceHostLinkBytesPerS;
    const std::vector<double> least = min_across_ranks(comm, {free_gib, static_cast<double>(in.host_bytes), link});
    free_gib = least[0];
    in.host_bytes = static_cast<uint64_t>(least[1]);
    if (in.host_link_bytes_per_s > 0 || least[2] < kReferenceHostLinkBytesPerS) in.host_link_bytes_per_s = least[2];
  }
  return decide_micro_batch(std::move(in), request, free_gib, per_rank, forced);
}

ModelStage build_model(const RunConfig& cfg, const Session& s, const DataStage& d, bool resuming, Decision decision) {
  ModelStage m;
  // The allocator's settings apply before the model's allocations.
  m.decision = std::move(decision);
  if (s.device.is_cuda()) {
    apply_allocator_settings(m.decision.plan);
    warm_cuda_libraries(s.device, s.dtype);
  }
  if (s.rank0) log::info("plan: " + describe(m.decision));
  // The NF4 base quantized as it streams in; the embeddings and lm_head straight to where the plan keeps them.
  m.load = LoadOptions{s.device, s.dtype};
  m.load.quantize_nf4 = cfg.model.quant == "nf4";
  m.load.embeddings_on_host = m.decision.plan.embeddings_on_host;
  m.load.lm_head_on_host = m.decision.plan.lm_head_on_host;
  m.load.streamed_blocks = m.decision.plan.streamed_blocks;
  m.model = std::make_unique<LlamaModel>(d.random_init ? random_llama(d.model_config, m.load, cfg.train.seed)
                                                       : load_llama(cfg.model.path, m.load));
  LlamaModel& model = *m.model;
  // The adapter's base_model_name_or_path: from the root, so that PEFT's AutoPeftModelForCausalLM finds the base from
  // any directory.
  m.base_name = cfg.model.path.empty() ? "random:" + cfg.model.shape : files::absolute(cfg.model.path);
  model.plan = m.decision.plan;
  model.hold_dequantized(model.plan.dequantized_blocks);
  // The training shape first among the shapes cuDNN is admitted for, before an exact-match evaluation's
  // generation (a new length every token) could take the slots.
  if (s.device.is_cuda()) model.cudnn_admits(s.micro, padded_row_length(d.data->max_seq_len(), model.plan.row_multiple));
  m.full = cfg.train.full_finetune;
  m.lora = LoraConfig::from_json(cfg.lora, cfg.file);
  const LoraConfig& lora = m.lora;
  if (m.full) {
    if (!lora.init_from.empty())
      fail_key(ErrorKind::Config, cfg.file, "lora.init_from", "is not supported with train.full_finetune");
    if (!lora.modules_to_save.empty())
      fail_key(ErrorKind::Config, cfg.file, "lora.modules_to_save",
               "is not used with train.full_finetune (every tensor is trained already)");
    for (auto& [name, t] : model.named_tensors()) t->requires_grad_(true);
    return m;
  }
  attach_lora(model, lora, cfg.train.seed, s.device, at::kFloat);
  attach_modules_to_save(model, lora, s.device);
  // lora.init_from: start from an adapter instead of the fresh init (a resume loads its checkpoint's instead).
  if (!lora.init_from.empty() && !resuming) {
    if (const std::string differ = adapter_differences(lora, model, lora.init_from); !differ.empty())
      fail_at(ErrorKind::Config, cfg.file,
              "lora.init_from " + lora.init_from + ": the adapter does not match the lora section:" + differ);
    load_peft_adapter(model, lora.init_from);
    std::string named;
    if (s.rank0 && !d.random_init && adapter_names_other_base(lora.init_from, cfg.model.path, &named))
      log::warn("lora.init_from " + lora.init_from + " was trained on " + named + ", not on model.path " +
                cfg.model.path + " (adapter_config.json's base_model_name_or_path)");
    // The adapter file's lora_dropout is the run that made it; this run's is the config's.
    model.for_each_linear([&](const std::string&, Linear& l) {
      if (l.lora) l.lora->dropout = lora.dropout;
    });
    if (s.rank0) log::info("LoRA adapters initialised from " + lora.init_from);
  }
  if (cfg.preference().needs_reference()) {  // DPO, KTO
    if (!lora.init_from.empty()) {
      // Read again at a resume, and by every rank: the same file's bytes (a checkpoint records their hash).
      m.reference_hash = train_file_hash(files::join(lora.init_from, kAdapterWeightsFile));
      if (s.world > 1)
        check_same_across_ranks(*s.comm, m.reference_hash,
                                "content of lora.init_from (" + std::string(cfg.preference().name()) + "'s reference)");
      if (resuming)
        if (const std::string differ = adapter_differences(lora, model, lora.init_from); !differ.empty())
          fail_at(ErrorKind::Config, cfg.file,
                  "lora.init_from " + lora.init_from + ": the adapter does not match the lora section:" + differ);
    }
    m.reference = std::make_shared<ReferenceAdapters>(model, lora.init_from);
    if (s.rank0) log::info(cfg.preference().describe() + ": the reference is " + m.reference->describe());
  }
  if (cfg.preference() && !cfg.preference().needs_reference() && s.rank0)
    log::info(cfg.preference().describe() + ": reference-free, on the policy's log-probabilities alone");
  return m;
}

std::optional<ResumePoint> load_resume_point(const RunConfig& cfg, const TrainOptions& options, ModelStage& m) {
  if (options.resume.empty()) return std::nullopt;
  ResumePoint r;
  r.dir = options.resume;
  if (r.dir == "auto") {
    auto latest = find_latest_checkpoint(cfg.output_dir);
    if (!latest) fail_at(ErrorKind::Checkpoint, cfg.output_dir, "--resume auto: no complete checkpoint to resume from");
    r.dir = *latest;
  }
  r.contents = load_checkpoint(r.dir);
  // A checkpoint from before data.packing_strategy packed its rows in order and its data position counts in that
  // order: it resumes with rows packed in order (any setting that gives them), taken as its own setting.
  Json saved_config = r.contents.state.config;
  if (saved_config.contains("data") && saved_config.at("data").is_object() &&
      !saved_config.at("data").contains("packing_strategy")) {
    const DataConfig now = DataConfig::from_json(cfg.data, cfg.file);
    if (packs_best_fit(now, cfg.train.objective != "sft"))
      fail_at(ErrorKind::Checkpoint, r.dir,
              "was written before data.packing_strategy, when packed rows took the documents in order, and its data "
              "position counts in that order: resume it with --set data.packing_strategy=in_order");
    saved_config["data"]["packing_strategy"] = packing_strategy_name(now.packing_strategy);
  }
  // Compared with every default filled in on both sides, so that a key written out at its default is no change;
  // a checkpoint whose config this version no longer reads (keys of earlier versions) is compared as typed.
  std::optional<Json> saved_full;
  try {
    saved_full = RunConfig::from_json(saved_config, r.dir).to_json();
  } catch (const Error&) {
  }
  if (saved_full) check_resume_compatible(*saved_full, cfg.to_json(), r.dir, options.allow_resume_changes);
  else check_resume_compatible(saved_config, cfg.resolved, r.dir, options.allow_resume_changes);
  if (m.full) {
    load_full_weights(*m.model, files::join(r.dir, "model"), m.load);
    return r;
  }
  // The checkpoint's adapter against the run's lora section (as lora.init_from is checked): its own
  // adapter_config.json, not trainer_state.json's config, says what its tensors are.
  if (std::string differ = adapter_differences(m.lora, *m.model, r.dir); !differ.empty()) {
    differ.back() = '.';
    fail_at(ErrorKind::Checkpoint, r.dir,
            "cannot resume: the checkpoint's adapter (adapter_config.json) does not match the lora section:" + differ);
  }
  load_peft_adapter(*m.model, r.dir);
  return r;
}

std::unique_ptr<Parallel> make_parallel(const RunConfig& cfg, ModelStage& m, Communicator& comm) {
  LlamaModel& model = *m.model;
  // The plan's placement of the frozen embeddings and lm_head (decide_plan keeps trained or sharded ones here).
  model.to_host(model.plan.embeddings_on_host, model.plan.lm_head_on_host);
  if (cfg.train.shard == "blocks") {
    // Each rank keeps 1/N of every block's tensors; the optimizer steps the LoRA shards.
    FullyShardOptions so;
    so.shard_embeddings = cfg.train.shard_embeddings;
    return make_sharded(model, comm, so);
  }
  // The plan's block weights streamed from the host: fetched a block ahead by the block hooks.
  if (model.plan.weights_on_host()) m.streamed = std::make_unique<StreamedWeights>(model, model.plan.streamed_blocks);
  NamedTensors params;
  if (m.full) {
    for (auto& [name, t] : model.named_tensors()) params.emplace_back(name, *t);
  } else {
    params = lora_parameters(model);
  }
  return make_data_parallel(comm, std::move(params));
}

std::unique_ptr<AdamW> make_optimizer(const RunConfig& cfg, const NamedTensors& params, bool state_on_host) {
  auto opt = std::make_unique<AdamW>(params, AdamWOptions{cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps,
                                                          cfg.optim.weight_decay, cfg.optim.name == "adamw_8bit"},
                                     state_on_host);
  if (cfg.optim.embedding_lr >= 0) {
    int scaled = 0;
    for (const auto& [n, p] : params)
      if (n == peft_module_key("embed_tokens") || n == peft_module_key("lm_head")) {
        opt->set_lr_scale(n, cfg.optim.embedding_lr / cfg.optim.lr);
        ++scaled;
      }
    if (scaled == 0)
      fail_key(ErrorKind::Config, cfg.file, "optim.embedding_lr",
               "is the learning rate of the tensors lora.modules_to_save trains in full, and there are none: add "
               "lora.modules_to_save or drop the key");
  }
  // LoRA+: PEFT's create_loraplus_optimizer puts lora_B and every 1-D trainable tensor (DoRA's magnitudes) in its
  // groups at lr * ratio; lora_A and the modules_to_save copies stay at lr (here optim.embedding_lr where set). Its
  // loraplus_lr_embedding is for LoRA on embedding layers, which lora.targets cannot select; its groups' weight decay
  // is loraplus_weight_decay, which optim.weight_decay plays here.
  if (cfg.optim.loraplus_lr_ratio > 0) {
    const auto ends_with = [](const std::string& s, const std::string& e) {
      return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
    };
    for (const auto& [n, p] : params)
      if (ends_with(n, ".lora_B.weight") || ends_with(n, ".lora_magnitude_vector"))
        opt->set_lr_scale(n, cfg.optim.loraplus_lr_ratio);
  }
  return opt;
}

Evaluator::Evaluator(const RunConfig& cfg, Session& s, ModelStage& m, DataStage& d, Parallel& parallel,
                     MetricsLog& metrics)
    : cfg_(cfg), s_(s), m_(m), d_(d), parallel_(parallel), metrics_(metrics),
      batches_(d.data->eval_batches(s.comm->rank(), s.world)) {}

std::pair<double, int64_t> Evaluator::loss(int64_t step) {
  try {
    return evaluate(*m_.model, batches_, cfg_.train.loss == "fused", *s_.comm, parallel_.sharded(),
                    cfg_.preference(), m_.reference.get());
  } catch (const c10::Error& e) {
    if (!is_out_of_memory(e)) throw;
    fail(ErrorKind::Device, oom_message(cfg_, s_.device, "evaluation after step " + std::to_string(step), s_.micro,
                                        d_.data->max_seq_len(), m_.decision, e.what_without_backtrace()));
  }
}

// Every rank takes part. Sharded blocks gather collectively: every rank generates every answer (the same greedy
// tokens). Data parallel: each rank generates its share of the records and the counts are summed (rank 0 alone used
// to generate them all while the others waited in their next collective, which timed out after 10 minutes on a long
// evaluation). Rank 0 logs, with examples from its share.
double Evaluator::task_metric(const char* when, int64_t step) {
  GatherScope embeddings(parallel_.sharded(), FullyShard::Root::Embeddings),
      head(parallel_.sharded(), FullyShard::Root::LmHead);
  const bool split = !parallel_.sharded() && s_.world > 1;
  // The generations run at most half a training micro-batch's tokens at once: a token's keys and values in every
  // block (128 KiB at Llama 3.1 8B) and its share of the prompts' forward pass (no gradient; the MLP in the plan's
  // chunks) stay under what a training step holds for a token, even where the plan offloads the block inputs.
  ExactMatchResult em = exact_match(*m_.model, *d_.tokenizer, d_.data->config(), cfg_.eval.exact_match_file,
                                    cfg_.eval.max_examples, cfg_.eval.max_new_tokens, split ? s_.comm->rank() : 0,
                                    split ? s_.world : 1,
                                    std::max<int64_t>(1, std::max<int64_t>(1, s_.micro) * d_.data->max_seq_len() / 2));
  if (split) {
    const auto wire = s_.device.is_cuda() ? at::kFloat : at::kDouble;  // (counts exact in float below 2^24)
    at::Tensor counts = at::tensor(std::vector<double>{static_cast<double>(em.correct), static_cast<double>(em.total)},
                                   at::TensorOptions().dtype(at::kDouble))
                            .to(s_.device, wire);
    s_.comm->all_reduce(counts);
    counts = counts.to(at::kCPU, at::kDouble);
    em.correct = std::llround(counts[0].item<double>());
    em.total = std::llround(counts[1].item<double>());
  }
  std::string line = std::string("exact-match accuracy ") + when + ": " + std::to_string(em.correct) + "/" +
                     std::to_string(em.total) + " (" + std::to_string(100.0 * em.accuracy()).substr(0, 5) + "%)";
  for (const auto& sample : em.samples) line += "\n    e.g. " + sample;
  metrics_.line(line);
  metrics_.exact_match(step, em.correct, em.total);
  return em.accuracy();
}

Checkpointer::Checkpointer(const RunConfig& cfg, Session& s, ModelStage& m, DataStage& d, Parallel& parallel,
                           AdamW& opt, MetricsLog& metrics, const TestHooks& hooks)
    : cfg_(cfg), s_(s), m_(m), d_(d), parallel_(parallel), opt_(opt), metrics_(metrics), hooks_(hooks) {}

void Checkpointer::write_adapter(const std::string& dir) {
  // Full fine-tuning checkpoints hold the weights in the training dtype, so that a resume continues exactly.
  if (m_.full) save_merged_model(*m_.model, cfg_.model.path, files::join(dir, "model"), m_.model->dtype());
  else save_peft_adapter(*m_.model, m_.lora, dir, m_.base_name);
  // A custom chat format goes with the weights, so that a merge or a GGUF export carries it.
  const DataConfig& data = d_.data->config();
  if (data.chat_template == ChatTemplateChoice::Custom) {
    if (m_.full) set_model_chat_format(files::join(dir, "model"), data.chat_format);
    else write_chat_format_files(dir, data.chat_format);
  }
}

void Checkpointer::save(const TrainerState& state) {
  CheckpointContents c;
  c.state = state;
  c.optimizer = opt_.state_tensors();
  c.rng = capture_rng_states();
  c.state.data = d_.data->position();
  int64_t tmp_pid = -1;
  Communicator& comm = *s_.comm;
  if (parallel_.sharded()) {
    // Every rank writes its optimizer shard into rank 0's temporary directory; rank 0 writes the rest (the
    // adapter from the gathered LoRA weights) and completes the checkpoint.
    at::Tensor pid = at::tensor({static_cast<int64_t>(::getpid())}, at::kLong).to(s_.device);
    comm.broadcast(pid, 0);
    tmp_pid = pid.to(at::kCPU).item<int64_t>();
    const std::string tmp = checkpoint_tmp_dir(cfg_.output_dir, state.step, tmp_pid);
    if (s_.rank0) begin_checkpoint_dir(tmp);
    comm.barrier();
    write_optimizer_shard(tmp, comm.rank(), s_.world, c.optimizer);
    c.optimizer.clear();
    c.optimizer_shards = s_.world;
  }
  parallel_.gather_lora();
  if (parallel_.sharded()) comm.barrier();
  if (s_.rank0) {
    std::string path = save_checkpoint(cfg_.output_dir, c, [this](const std::string& dir) { write_adapter(dir); },
                                       cfg_.checkpoint.keep_last, tmp_pid);
    metrics_.line("checkpoint saved: " + path);
  }
  parallel_.release_lora();
  comm.barrier();
  if (hooks_.sleep_after_checkpoint_ms > 0)  // time for a test to kill the process right after a complete checkpoint
    std::this_thread::sleep_for(std::chrono::milliseconds(hooks_.sleep_after_checkpoint_ms));
}

std::string Checkpointer::write_final() { return write_whole(m_.full ? "model" : "adapter", nullptr); }

std::optional<BestRecord> read_best_record(const std::string& dir) {
  try {
    const Json j = read_json_file(files::join(dir, kBestFile), ErrorKind::Checkpoint);
    const BestRecord r{j.at("step").get<int64_t>(), j.at("eval_loss").get<double>()};
    if (r.step < 0) return std::nullopt;
    return r;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

std::string Checkpointer::write_best(int64_t step, double eval_loss) {
  return write_whole(best_dir_name(m_.full), [&](const std::string& dir) {
    files::write_file_atomically(files::join(dir, kBestFile),
                                 Json{{"step", step}, {"eval_loss", eval_loss}}.dump(2) + "\n");
  });
}

std::string Checkpointer::write_whole(const std::string& name, const std::function<void(const std::string&)>& extra) {
  const std::string dir = files::join(cfg_.output_dir, name);
  parallel_.gather_lora();
  if (s_.rank0) {
    // Written beside it and put in its place whole: written in place, a failed write (a full disk) left
    // adapter_model.safetensors without adapter_config.json, and the earlier run's adapter was gone before it began.
    for (const auto& f : files::list_dir(cfg_.output_dir))  // what a killed write left (this run holds output_dir)
      if (f.rfind("." + name + ".tmp-", 0) == 0) files::remove_tree(files::join(cfg_.output_dir, f));
    const std::string tmp = files::join(cfg_.output_dir, "." + name + ".tmp-" + std::to_string(::getpid()));
    files::RemoveUnlessKept cleanup(tmp);
    if (m_.full) {
      save_merged_model(*m_.model, cfg_.model.path, tmp, m_.model->config.dtype);
      if (d_.data->config().chat_template == ChatTemplateChoice::Custom)
        set_model_chat_format(tmp, d_.data->config().chat_format);
    } else {
      files::make_dirs(tmp);
      write_adapter(tmp);
    }
    if (extra) extra(tmp);
    files::sync_path(tmp);
    const std::string old = files::replace_path(tmp, dir, tmp + ".old");
    cleanup.keep();
    files::sync_path(cfg_.output_dir);
    try {  // (the new one is in place: what cannot be removed of the old one is no error of the run)
      if (!old.empty()) files::remove_tree(old);
    } catch (const Error& e) {
      log::warn("could not remove the replaced " + old + " (" + e.what() + "); the run goes on");
    }
    metrics_.write_plot();
  }
  parallel_.release_lora();
  return dir;
}

}  // namespace qt
