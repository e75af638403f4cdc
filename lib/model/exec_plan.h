#pragma once
// How a training step runs, decided once at start and held by the model (../shared/ARCHITECTURE.md, "The execution
// plan"): what is checkpointed, offloaded to the host, kept for the backward pass, chunked, which attention kernel,
// the caching allocator's settings, where the embeddings and lm_head live. decide_plan() picks, from a GPU memory
// budget, the row shape, the model and the host, the plan of least predicted step time whose predicted device
// footprint fits (both predictions calibrated on an H200, docs/PERFORMANCE.md); the user may force any field (the
// run config's train.memory section, parsed by lib/train/run_config.cpp into a PlanRequest). Training, `eval` and
// `generate` build their plans with the same function, so they share defaults. Modules read the plan; nothing reads
// environment switches to find out.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/model/llama_config.h"

namespace qt {

// With checkpointing, what each block keeps from its forward pass beyond its input, a ladder: each rung keeps what
// the ones below keep. Attention: the attention output and log-sum-exp, replayed in the recomputation (no second
// attention forward); Qkv: the rotated q, k, v too (the recomputation's q / k / v projection and RoPE compute only
// what the backward saves); Residual: h + o_proj(attention) too (o_proj likewise). Kept tensors are offloaded with
// the block input when offload is on, and apply to rows of one whole document (others recompute attention).
enum class KeepLevel { Input, Attention, Qkv, Residual };
const char* keep_level_name(KeepLevel level);

enum class AttentionKernel { Flash, Cudnn };

// Whether block `layer` of `layers` is one of `streamed` spread evenly over them (every
// layers / streamed-th block, the last always among them), so that each one's copies hide behind the blocks
// before it (block weights streamed from the host; gate / up outputs offloaded).
bool streamed_block(int64_t layer, int64_t streamed, int64_t layers);

struct ExecPlan {
  bool checkpointing = false;        // per-block activation checkpointing (recompute in the backward pass)
  // With checkpointing, the last this many blocks run without it: their activations kept for the backward pass
  // (no recomputation), where the budget holds them (checkpointing "auto").
  int64_t blocks_without_checkpointing = 0;
  bool offload = false;              // checkpointed block inputs (and kept tensors) in pinned host memory (CUDA)
  KeepLevel keep = KeepLevel::Input;
  // The 16-bit weights dequantized in a block's recomputation kept for its backward pass, and the compute-dtype LoRA
  // factors kept between forward passes (one NF4 dequantization less per linear and step).
  bool keep_dequantized = false;
  int64_t mlp_chunk_tokens = 0;      // > 0: the MLP over chunks of this many tokens, recomputed chunk by chunk
  // The kernel first in line for causal attention on CUDA where rows are whole documents (packed rows take flash
  // varlen either way): cuDNN's fused attention, or torch SDPA's own order (FlashAttention-2 first).
  AttentionKernel attention = AttentionKernel::Cudnn;
  bool expandable_segments = false;  // the CUDA caching allocator grows segments in place (less fragmentation)
  bool embeddings_on_host = false;   // input embeddings in pinned host memory: rows gathered there, shipped
  bool lm_head_on_host = false;      // lm_head in pinned host memory: the loss streams it in vocabulary slices
  // AdamW's moments in pinned host memory, the update on the CPU (parameters and gradients copied over each step).
  bool optimizer_on_host = false;
  // This many blocks' frozen weights in pinned host memory, spread evenly over the model (streamed_block()), each
  // fetched to the GPU ahead of its run and its recomputation behind the blocks before it
  // (lib/model/weight_streaming.h); the others stay on the device. Needs every block checkpointed.
  int64_t streamed_blocks = 0;
  // The first this many blocks hold their frozen NF4 weights dequantized in the compute dtype on the device for the
  // whole run (made on first use; the base never changes), so that no pass dequantizes them again: a block's 16-bit
  // weights (0.41 GiB at 8B) for two or three NF4 dequantizations a step. Where the budget has room (a large GPU).
  int64_t dequantized_blocks = 0;
  // Blocks that keep their activations (no checkpointing, or the last blocks without it) keep the SwiGLU output for
  // down_proj's backward pass too (I elements a token and block) instead of computing it again there from gate and
  // up (an elementwise pass over 3 I elements a token). Checkpointed blocks always keep it: their recomputation made
  // it the moment before their backward pass, so it costs them no memory.
  bool keep_swiglu = false;
  // > 1: rows of one whole document padded at their end to a multiple of this many tokens (padded_row_length), so
  // that cuDNN takes grouped K / V as they are (cudnn_grouped_kv: rows a multiple of 128 tokens) instead of K and V
  // expanded to every query head with their expanded gradients (3 H a token less in the attention backward of the
  // 8B shape). Causal attention keeps the padding out of every real token's output; its outputs carry no target,
  // so that the loss and every gradient are those of the row as it is. The plan sets 128 under cuDNN with head_dim
  // 64 or 128.
  int64_t row_multiple = 1;
  // > 0: the fused loss over a frozen lm_head on the device takes this many tokens a logits tile instead of its own
  // rule's (a tile of at most 192 MiB: 768 tokens at a vocabulary of 128,256 in bf16): fewer, larger GEMMs, for the
  // larger tile's memory. The plan sets 2048 where the budget holds it (measured 7-8% faster than 768 on an H100,
  // bench_fused_ce).
  int64_t loss_chunk_tokens = 0;

  // With checkpointing and keep "attention" or above, this many checkpointed blocks (the last ones checkpointed)
  // keep their MLP's gate / up projection output [tokens, 2 I] on the device for their recomputation, which then
  // runs no gate / up GEMM (4 T H I FLOPs, 11 ms at 8B 1 x 32768 on an H100) for 2 I e bytes a token and block:
  // per byte about twice the time a block without checkpointing saves (which keeps some 4 I + 2 H + q + 2 kv).
  // Packed rows too (the kept output needs none of the attention output the ladder keeps for whole documents).
  int64_t gate_up_kept_blocks = 0;
  // With offload, this many checkpointed blocks before those (spread evenly over them, the first always among them)
  // keep their gate / up output too, in pinned host memory: copied out behind the next blocks' forward passes and
  // fetched back a block ahead of their recomputation, where PCIe has time the block inputs leave (8B 1 x 32768:
  // a block's input and kept tensors take about 22 ms of a 44 ms forward pass, its gate / up output 34 ms more).
  // Without offload (the CPU) they keep it as gate_up_kept_blocks' do.
  int64_t gate_up_offloaded_blocks = 0;

  bool keeps(KeepLevel level) const { return checkpointing && keep >= level; }
  // The checkpointed blocks: all but the last blocks_without_checkpointing of `layers`.
  int64_t checkpointed_blocks(int64_t layers) const {
    return checkpointing ? layers - std::clamp<int64_t>(blocks_without_checkpointing, 0, layers) : 0;
  }
  // Whether block `layer` of `layers` keeps its gate / up output on the device (gate_up_kept_blocks).
  bool keeps_gate_up_on_device(int64_t layer, int64_t layers) const {
    if (!keeps(KeepLevel::Attention) || gate_up_kept_blocks <= 0) return false;
    const int64_t checkpointed = checkpointed_blocks(layers);
    return layer < checkpointed && layer >= checkpointed - gate_up_kept_blocks;
  }
  // Whether block `layer` of `layers` is one of gate_up_offloaded_blocks.
  bool offloads_gate_up(int64_t layer, int64_t layers) const {
    if (!keeps(KeepLevel::Attention) || gate_up_offloaded_blocks <= 0) return false;
    const int64_t before = checkpointed_blocks(layers) - std::max<int64_t>(0, gate_up_kept_blocks);
    // (Spread as streamed_block spreads, mirrored: the first always among them and the last only when all are, so
    // that the first block of the backward pass, which nothing hides its fetch behind, is not one of them.)
    return layer >= 0 && layer < before && streamed_block(before - 1 - layer, gate_up_offloaded_blocks, before);
  }
  // Whether block `layer` of `layers` keeps its gate / up output, on the device or offloaded.
  bool keeps_gate_up(int64_t layer, int64_t layers) const {
    return keeps_gate_up_on_device(layer, layers) || offloads_gate_up(layer, layers);
  }
  bool weights_on_host() const { return streamed_blocks > 0; }
};

// The length a row of S tokens runs at under a plan's row_multiple m: the next multiple of m where S is not one and
// the padding is at most 1/64 of the row (S >= 64 m: from 8,192 tokens for 128), else S.
int64_t padded_row_length(int64_t S, int64_t multiple);

// What the user asked for (train.memory); unset fields are the plan's to choose.
struct PlanRequest {
  std::optional<double> gpu_memory_gib;  // the budget; default: the device's free memory at start, less a margin
  // Unset ("auto", the default): the plan may run without it, or without it for the last blocks, where the budget
  // holds their activations; with no budget (the CPU) and with sharded blocks, every block is checkpointed.
  std::optional<bool> checkpointing;
  std::optional<int64_t> blocks_without_checkpointing;
  std::optional<bool> offload;
  std::optional<KeepLevel> keep;
  std::optional<bool> keep_dequantized;
  std::optional<int64_t> mlp_chunk_tokens;
  AttentionKernel attention = AttentionKernel::Cudnn;
  std::optional<bool> expandable_segments;
  std::optional<bool> embeddings_on_host;
  std::optional<bool> lm_head_on_host;
  std::optional<bool> optimizer_on_host;
  std::optional<bool> weights_on_host;   // "host": every block streamed unless streamed_blocks says how many
  std::optional<int64_t> streamed_blocks;
  std::optional<int64_t> dequantized_blocks;  // "auto" (unset): as many as the budget holds
  std::optional<int64_t> gate_up_kept_blocks;  // "auto" (unset): as many as the budget holds
  std::optional<int64_t> gate_up_offloaded_blocks;  // "auto" (unset): as many as PCIe's time and the host hold
  std::optional<bool> keep_swiglu;            // "auto" (unset): where the budget holds it
  std::optional<int64_t> loss_chunk_tokens;   // "auto" (unset): 2048 where the budget holds it; 0: the loss's rule
  // A single-process run that runs out of device memory before its first step completes (loading, the CUDA
  // libraries' handles, step 1) starts again under a leaner plan, at most twice (lib/train/trainer.cpp).
  bool replan_on_oom = true;

  // Parses the train.memory object; `file` names the run config in errors.
  static PlanRequest from_json(const Json& json, const std::string& file);
  // Every key, "auto" where the plan decides (what `qlora-train config --print` shows; from_json reads it back).
  Json to_json() const;
};

// AdamW's two 8-bit moments a trainable element (optim.name "adamw_8bit", lib/kernels/adamw_8bit.h): a code each
// and an fp32 scale each a 256-element block (the few tensors under 4,096 elements that keep fp32 moments are not
// told apart).
inline constexpr double kEightBitMomentBytes = 2.0 + 8.0 / 256;

// What the plan is decided from.
struct PlanInputs {
  LlamaConfig model;
  int64_t micro_batch = 1;       // rows per forward pass on this rank
  int64_t seq = 2048;            // tokens per row
  bool cuda = false;
  // The GPU's memory bandwidth, bytes/s, from its memory clock and bus width (device_memory_bytes_per_s); 0: the
  // H200's, on which the cost model's rates were measured. Its memory-bound terms scale by the square root of the
  // H200's over this (an H100 SXM: 1.21 times as long; fitted, exec_plan.cpp's memory_slowdown); the matrix and
  // attention rates do not (the same tensor cores).
  double memory_bytes_per_s = 0;
  // The host link's pinned copy rate, bytes/s, the lesser of the two directions (host_link_bytes_per_s, measured at
  // start on a device with the reference's rates, device_has_reference_rates; the least over the ranks); 0: the
  // reference's (kReferenceHostLinkBytesPerS, PCIe 5.0 x16 as on the H100 and
  // H200 machines the copy rates were fitted on). Every PCIe term (offloaded activations, streamed weights, lm_head
  // and AdamW on the host) takes as much longer as the link is slower; within 10% of the reference, none.
  double host_link_bytes_per_s = 0;
  bool nf4 = true;               // NF4 base (else 16-bit)
  int64_t lora_params = 0;       // trainable LoRA elements (fp32, with gradient and AdamW state)
  int64_t full_params = 0;       // tensors trained in full (modules_to_save, full fine-tuning): fp32 + state
  double optimizer_state_bytes = 8.0;  // AdamW's moments a trainable element: 8 (fp32), or kEightBitMomentBytes
  bool embeddings_trained = false, lm_head_trained = false;  // modules_to_save: they stay on the device
  bool sharded = false;          // FullyShard: the blocks' bytes divided over `world` ranks
  int world = 1;
  int64_t element_size = 2;      // compute dtype
  uint64_t host_bytes = 0;       // this rank's share of the host's memory
  // LoRA dropout on an MLP linear: the MLP never runs in chunks (a chunk's recomputation would draw other masks).
  bool mlp_dropout = false;
  // LoRA dropout: the widest input of a linear it drops (0: none), whose mask is drawn again in its backward pass,
  // and the inputs of all the linears it drops in a block, summed.
  int64_t dropout_width = 0;
  int64_t dropout_widths = 0;
  // The tokens a token attends over, as causal attention's FLOPs count them: the documents' token-weighted mean
  // length (0: seq, one whole document a row); `varlen`: rows of several documents or padding, which take
  // FlashAttention-2's varlen kernel.
  double attention_span = 0;
  bool varlen = false;
  // DPO (train.objective "dpo"): each micro-batch runs the reference's forward pass without gradient before the
  // policy's; `reference_adapters`: lora.init_from's adapter, kept as a frozen fp32 copy (lora_params elements).
  bool dpo_reference = false;
  bool reference_adapters = false;
  // KTO with its KL term: each micro-batch's passes (seq: half a row, split_pairs) are the reference over the records
  // and over their KL sequences, the policy over the KL sequences without gradient, then over the records with it:
  // two forward passes without gradient more than DPO's one (apo_zero_unpaired: DPO's).
  bool kto_kl = false;
  std::string file;              // the run config, for errors
};

// The device memory a plan is predicted to take, by term (bytes).
struct Footprint {
  std::vector<std::pair<std::string, double>> terms;
  double total() const;
  Json to_json() const;  // {term: GiB, ..., "total": GiB}
};

Footprint predict_footprint(const PlanInputs& in, const ExecPlan& plan);
// The budget (GiB) for the plan after one that ran out of device memory before its first step completed: 5% under
// the lesser of its budget and its predicted footprint, so that it cannot be chosen again; and where the failure
// measured the tensors that plan needed at least (`needed_gib`: the caching allocator's bytes in use when an
// allocation failed, plus that allocation), under its budget by as much more as they took than predicted, and 0.25
// GiB: the long rows' first plans were short by more than 5% (8B 1 x 117696 at 22.3 GiB, H200: three plans each 5%
// under the last ran out of memory).
double replan_budget_gib(double budget_gib, const Footprint& footprint, std::optional<double> needed_gib);
// One block's SwiGLU computed again in down_proj's backward pass (where it is not kept), as the cost model counts it.
double swiglu_recompute_s(const PlanInputs& in);
// The pinned host memory a plan takes on CUDA, by term: streamed block weights, the offload pool (every checkpointed
// block's input and kept tensors), embeddings / lm_head / AdamW's state on the host. decide_plan() takes only plans
// that pin at most three quarters of PlanInputs::host_bytes.
Footprint predict_host(const PlanInputs& in, const ExecPlan& plan);

// The time a training step of one micro-batch (its forward and backward pass and the update) is predicted to take
// under a plan, by term: seconds at the rates of an H200 in bf16, a cost model for comparing plans (its formula,
// constants and error on each measured row: docs/PERFORMANCE.md, "Cost model (issue 27)").
struct StepTime {
  std::vector<std::pair<std::string, double>> terms;
  double total() const;
  Json to_json() const;  // {term: s, ..., "total": s}
};

StepTime predict_step_time(const PlanInputs& in, const ExecPlan& plan);

// Of the candidate plans whose predicted footprint fits the budget (request.gpu_memory_gib, or `free_gib` of the
// device when unset; on the CPU without an explicit budget, every candidate), the one of least predicted step time.
// Throws qt::Error(Config) naming the keys when the request is inconsistent, and naming the budget, the figure the
// leanest plan needs and what lowers it when nothing fits.
struct Decision {
  ExecPlan plan;
  Footprint footprint;
  Footprint host;  // the pinned host memory it takes, by term (predict_host)
  StepTime step;
  double budget_gib = -1;  // < 0: none (CPU without an explicit budget)
  int64_t layers = 0;      // the model's blocks (for describe())
  double memory_bytes_per_s = 0;  // PlanInputs::memory_bytes_per_s (for describe())
  double host_link_bytes_per_s = 0;  // PlanInputs::host_link_bytes_per_s (for describe())
  // A row's tokens, and as the plan runs it (padded for cuDNN: ExecPlan::row_multiple); for describe().
  int64_t seq = 0, run_seq = 0;
  // Every other candidate that fits the budget, with its predicted footprint (bytes) and step time (s), in the
  // order weighed (`qlora-train plan --alternatives N` prints the fastest); empty where nothing fits.
  struct Alternative {
    ExecPlan plan;
    double bytes = 0;
    double step_s = 0;
  };
  std::vector<Alternative> alternatives;
};
Decision decide_plan(const PlanInputs& in, const PlanRequest& request, double free_gib = -1);

// The micro-batch too (train.micro_batch_size 0, "auto"): of the micro-batches that divide a rank's `per_rank` rows,
// the one whose plan (decide_plan, with in.micro_batch that size) is predicted fastest per optimizer step (its step
// time times the micro-batches a step), the larger on a near tie (within 2%: the cost model is linear in tokens,
// launches and small GEMMs are not); `forced` > 0 takes that one. Refused as decide_plan refuses the smallest.
struct MicroDecision {
  int64_t micro_batch = 1;
  Decision decision;
  // Each size weighed that fits: its plan's predicted time per optimizer step (as compared) and footprint (bytes).
  struct Size {
    int64_t micro_batch = 1;
    double step_s = 0, bytes = 0;
    std::string plan;  // describe(its decision)
  };
  std::vector<Size> sizes;
};
MicroDecision decide_micro_batch(PlanInputs in, const PlanRequest& request, double free_gib, int64_t per_rank,
                                 int64_t forced);

// One line for the log, and the whole decision as JSON (metrics.jsonl, the bench JSON).
std::string describe(const Decision& d);
std::string describe(const ExecPlan& p, int64_t layers);  // the plan's fields alone
Json to_json(const Decision& d);
// A plan's fields under train.memory's keys (what `--set train.memory.KEY=VALUE` forces; to_json's first fields).
Json plan_fields(const ExecPlan& p);

// The device's free memory in GiB (CUDA: cudaMemGetInfo, which creates the context); -1 on the CPU.
double device_free_gib(bool cuda, int device_index = 0);
// The device's memory bandwidth in bytes/s (2 x its memory clock x its bus width); 0 on the CPU or where CUDA does
// not say.
double device_memory_bytes_per_s(bool cuda, int device_index = 0);
// The H200's, as device_memory_bytes_per_s reads it (3,201 MHz x 6,144 bits, DDR): the cost model's reference.
constexpr double kReferenceMemoryBytesPerS = 2 * 3201e6 * 6144 / 8;
// The host link's pinned copy rate in bytes/s, the lesser of device to host and host to device (32 MiB copies on a
// stream of its own, the best of three each way, outside the caching allocators: it may run before the allocator's
// settings apply); 0 on the CPU or where a CUDA call fails. Tens of milliseconds, once at the start.
double host_link_bytes_per_s(bool cuda, int device_index = 0);
// PCIe 5.0 x16's pinned copy rate (about 55 GB/s each way, nominally; the links were not probed where the cost
// model's copy rates were fitted, H100 and H200 machines on PCIe 5.0).
constexpr double kReferenceHostLinkBytesPerS = 55e9;
// Whether the device's matrix and attention rates are about the cost model's (a Hopper GPU, compute capability 9.x:
// the H100s and H200s its rates were measured on). Only there does the trainer take the host link's measured rate:
// elsewhere the compute differs as much as the link (an RTX 4090's GEMMs run about 4.7 times as long as an H200's
// and its PCIe 4.0 link moves half as much, so copies hide behind its compute better, not worse), and the
// reference's link keeps the copies' share of the step nearer the truth.
bool device_has_reference_rates(bool cuda, int device_index = 0);

// Applies the allocator settings of the plan; must run before the first CUDA allocation of the process.
void apply_allocator_settings(const ExecPlan& plan);

}  // namespace qt
