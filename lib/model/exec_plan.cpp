#include "lib/model/exec_plan.h"

#include <c10/core/AllocatorConfig.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>

#include "lib/core/error.h"
#include "lib/kernels/attention_core.h"
#include "lib/kernels/fused_linear_ce.h"
#include "lib/kernels/nf4_dequant.h"

namespace qt {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Device memory outside the caching allocator: the CUDA context, cuBLAS / cuBLASLt / cuDNN handles and the modules
// their kernels load. Measured on an H200 (docs/PERFORMANCE.md, "Memory budget"): the device memory a run took less
// the allocator's reserved peak, 0.82-0.83 GiB on the 8B and 1B rows (0.69 GiB in a torch process after a GEMM and
// cuDNN's and flash attention's forward and backward).
constexpr double kContextBytes = 0.85 * kGiB;
// The part of kContextBytes that exists when the plan reads the device's free memory: the free figure is read after
// it, so it is added back. 0.51 GiB in a fresh torch process on an H200; in qlora-train 0.60 (the holder's free
// memory less the free memory the plan read, 8B at 7.44, 8, 22.3 and 44.7 GiB, eleventh session): with the margin
// below, a run with B GiB free plans within B - 0.1.
constexpr double kContextAtStartGiB = 0.6;
// What the budget keeps back when it is the device's free memory (other processes, the driver's own growth).
constexpr double kFreeMarginGiB = 0.1;
// The caching allocator's reserve beyond its peak for checkpointed blocks' kept gate / up outputs, a share of their
// bytes (predict_footprint).
constexpr double kGateUpKeptReserve = 0.01;

std::string fmt_gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", bytes / kGiB);
  return buf;
}

int64_t keep_width(const LlamaConfig& c, KeepLevel k) {  // elements per token and layer kept beyond the input
  int64_t w = 0;
  if (k >= KeepLevel::Attention) w += c.q_size();
  if (k >= KeepLevel::Qkv) w += c.q_size() + 2 * c.kv_size();
  if (k >= KeepLevel::Residual) w += c.hidden_size;
  return w;
}

// The pinned host bytes of one block's frozen weights (NF4 codes and statistics, or the 16-bit base; its norms).
double block_host_bytes(const PlanInputs& in) {
  const LlamaConfig& c = in.model;
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  const double e = static_cast<double>(in.element_size);
  const double per_weight = in.nf4 ? 0.5 + 1.0 / 64 + 4.0 / (64 * 256) : e;
  return (H * q + 2 * H * kv + q * H + 3 * H * I) * per_weight + 2 * H * e;
}

// A block's linear weights (elements).
double block_params(const LlamaConfig& c) {
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  return H * q + 2 * H * kv + q * H + 3 * H * I;
}

// Bytes a token that a checkpointed block keeps for its backward pass, offloaded or not: its input, the keep
// ladder's tensors, and from keep "attention" the softmax statistics (fp32 a query head), which go with them.
double kept_bytes_per_token(const LlamaConfig& c, KeepLevel level, int64_t element_size) {
  return static_cast<double>(element_size) * static_cast<double>(c.hidden_size + keep_width(c, level)) +
         (level >= KeepLevel::Attention ? 4.0 * static_cast<double>(c.num_attention_heads) : 0.0);
}

// The checkpointed blocks that keep their gate / up output and skip its GEMM in their recomputation
// (ExecPlan::gate_up_kept_blocks on the device, gate_up_offloaded_blocks in pinned host memory): where the keep
// ladder's stash exists (keep "attention" or above; packed rows too), the MLP runs whole and the base is NF4 (gate /
// up projected as one group). (Where gate or up carries no LoRA adapter the group does not apply either: the
// prediction is then the saving that is not made.) The offloaded ones stay on the device without offload on CUDA.
struct GateUpKept {
  double device = 0, host = 0;
  double total() const { return device + host; }
};
GateUpKept gate_up_kept(const PlanInputs& in, const ExecPlan& p) {
  if (!p.keeps(KeepLevel::Attention) || p.mlp_chunk_tokens > 0 || !in.nf4) return {};
  const int64_t checkpointed = p.checkpointed_blocks(in.model.num_hidden_layers);
  const int64_t device = std::clamp<int64_t>(p.gate_up_kept_blocks, 0, checkpointed);
  const int64_t offloaded = std::clamp<int64_t>(p.gate_up_offloaded_blocks, 0, checkpointed - device);
  if (p.offload && in.cuda) return {static_cast<double>(device), static_cast<double>(offloaded)};
  return {static_cast<double>(device + offloaded), 0.0};
}

// Whether keeping to `level` fits half of this rank's host memory when offloaded (the pinned pool holds every
// layer's kept tensors at once).
bool host_holds(const PlanInputs& in, KeepLevel level) {
  const double per_layer = static_cast<double>(in.micro_batch * in.seq) * kept_bytes_per_token(in.model, level, in.element_size);
  return per_layer * static_cast<double>(in.model.num_hidden_layers) <= static_cast<double>(in.host_bytes) / 2;
}

std::optional<bool> tri(const Json& v, const std::string& file, const std::string& key) {
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_string() && v.get<std::string>() == "auto") return std::nullopt;
  fail_key(ErrorKind::Config, file, key, "must be true, false or \"auto\" (got " + v.dump() + ")");
}

}  // namespace

int64_t padded_row_length(int64_t S, int64_t multiple) {
  if (multiple <= 1 || S % multiple == 0 || S < 64 * multiple) return S;
  return (S / multiple + 1) * multiple;
}

const char* keep_level_name(KeepLevel level) {
  switch (level) {
    case KeepLevel::Input: return "input";
    case KeepLevel::Attention: return "attention";
    case KeepLevel::Qkv: return "qkv";
    case KeepLevel::Residual: return "residual";
  }
  return "?";
}

PlanRequest PlanRequest::from_json(const Json& json, const std::string& file) {
  PlanRequest r;
  const std::string at = "train.memory.";
  if (!json.is_object()) fail_key(ErrorKind::Config, file, "train.memory", "must be a JSON object");
  reject_unknown_keys(json, {"gpu_memory_gib", "checkpointing", "blocks_without_checkpointing", "offload", "keep",
                             "keep_dequantized", "mlp_chunk_tokens", "attention", "expandable_segments", "embeddings",
                             "lm_head", "optimizer", "weights", "streamed_blocks", "dequantized_blocks", "keep_swiglu",
                             "loss_chunk_tokens", "gate_up_kept_blocks", "gate_up_offloaded_blocks", "replan_on_oom"},
                      file, "train.memory.", ErrorKind::Config);
  if (json.contains("gpu_memory_gib") && !json["gpu_memory_gib"].is_null() && json["gpu_memory_gib"] != "auto") {
    const Json& v = json["gpu_memory_gib"];
    // (At most 2^20 GiB: beyond, the byte counts the plan compares overflow to inf.)
    if (!v.is_number() || !(v.get<double>() > 0) || !(v.get<double>() <= 1048576.0))
      fail_key(ErrorKind::Config, file, at + "gpu_memory_gib",
               "must be a number of GiB > 0 and at most 1048576 (got " + v.dump() + ")");
    r.gpu_memory_gib = v.get<double>();
  }
  if (json.contains("checkpointing")) r.checkpointing = tri(json["checkpointing"], file, at + "checkpointing");
  // Block counts: "auto" (unset) or an integer >= 0.
  auto blocks = [&](const char* key, const std::string& what) -> std::optional<int64_t> {
    if (!json.contains(key) || json[key] == "auto") return std::nullopt;
    const Json& v = json[key];
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      fail_key(ErrorKind::Config, file, at + key,
               "must be \"auto\" or a number of blocks >= 0" + what + " (got " + v.dump() + ")");
    return v.get<int64_t>();
  };
  r.blocks_without_checkpointing = blocks("blocks_without_checkpointing", "");
  r.streamed_blocks = blocks("streamed_blocks", " whose weights stream from the host");
  r.dequantized_blocks = blocks("dequantized_blocks", " whose weights stay dequantized on the device");
  r.gate_up_kept_blocks = blocks("gate_up_kept_blocks", " whose gate / up output stays for the recomputation");
  r.gate_up_offloaded_blocks =
      blocks("gate_up_offloaded_blocks", " whose gate / up output waits in host memory for the recomputation");
  if (json.contains("offload")) r.offload = tri(json["offload"], file, at + "offload");
  if (json.contains("keep_dequantized")) r.keep_dequantized = tri(json["keep_dequantized"], file, at + "keep_dequantized");
  if (json.contains("keep_swiglu")) r.keep_swiglu = tri(json["keep_swiglu"], file, at + "keep_swiglu");
  if (json.contains("expandable_segments"))
    r.expandable_segments = tri(json["expandable_segments"], file, at + "expandable_segments");
  if (json.contains("replan_on_oom")) {
    const Json& v = json["replan_on_oom"];
    if (!v.is_boolean())
      fail_key(ErrorKind::Config, file, at + "replan_on_oom", "must be true or false (got " + v.dump() + ")");
    r.replan_on_oom = v.get<bool>();
  }
  if (json.contains("keep")) {
    const Json& v = json["keep"];
    const std::string s = v.is_string() ? v.get<std::string>() : "";
    if (s == "input") r.keep = KeepLevel::Input;
    else if (s == "attention") r.keep = KeepLevel::Attention;
    else if (s == "qkv") r.keep = KeepLevel::Qkv;
    else if (s == "residual") r.keep = KeepLevel::Residual;
    else if (s != "auto")
      fail_key(ErrorKind::Config, file, at + "keep",
               "must be \"auto\", \"input\", \"attention\", \"qkv\" or \"residual\" (got " + v.dump() + ")");
  }
  if (json.contains("mlp_chunk_tokens")) {
    const Json& v = json["mlp_chunk_tokens"];
    // (2^64 - 1, kept unsigned by nlohmann, read as int64 is -1: auto.)
    if (!v.is_number_integer() || v.get<int64_t>() < -1 || (v.is_number_unsigned() && v.get<int64_t>() < 0))
      fail_key(ErrorKind::Config, file, at + "mlp_chunk_tokens",
               "must be -1 (auto), 0 (off) or a token count (got " + v.dump() + ")");
    if (v.get<int64_t>() >= 0) r.mlp_chunk_tokens = v.get<int64_t>();
  }
  if (json.contains("loss_chunk_tokens")) {
    const Json& v = json["loss_chunk_tokens"];
    if (!v.is_number_integer() || v.get<int64_t>() < -1 || (v.is_number_unsigned() && v.get<int64_t>() < 0) ||
        (v.get<int64_t>() > 0 && v.get<int64_t>() < 16) || v.get<int64_t>() > 65536)
      fail_key(ErrorKind::Config, file, at + "loss_chunk_tokens",
               "must be -1 (auto), 0 (the loss's own rule) or a token count from 16 to 65536 (got " + v.dump() + ")");
    if (v.get<int64_t>() >= 0) r.loss_chunk_tokens = v.get<int64_t>();
  }
  if (json.contains("attention")) {
    const Json& v = json["attention"];
    const std::string s = v.is_string() ? v.get<std::string>() : "";
    if (s == "cudnn") r.attention = AttentionKernel::Cudnn;
    else if (s == "flash") r.attention = AttentionKernel::Flash;
    else fail_key(ErrorKind::Config, file, at + "attention", "must be \"cudnn\" or \"flash\" (got " + v.dump() + ")");
  }
  for (const char* k : {"embeddings", "lm_head", "optimizer", "weights"}) {
    if (!json.contains(k)) continue;
    const Json& v = json[k];
    const std::string s = v.is_string() ? v.get<std::string>() : "";
    std::optional<bool> host;
    if (s == "host") host = true;
    else if (s == "device") host = false;
    else if (s != "auto")
      fail_key(ErrorKind::Config, file, at + k, "must be \"auto\", \"device\" or \"host\" (got " + v.dump() + ")");
    const std::string key = k;
    (key == "embeddings" ? r.embeddings_on_host
     : key == "lm_head"  ? r.lm_head_on_host
     : key == "optimizer" ? r.optimizer_on_host
                          : r.weights_on_host) = host;
  }
  return r;
}

Json PlanRequest::to_json() const {
  auto opt = [](const std::optional<bool>& b) { return b ? Json(*b) : Json("auto"); };
  auto place = [](const std::optional<bool>& b) { return b ? Json(*b ? "host" : "device") : Json("auto"); };
  return Json{{"gpu_memory_gib", gpu_memory_gib ? Json(*gpu_memory_gib) : Json("auto")},
              {"checkpointing", opt(checkpointing)},
              {"blocks_without_checkpointing",
               blocks_without_checkpointing ? Json(*blocks_without_checkpointing) : Json("auto")},
              {"offload", opt(offload)},
              {"keep", keep ? Json(keep_level_name(*keep)) : Json("auto")},
              {"keep_dequantized", opt(keep_dequantized)},
              {"mlp_chunk_tokens", mlp_chunk_tokens ? Json(*mlp_chunk_tokens) : Json(-1)},
              {"attention", attention == AttentionKernel::Cudnn ? "cudnn" : "flash"},
              {"expandable_segments", opt(expandable_segments)},
              {"embeddings", place(embeddings_on_host)},
              {"lm_head", place(lm_head_on_host)},
              {"optimizer", place(optimizer_on_host)},
              {"weights", place(weights_on_host)},
              {"streamed_blocks", streamed_blocks ? Json(*streamed_blocks) : Json("auto")},
              {"dequantized_blocks", dequantized_blocks ? Json(*dequantized_blocks) : Json("auto")},
              {"keep_swiglu", opt(keep_swiglu)},
              {"loss_chunk_tokens", loss_chunk_tokens ? Json(*loss_chunk_tokens) : Json(-1)},
              {"gate_up_kept_blocks", gate_up_kept_blocks ? Json(*gate_up_kept_blocks) : Json("auto")},
              {"gate_up_offloaded_blocks", gate_up_offloaded_blocks ? Json(*gate_up_offloaded_blocks) : Json("auto")},
              {"replan_on_oom", replan_on_oom}};
}

bool streamed_block(int64_t layer, int64_t streamed, int64_t layers) {
  if (streamed <= 0 || layers <= 0) return false;
  if (streamed >= layers) return true;
  return (layer + 1) * streamed / layers > layer * streamed / layers;
}

double Footprint::total() const {
  double t = 0;
  for (const auto& [name, bytes] : terms) t += bytes;
  return t;
}

Json Footprint::to_json() const {
  Json j = Json::object();
  for (const auto& [name, bytes] : terms) j[name] = std::round(bytes / kGiB * 1000) / 1000;
  j["total"] = std::round(total() / kGiB * 1000) / 1000;
  return j;
}

namespace {

// Whether rows take `kernel`'s plain causal attention under cuDNN: rows of one whole document each (packed rows and
// padding take FlashAttention-2's varlen kernel, as do rows longer than a sliding window, or a dense mask).
bool whole_rows_under_cudnn(const PlanInputs& in, AttentionKernel kernel) {
  const auto& window = in.model.sliding_window;
  return kernel == AttentionKernel::Cudnn && !in.varlen && !(window && in.seq > *window);
}

// The inputs as a plan runs them: rows padded for cuDNN (row_multiple) are that many tokens long.
PlanInputs as_run(const PlanInputs& in, const ExecPlan& p) {
  PlanInputs r = in;
  r.seq = padded_row_length(in.seq, p.row_multiple);
  return r;
}

// One checkpointed block's recomputation and backward pass, itemized from the code (ninth session; the fit of 1.5
// blocks' activations before it held for rows up to 32k tokens, but rows that keep the attention output with the
// MLP in chunks peaked 1.5 GiB (8B 1 x 61100) and 3.4 GiB or more (1 x 117696) above it, in the attention
// backward). The peak is the largest of three moments: the attention backward, the MLP's SwiGLU backward, and
// gate / up's backward with its weight dequantized for it. Per token, in elements of e unless said otherwise:
//   held through the step: cos and sin (2 D; the embedding output is the first block's input, counted with the
//     kept inputs: offloaded, it goes to the host with the others since the tenth session, an empty leaf anchoring
//     its node, the trainer letting it go; until then the leaf made of it held it, 1 H); not the final norm's
//     output (the trainer lets it go after the loss's forward pass since the ninth session; counted until the
//     twelfth); with
//     keep >= attention the softmax statistics (fp32, a query head) of every block (offloaded with the attention
//     output since the tenth session: kept_activations counts them with the other kept tensors);
//   the incoming gradient and the input norm's output (2 H; the recomputation's unused block output, 1 H until the
//     tenth session, is one element: unwritten_output);
//   what the recomputation makes and the attention backward reads: the rotated q below keep qkv, K and V
//     (expanded to the query heads where cuDNN does not take them grouped: rows not a multiple of 128 tokens that
//     the plan does not pad (row_multiple), FlashAttention-2), the attention output and its statistics (fp32) below keep attention, and with Qwen3's
//     q / k norms the projection output (their backward reads it) or, kept, the rotated copies the fused kernel
//     makes of it;
//   the attention backward: the MLP half's gradient (H), o_proj's input gradient (q), dq, dk and dv, cuDNN's fp32
//     dQ accumulator and softmax sums (4 (q + heads) bytes), and with grouped K / V cuDNN's dK and dV partials at
//     every query head (2 q; cuDNN's GQA backward engines document dk_ws / dv_ws of B S H_q D elements each, summed
//     into dk and dv after). Those two changes (twelfth session) fit the eleventh session's rows: their allocated
//     peaks exceeded the tensors predicted by 1 H a token (0.97 GiB at 1 x 117,760, 2.3 at 1 x 287,600; 8B, q = H);
//     the next allocator history is to show where (scripts/next_gpu_calls.sh 1);
//   the MLP backward: the residual below keep residual (H), the (chunk's) gate / up output, SwiGLU output and
//     their gradients (6 I + H; in gate / up's backward 2 I + 2 H and the weight), and with chunks the input
//     gradient accumulated over the row (H (T + chunk)).
// dh of the loss (fp32 H) is dead by then: loss_chunk counts it. The blocks' weights held dequantized
// (keep_dequantized) are there throughout. Against the allocated peaks measured on an H200 (PERFORMANCE.md, "Ninth
// session"): -1.6% to +0.9% on 13 rows from 1 x 2048 to 1 x 117696 tokens and 70B 1 x 15104.
double checkpointed_working_set(const PlanInputs& in, const ExecPlan& p, double mlp_tokens) {
  const LlamaConfig& c = in.model;
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  const double D = static_cast<double>(c.head_dim);
  const double heads = static_cast<double>(c.num_attention_heads);
  const double T = static_cast<double>(in.micro_batch * in.seq), e = static_cast<double>(in.element_size);
  const double block_params = H * q + 2 * H * kv + q * H + 3 * H * I;
  const int k = static_cast<int>(p.keep);
  const bool attention_kept = k >= static_cast<int>(KeepLevel::Attention);
  const bool qkv_kept = k >= static_cast<int>(KeepLevel::Qkv);
  const bool residual_kept = k >= static_cast<int>(KeepLevel::Residual);
  // (Rows of several documents or padding take FlashAttention-2's varlen kernel, whose dk and dv are at the query
  // width too.)
  // (in.seq: the row as the plan runs it, padded for cuDNN where row_multiple says so.)
  const bool grouped = whole_rows_under_cudnn(in, p.attention) && cudnn_grouped_kv(in.seq, c.head_dim);
  const double kv_held = grouped ? kv : q;  // K and V as the attention backward holds them
  const double chunked = mlp_tokens < T ? e * H * (T + mlp_tokens) : 0.0;
  const double common = e * T * 2 * D + 2 * e * T * H +
                        e * T * ((qkv_kept ? 0.0 : q) + (grouped && !qkv_kept ? 2 * kv : 0.0) + (grouped ? 0.0 : 2 * q) +
                                 (attention_kept ? 0.0 : q) + (c.qk_norm ? q + 2 * kv : 0.0)) +
                        (attention_kept ? 0.0 : 4 * T * heads);
  const double residual = residual_kept ? 0.0 : e * T * H;
  const double attention = common + e * T * (H + 2 * q + 2 * kv_held + (grouped ? 2 * q : 0.0)) + 4 * T * (q + heads);
  const double swiglu = common + residual + e * mlp_tokens * (6 * I + H) + chunked;
  const double gate_up = common + residual + e * mlp_tokens * (2 * I + 2 * H) + chunked +
                         (p.keep_dequantized ? 0.0 : 2 * H * I * e);
  return std::max({attention, swiglu, gate_up}) - 4 * T * H + (p.keep_dequantized ? block_params * e : 0.0);
}

}  // namespace

Footprint predict_footprint(const PlanInputs& given, const ExecPlan& p) {
  const PlanInputs in = as_run(given, p);
  const LlamaConfig& c = in.model;
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  const double L = static_cast<double>(c.num_hidden_layers), V = static_cast<double>(c.vocab_size);
  const double T = static_cast<double>(in.micro_batch * in.seq), e = static_cast<double>(in.element_size);
  const bool tied = c.tie_word_embeddings;
  const double block_params = H * q + 2 * H * kv + q * H + 3 * H * I;
  // bitsandbytes' NF4 with double quantization: half a byte a weight, one 8-bit absmax per 64 weights, one fp32
  // absmax per 256 of those.
  const double per_weight = in.nf4 ? 0.5 + 1.0 / 64 + 4.0 / (64 * 256) : e;
  const double shard = in.sharded ? 1.0 / std::max(1, in.world) : 1.0;
  Footprint f;
  f.terms.emplace_back("context_and_libraries", in.cuda ? kContextBytes : 0.0);
  // Streamed from the host: of those, the block running and the one fetched ahead; the others stay.
  const double streamed = static_cast<double>(std::min<int64_t>(p.streamed_blocks, c.num_hidden_layers));
  const double blocks_held = L - streamed + std::min(2.0, streamed);
  f.terms.emplace_back("base_weights", blocks_held * (block_params * per_weight * shard + 2 * H * e) + H * e);
  // Held dequantized for the run: each such block's weights in the compute dtype too (the NF4 bytes stay).
  f.terms.emplace_back("dequantized_weights",
                       static_cast<double>(std::min<int64_t>(p.dequantized_blocks, c.num_hidden_layers)) * block_params * e);
  f.terms.emplace_back("embeddings", p.embeddings_on_host ? 0.0 : V * H * e);
  f.terms.emplace_back("lm_head", tied || p.lm_head_on_host ? 0.0 : V * H * e);
  // fp32 value, gradient and AdamW's two moments (8 bytes, or about 2 when 8-bit; on the host with
  // optimizer_on_host); trained-in-full tensors likewise.
  const double trainable_bytes = p.optimizer_on_host ? 8.0 : 8.0 + in.optimizer_state_bytes;
  f.terms.emplace_back("trainable_and_optimizer", trainable_bytes * static_cast<double>(in.lora_params) * shard +
                                                      trainable_bytes * static_cast<double>(in.full_params));
  // DPO's reference from lora.init_from: its adapters' fp32 copy, frozen. (Its forward pass keeps nothing for a
  // backward pass: a block's working set at most, as the policy's.)
  if (in.reference_adapters) f.terms.emplace_back("reference_adapters", 4.0 * static_cast<double>(in.lora_params));
  // One block's activations as autograd keeps them for its backward pass, per token: the normed inputs (2 H),
  // q and o_proj's input (q), k and v (2 kv), and the MLP's 3 I (gate and up, kept by down_proj's node, which
  // recomputes the SwiGLU; and I more, fitted) in the compute dtype (fitted on an H200 without checkpointing: 8B
  // 2 x 2048, docs/PERFORMANCE.md, with the SwiGLU output kept then: 4 I). The working set of a block's backward
  // pass counts the 4 I (the SwiGLU and its gradient exist there).
  const double mlp_tokens = p.mlp_chunk_tokens > 0 ? std::min(T, static_cast<double>(p.mlp_chunk_tokens)) : T;
  // Qwen3's q / k norms keep the q / k / v projection output too (rope_qkv_norm's backward pass reads it).
  const double attn_acts = e * T * (2 * H + q + 2 * kv + (c.qk_norm ? q + 2 * kv : 0.0));
  // The SwiGLU output kept (keep_swiglu) by blocks that keep their activations: I more (the fit's 4 I).
  const double block_acts = attn_acts + e * mlp_tokens * (p.keep_swiglu ? 4 : 3) * I;
  const double block_work = attn_acts + e * mlp_tokens * 4 * I;
  // LoRA dropout's backward pass of its widest linear: the input dropped again (the counter-based masks on CUDA are
  // never stored, and the input gradient's LoRA term is added under its mask in place).
  const double dropout_redraw = e * T * static_cast<double>(in.dropout_width);
  // The backward pass's working set of a block that kept its activations. (With the MLP in chunks, the attention
  // backward's fp32 dq accumulator over every token.)
  const double whole_block_work = 0.5 * block_work + (mlp_tokens < T ? 4 * T * q : 0.0);
  double churning = 0;  // the working set's tensors, made and freed in every block's backward pass
  double gate_up_kept_bytes = 0;  // checkpointed blocks' kept gate / up outputs
  if (!p.checkpointing) {
    f.terms.emplace_back("activations", L * block_acts);
    churning = whole_block_work + dropout_redraw;
    f.terms.emplace_back("working_set", churning);
  } else {
    // Kept per block: its input and the keep ladder's tensors, all layers on the device, or two blocks' (the one
    // in its backward pass and the one fetched ahead) when offloaded.
    const double kept = T * kept_bytes_per_token(c, p.keep, in.element_size);
    const double whole = static_cast<double>(std::min<int64_t>(p.blocks_without_checkpointing, c.num_hidden_layers));
    f.terms.emplace_back("kept_activations", (p.offload ? std::min(2.0, L - whole) : L - whole) * kept);
    // Blocks run without checkpointing keep what autograd saves, as a run without checkpointing does. They are the
    // last blocks: their backward passes come first, with their saved activations alive and a working set of their
    // own kind; by the first checkpointed block's recomputation every one of them is let go. So the peak is the
    // larger of those two moments, not their sum: the sum over-predicted 8B 1 x 32768 by 3.4 GiB of the device at
    // 24 GiB (1 block without) and by 4.2 at 80 (16); the larger, +0.2% and +1.3% (H100, twenty-second session).
    // Blocks keeping their gate / up output (2 I a token) hold it from their forward pass to their backward pass;
    // the one recomputing its MLP reads it there instead of making its own (the working set's 2 I), so the peak is
    // the working set and the others' outputs.
    const GateUpKept kept_gate_up = gate_up_kept(in, p);
    const double gate_up_bytes = e * T * 2 * I;
    gate_up_kept_bytes = kept_gate_up.device * gate_up_bytes;
    if (kept_gate_up.device > 0) f.terms.emplace_back("gate_up_kept", gate_up_kept_bytes);
    // Offloaded ones: one more on the device at their blocks' peaks (the next block back's fetched while this one's
    // backward pass runs; in the forward pass one block's output copied out behind the next two blocks), beyond
    // the working set. Blocks keeping theirs on the device are let go before those peaks (they are the last
    // checkpointed, so their backward passes come first), and from two of them their own peak is the higher.
    if (kept_gate_up.host > 0) {
      const double transient = std::max(0.0, 1.0 - std::max(0.0, kept_gate_up.device - 1)) * gate_up_bytes;
      if (transient > 0) f.terms.emplace_back("gate_up_offloaded", transient);
      gate_up_kept_bytes += transient;
    }
    const double recomputing =
        checkpointed_working_set(in, p, mlp_tokens) - (kept_gate_up.device > 0 ? gate_up_bytes : 0.0);
    const double acts = whole * block_acts;
    if (whole > 0) f.terms.emplace_back("activations", acts);
    churning = recomputing + dropout_redraw;
    f.terms.emplace_back("working_set",
                         (whole > 0 ? std::max(whole_block_work, recomputing - acts) : recomputing) + dropout_redraw);
  }
  if (p.keep_dequantized || p.dequantized_blocks > 0)
    f.terms.emplace_back("lora_factor_cache", 0.5 * static_cast<double>(in.lora_params) * e);
  // The loss: a logits tile (at most 192 MiB; 64 MiB and two staging slices when lm_head streams) and dh in fp32.
  // The tile lives only in the loss's forward pass, between the last block's forward pass and the first block's
  // backward pass: it and the blocks' working set are never live together, so only what it needs beyond that
  // working set counts (nothing, on every row run so far); dh, saved for the backward pass, counts whole. H200,
  // eighth session, allocated peak against the tensors predicted so: 8B 2 x 2048 at 8 GiB 5.90 against 5.97 GiB,
  // 1 x 8192 at 9 GiB 6.71 against 6.91 (17 blocks streamed) and 5.87 against 6.07 (25), 1 x 2048 at 5.5 GiB 3.44
  // against 3.55 (with the tile added: 4-6% above).
  // (A plan's loss_chunk_tokens: that many tokens' logits, at most the micro-batch's.)
  const double tile = p.lm_head_on_host          ? 64.0 * 1024 * 1024 + 2 * 8192 * H * e
                      : p.loss_chunk_tokens > 0 ? std::min(T, static_cast<double>(p.loss_chunk_tokens)) * V * e
                                                : 192.0 * 1024 * 1024;
  double working = 0;
  for (const auto& [name, bytes] : f.terms)
    if (name == "working_set") working += bytes;
  f.terms.emplace_back("loss_chunk", T * H * 4 + std::max(0.0, tile - working));
  // The caching allocator's reserve beyond its peak. With expandable segments: 0.25 GiB and 6% of the tensors that
  // come and go within a block (the working set, the two offloaded blocks' kept tensors, the loss; not the weights,
  // embeddings, LoRA and optimizer state, allocated once, nor whole blocks' saved activations, made and freed in
  // step with the blocks: 8B 2 x 2048 without checkpointing took 21.47 GiB of the device, 0.9 less than 5% of them):
  // the side streams' pools, the small-block pool, cuDNN's workspaces and the blocks freed at one size and wanted at
  // another. Fitted on an H200 under budgets (docs/PERFORMANCE.md, "Memory budget", fifth session): reserved less
  // allocated peak 0.73 GiB at 8B 1 x 4460 (1.9 GiB transient), 0.85 at 2 x 2048 (1.7), 1.16 at 1 x 32768 (8.5),
  // 0.46 at 70B 1 x 2048 (5.4: over-predicted by half a GiB); 8B 1 x 32800 at 11.1 GiB ran out of memory where
  // 5% of all tensors and 0.05 GiB had predicted 11.03. Those runs freed the offloaded tensors under record_stream,
  // which made the allocator take new memory for the CPU's run-ahead until the budget was full (eighth session): since
  // then reserved less peak is 0.37 GiB at 8B 1 x 8192 (2.7 GiB transient; 9 GiB budget, 17 or 25 blocks streamed:
  // 0.37, 0.34) and 0.24 at 2 x 2048 (1.8; 8 GiB), with the device 1 GiB under the budget: the constant went from 0.65
  // to 0.25 GiB (the longest rows not yet measured again; a run that runs out of memory in its first step starts
  // again under a leaner plan). Without expandable segments the activations' churn fragments the segments: its size
  // again and 0.5 GiB.
  double churn = tile + churning;  // (the loss's tile too: it comes and goes, at another size than the blocks' tensors)
  for (const auto& [name, bytes] : f.terms)
    if (name == "kept_activations" || name == "loss_chunk") churn += bytes;
  // Kept gate / up outputs: 1% of their bytes more, fitted on the first two runs keeping them (H100, twenty-third
  // session: the device took 1.0% of them above the rest of the prediction at 8B 1 x 32768 with 29 blocks at 80 GiB,
  // 0.52 GiB, and 0.96% at 1 x 8192 with 32 blocks at 24 GiB, 0.14 GiB).
  if (in.cuda)
    f.terms.emplace_back("allocator_reserve", (p.expandable_segments ? 0.25 * kGiB + 0.06 * churn : churn + 0.5 * kGiB) +
                                                  kGateUpKeptReserve * gate_up_kept_bytes);
  return f;
}

double replan_budget_gib(double budget_gib, const Footprint& footprint, std::optional<double> needed_gib) {
  const double predicted = footprint.total() / kGiB;
  double next = std::min(budget_gib, predicted) * 0.95;
  if (needed_gib) {
    double tensors = predicted;  // what the allocator hands out: not the context and libraries, nor its reserve
    for (const auto& [name, bytes] : footprint.terms)
      if (name == "context_and_libraries" || name == "allocator_reserve") tensors -= bytes / kGiB;
    next = std::min(next, budget_gib - std::max(0.0, *needed_gib - tensors) - 0.25);
  }
  return next;
}

Footprint predict_host(const PlanInputs& given, const ExecPlan& p) {
  const PlanInputs in = as_run(given, p);
  const LlamaConfig& c = in.model;
  const double H = static_cast<double>(c.hidden_size), V = static_cast<double>(c.vocab_size);
  const double T = static_cast<double>(in.micro_batch * in.seq), e = static_cast<double>(in.element_size);
  const int64_t whole = std::min<int64_t>(p.blocks_without_checkpointing, c.num_hidden_layers);
  Footprint f;
  f.terms.emplace_back("streamed_weights", static_cast<double>(std::min<int64_t>(p.streamed_blocks, c.num_hidden_layers)) *
                                               block_host_bytes(in));
  // The offload pool holds every checkpointed block's input and kept tensors at once, and the offloaded gate / up
  // outputs.
  f.terms.emplace_back("offloaded_activations",
                       p.checkpointing && p.offload ? static_cast<double>(c.num_hidden_layers - whole) * T *
                                                              kept_bytes_per_token(c, p.keep, in.element_size) +
                                                          gate_up_kept(in, p).host * T * 2 *
                                                              static_cast<double>(c.intermediate_size) * e
                                                    : 0.0);
  f.terms.emplace_back("embeddings", p.embeddings_on_host ? V * H * e : 0.0);
  f.terms.emplace_back("lm_head", p.lm_head_on_host && !c.tie_word_embeddings ? V * H * e : 0.0);
  // AdamW's two moments and the fp32 parameters and gradients staged for the CPU's update.
  f.terms.emplace_back("optimizer", p.optimizer_on_host ? (8.0 + in.optimizer_state_bytes) *
                                                              static_cast<double>(in.lora_params + in.full_params)
                                                        : 0.0);
  return f;
}

double StepTime::total() const {
  double t = 0;
  for (const auto& [name, s] : terms) t += s;
  return t;
}

Json StepTime::to_json() const {
  auto rounded = [](double s) {  // to 4 significant digits (a tiny model's step takes microseconds); savings < 0
    if (s == 0) return 0.0;
    const double unit = std::pow(10.0, std::floor(std::log10(std::abs(s))) - 3);
    return std::round(s / unit) * unit;
  };
  Json j = Json::object();
  for (const auto& [name, s] : terms) j[name] = rounded(s);
  j["total"] = rounded(total());
  return j;
}

namespace {

// The cost model's rates: one H200, bf16, torch 2.11 (cuBLAS, cuDNN 9.19); docs/PERFORMANCE.md, "Cost model (issue
// 27)", has the rows they come from and the error on each.
// Fitted on the two rows without checkpointing (8B 2 x 2048: 16,812 tok/s, 0.2436 s; 1B 4 x 2048: 83,390 tok/s,
// 0.0982 s), with the attention term below: the rate of the model's matrix FLOPs (4 N a token: forward and input
// gradient of every linear and lm_head), near the bf16 GEMM rate the bench measures on an H200 (778-805 TFLOP/s)...
constexpr double kMatrixFlopsPerS = 772e12;
// ... and the memory-bound rest (RMSNorm, RoPE, SwiGLU, residual adds, LoRA's rank-r GEMMs and sums, the
// dequantization in the forward and backward pass, the loss's tiles, AdamW), per token, layer and element of
// hidden + intermediate width; the forward pass's share is a third (the backward reads and writes about twice as
// much). Fitted before the input gradients took their LoRA terms inside the base GEMMs (2026-12-05), whose saving
// is a term of its own (kLoraFoldBytesPerS).
constexpr double kSecondsPerTokenWidth = 2.685e-11;
// cuDNN's causal attention, forward + backward, over its FLOPs (2 S q a token and layer forward, twice that
// backward): 338, 504 and 549 TFLOP/s at 2 x 2048, 1 x 8192 and 1 x 32768 tokens (PERFORMANCE.md, "cuDNN
// attention", attn_bench; 453-503 TFLOP/s in the H200 profile at 8k), as rate * S / (S + 1420), at most 455
// TFLOP/s: what the training step's attention ran at on the long rows (8B 1 x 117,760 and 1 x 287,616, eleventh
// session: 464 and 449 TFLOP/s with the rest of the step as predicted; the uncapped rate predicted them 13% and 19%
// short).
constexpr double kAttentionFlopsPerS = 573e12, kAttentionHalfRateSeq = 1420, kAttentionMostFlopsPerS = 455e12;
// FlashAttention-2 takes 1.65-1.76 times cuDNN's time on the same shapes (the same table).
constexpr double kFlashSlowdown = 1.7;
// NF4 dequantization, bytes read and written: about 384 launches (every 8B block's weights, three passes: 53 GB)
// in 13.9 ms in the H200 profile (PERFORMANCE.md, "NF4 dequantization").
constexpr double kDequantBytesPerS = 3.8e12;
// The two dequantizations a step of every linear (forward and backward) inside the memory-bound term above: what a
// block holding its weights dequantized saves, as a rate over the NF4 bytes read and 16-bit bytes written. Measured
// on an H200 (fifth session, 8B 2 x 2048 without checkpointing, one call): every block held 17,066 tok/s, none
// 16,517, 8.7 ms a step for two passes over the 7.0 G block weights (4.0 TB/s), where the profile of the step
// without them counts 17.8 ms of dequantization kernels (not profiled with them: the backward GEMMs reading gate /
// up's held weight as a view of its wider [W | B | 0] rows may be slower, for one).
constexpr double kInlineDequantBytesPerS = 4.0e12;
// Pinned host <-> device copies: the offloaded block inputs and attention outputs of 8B 1 x 8192, 32 x 128 MiB in
// 77.8 ms each way (the H200 profile of "Before: cuDNN's grouped K/V").
constexpr double kPcieBytesPerS = 55e9;
// ... and to the host over many blocks where the copies fill the forward pass (offloaded gate / up outputs: the
// copies' total beyond the forward pass's predicted compute): 48 GB/s, fitted on 8B 1 x 32768 at 24 GiB (H100,
// twenty-fourth session, one call): 28 of them under keep attention ran 4.041 s a step where 55 GB/s had predicted
// 3.999 s (the row's other plans run 2-5% under their prediction: 3.84 s here), the forward pass's 67.8 GB over 28
// blocks of 43 ms predicted compute fit 48.2 GB/s; 14 under keep residual, 3.947 s against 4.044 predicted (60.2
// GB): 47.1 GB/s (two allocator retries in that run). (Where each block's copy fits its own compute, as block inputs
// alone do on the rows measured, 55 stands.)
constexpr double kOffloadOutBytesPerS = 48e9;
// Embeddings on the host: the rows gathered there, pinned and shipped before the first block can start, per byte of
// the [tokens, H] rows. Fitted: 8B 2 x 2048 at an 8 GiB budget (11,589 tok/s) and 1 x 8192 at 9 GiB (10,290),
// both with the embeddings on the host, give the same figure (1.42 and 1.41 GB/s) after the other terms: far below
// a host copy's bandwidth, so the gather and pin_memory on the host, before the GPU has work, are what it counts.
// (Fitted before the rows were gathered straight into a reused pinned block, without at::embedding's fresh tensor
// and pin_memory's second copy: 5-10 times faster on the CPU; to refit on the GPU.)
constexpr double kHostRowsBytesPerS = 1.4e9;
// A block run without checkpointing while others are checkpointed saves about half the recomputation it avoids:
// 8B 2 x 2048 with the last 16 of 32 blocks without checkpointing ran 0.3026 s a step against 0.3201 s with all 32
// checkpointed (5.7% faster) and 0.2436 s with none (31%); the 16 blocks' recomputation is predicted at 0.0336 s
// (2.1 ms a block; all 32, 0.0672 s and the offload's first fetch, against the 0.0765 s measured), their measured
// gain is 0.0175 s, 52% of it. Nothing in block_checkpoint.cpp, llama.cpp or activation_offload.cpp shows why: the
// blocks without it run as in a plan without checkpointing (the same autograd nodes, two NF4 dequantizations per
// linear; their LoRA factors even cached), the checkpointed ones as in a plan with it (their offloaded inputs prefetched a
// block ahead; the first of the backward pass fetched late, as all 32 blocks' first is). Modelled as measured, one
// row. It does not grow past half the blocks: on an H100 (2026-12-05, issue 27's hand search at 24 and 80 GiB) 1 and 2
// checkpointed blocks of 32 cost 5.5 and 9.6 ms a step over none at 80 GiB, 5.4-7.9 and 8.0 ms at 24 GiB: about
// their recomputation and offload (5.0 and 7.2 ms predicted), where 0.48 x whole x recompute had put 33 ms on. So
// it goes with the fewer of the blocks with and without checkpointing (the same at 16 of 32, the row it was fitted on).
constexpr double kPartialShortfall = 0.48;
// The input gradients' LoRA terms inside the base GEMMs (2026-12-05, lib/model/qlora_linear.cpp and
// projection_group.cpp): what they no longer move a token and block, against a rate fitted on the kernels they
// removed. q / k / v's and gate / up's g = dy B no longer read dy ((q + 2 kv + 2 I) e bytes); down_proj's addmm no
// longer reads and writes its [tokens, I] input gradient (2 I e), less the copy of dy into the wider operand (2 H e;
// not taken with LoRA dropout). On an H100 the profile of 8B 2 x 2048 lost 6.3 ms of those kernels a step for
// 14.5 GB (2.30 TB/s there, 3.38 at the H200's bandwidth). The rates above were fitted before it.
constexpr double kLoraFoldBytesPerS = 3.38e12;
// AdamW on the CPU (optimizer_on_host): the update, the wait for the copies and the stream sync, elements a second,
// beside 12 bytes an element over PCIe (the fp32 parameters and gradients in, the parameters back). Fitted: 8B
// 1 x 2048 at a 5.5 GiB budget, the leanest plan with AdamW on the host, ran 0.299 s a step against 0.224 s with it
// on the device (an H200 host, 16 cores; 42 M LoRA elements): 75 ms, 9 of them the copies. The update reads the
// parameter, gradient and two moments and writes three of them, 28 bytes an element, 1.2 GB a step: the other 66 ms
// are about 18 GB/s of host memory traffic (not separated here from the wait for the copies).
constexpr double kHostAdamwElemsPerS = 6.4e8;
// Block weights streamed from the host (lib/model/weight_streaming): the copies' rate and a cost per fetch, fitted
// on the two rows measured on an H200 (2026-12-04, session 4, call 1; every block streamed, docs/PERFORMANCE.md,
// "Fourth session"): 70B 1 x 2048 ran 1.601 s a step against 1.282 s predicted without streaming
// (0.319 s for 160 fetches of 441 MB, which its forward pass of 5.2 ms a block cannot hide), 8B 2 x 2048 0.3414 s
// against 0.313 s (28 ms for 64 fetches of 113 MB that its 3.0 ms blocks would hide): 53 GB/s and 0.36 ms a fetch
// (then each fetch allocated its tensors; the events, the copy engine's start, the copies' share of PCIe with the
// offloaded block inputs). Checked since on the rows with some blocks streamed (tests/test_exec_plan.cpp): within
// 5% with room in the budget, 10-13% slow at its very edge (the allocator's retries, not modelled).
constexpr double kStreamBytesPerS = 53e9;
constexpr double kStreamFetchS = 0.36e-3;
// The share of the budget left free by plans that keep whole blocks' activations (see decide_plan).
constexpr double kSpeedHeadroom = 0.05;
// A smaller micro-batch is taken only where its plan is predicted this much faster per optimizer step.
constexpr double kMicroBatchTie = 0.02;
// LoRA dropout's passes over each dropped linear's input, bytes per element (e = 2), the counter-based masks on CUDA
// (lib/kernels/lora_dropout.cu; no mask stored): the draw in the forward pass (x read, the dropped input written:
// 2e), again in a checkpointed block's recomputation, again in the backward pass, and the input gradient's LoRA
// term added under its mask (dx read and written: 2e): 6e a block; at the reference device's rate. Fitted on an
// H100 (fifteenth session, two calls): lora.dropout 0.05 cost 26.8 and 28.2 ms a step at 8B 2 x 2048 without
// checkpointing (14,918 against 16,534 and 14,902 against 16,607 tok/s), 4.7 ms of it down_proj's input gradient's
// LoRA term out of its GEMM (lora_terms_in_gemms). (at::dropout's passes, 13 e + 2 bytes an element, had cost
// 42.6-46.0 ms: 13,946-14,122 tok/s.)
constexpr double kDropoutBytesPerS = 3.94e12;
// down_proj's backward pass computing the SwiGLU output again from gate and up (2 I read, I written in the compute
// dtype) where the plan does not keep it: measured on an H200 as what keeping it bought, 8B 2 x 2048 without
// checkpointing, 16,493 tok/s kept against 16,299 recomputed (fourth session, two calls: 1.2%, 3.0 ms a step for 32
// blocks' 352 MB each: 3.75 TB/s). The memory-bound term above was fitted on rows that recomputed it.
constexpr double kSwigluBytesPerS = 3.75e12;
// The fused loss over a frozen lm_head in logits tiles of kWideLossChunk tokens instead of its rule's 192 MiB ones
// (768 tokens at a vocabulary of 128,256 in bf16), as a share of the loss's two GEMMs at the matrix rate above (4 T V
// H FLOPs). Measured on an H100 (2026-12-06): alone (bench_fused_ce) 8192 x 2048 x 128256 (the 1B step's) 12.59 ms
// against 13.75 and 16384 x 4096 x 128256 48.38 against 52.05; in the step (one call, two rounds each, 80 GiB)
// 1B 4 x 2048 88,870 tok/s against 87,214 and 8B 2 x 2048 17,551 against 17,420: 1.75 ms a step both, 15.7% of
// the 11.15 ms that 4 T V H takes at 772 TFLOP/s on either row. Tiles of 512 and 1024 tokens were no faster than 768
// alone (cuBLAS's kernels for those M), so the plan takes 2048 or the rule.
constexpr int64_t kWideLossChunk = 2048;
constexpr double kWideLossSaving = 0.157;
// The share of this rank's host memory a plan may pin (block weights streamed, offloaded activations, embeddings /
// lm_head / AdamW's state on the host): the rest is the process's own and the system's.
constexpr double kHostPinnedShare = 0.75;

}  // namespace

// How much longer the memory-bound work takes on this device than on the H200 the rates were measured on (PlanInputs::
// memory_bytes_per_s): the square root of the bandwidths' ratio. Fitted on the nineteenth session's H100 rows (one
// H100 80GB HBM3 a call, 2026-12-06; issue 27's table, the plans their budgets chose): with the H200's matrix and
// attention terms as they are, 8B 2 x 2048 at 24 and 80 GiB and 1 x 8192 whole and packed needed their memory-bound
// terms 1.32, 1.26, 1.20 and 1.13 times the H200's (1B 4 x 2048: 1.04), not the 1.47 of the bandwidths; the square
// root, 1.21, predicts them within -2.4% to +1.9% (the 1B row +5.6%), where the full ratio had +3.5% to +7.6% (1B
// +14%). The H200's own row of the eighteenth session is unchanged (17,610 tok/s, predicted 1.7% fast): part of that
// work is bound by launches and latency, which the bandwidth does not move. Bounded to [0.25, 4]: a device reporting
// a clock far from any GPU's is not believed.
static double memory_slowdown(const PlanInputs& in) {
  if (!(in.memory_bytes_per_s > 0)) return 1.0;
  return std::clamp(std::sqrt(kReferenceMemoryBytesPerS / in.memory_bytes_per_s), 0.25, 4.0);
}

// How much longer a copy over the host link takes on this machine than on those the copy rates were fitted on
// (PlanInputs::host_link_bytes_per_s): their ratio, where this link is more than 10% off the reference (a PCIe 4.0
// x16 link, as most workstations' 24 GB cards have, moves about half as much; a link running at 8 lanes or an older
// generation, a quarter); 1 within 10% (the copies the model counts are not the probe's, and the rates were fitted on
// links not probed: a near miss is the probe's noise, not the link's). Bounded to [0.25, 20].
static double link_slowdown(const PlanInputs& in) {
  if (!(in.host_link_bytes_per_s > 0)) return 1.0;
  const double ratio = kReferenceHostLinkBytesPerS / in.host_link_bytes_per_s;
  if (std::abs(ratio - 1) <= 0.1) return 1.0;
  return std::clamp(ratio, 0.25, 20.0);
}

// Whether the fused loss runs over a frozen lm_head on the device in tiles of at least kWideLossChunk tokens where
// its own rule takes fewer (the cost model's loss_tiles term; what decide_plan weighs).
static bool wide_loss_tiles(const PlanInputs& in, const ExecPlan& p) {
  if (p.loss_chunk_tokens < kWideLossChunk || p.lm_head_on_host || in.lm_head_trained ||
      (in.model.tie_word_embeddings && in.embeddings_trained))
    return false;
  const int64_t tokens = in.micro_batch * in.seq;
  const int64_t rule = fused_linear_ce_chunk_tokens(tokens, in.model.hidden_size, in.model.vocab_size,
                                                    /*weight_trainable=*/false, FusedLinearCeOptions{}, in.element_size);
  return rule < kWideLossChunk && tokens > rule;
}

double swiglu_recompute_s(const PlanInputs& in) {
  return static_cast<double>(in.micro_batch * in.seq) * 3 * static_cast<double>(in.model.intermediate_size) *
         static_cast<double>(in.element_size) / kSwigluBytesPerS * memory_slowdown(in);
}

StepTime predict_step_time(const PlanInputs& given, const ExecPlan& p) {
  const PlanInputs in = as_run(given, p);
  const LlamaConfig& c = in.model;
  const double H = static_cast<double>(c.hidden_size), I = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.q_size()), kv = static_cast<double>(c.kv_size());
  const double L = static_cast<double>(c.num_hidden_layers), V = static_cast<double>(c.vocab_size);
  const double S = static_cast<double>(in.seq), T = static_cast<double>(in.micro_batch * in.seq);
  const double e = static_cast<double>(in.element_size);
  const double block_params = H * q + 2 * H * kv + q * H + 3 * H * I;
  // An NF4 weight's dequantization: half a byte and its statistics read, e bytes written.
  // Memory-bound work (the dequantization, norms, SwiGLU, LoRA's rank-r products, ...) at this device's bandwidth.
  const double slow = memory_slowdown(in);
  // Copies over the host link at this machine's rate: bytes / (rate / link).
  const double link = link_slowdown(in);
  const double pcie_rate = kPcieBytesPerS / link, out_rate = kOffloadOutBytesPerS / link;
  const double dequant_s = in.nf4 ? (0.5 + 1.0 / 64 + 4.0 / (64 * 256) + e) / kDequantBytesPerS * slow : 0.0;
  // Packed rows: a token attends within its document, through the varlen kernel.
  const double span = in.attention_span > 0 ? std::min(in.attention_span, S) : S;
  const double attention_rate =
      std::min(kAttentionFlopsPerS * span / (span + kAttentionHalfRateSeq), kAttentionMostFlopsPerS) /
      (p.attention == AttentionKernel::Flash || in.varlen ? kFlashSlowdown : 1.0);
  const double width_s = kSecondsPerTokenWidth * T * (H + I) * slow;  // one layer's memory-bound work, forward + backward
  StepTime t;
  // Model FLOPs (apps/trainer/bench.cpp's model_flops_per_token): 4 N a token for the linears and lm_head, and
  // causal attention, 2 S q a token and layer forward and 4 S q backward.
  const double linears = T * 4 * (L * block_params + V * H) / kMatrixFlopsPerS;
  const double attention = T * 6 * L * span * q / attention_rate;
  t.terms.emplace_back("matrix", linears);
  t.terms.emplace_back("attention", attention);
  t.terms.emplace_back("memory_bound", L * width_s);
  if (in.nf4) {
    // (where the code takes them: a group's [dx | g] where its input width is a multiple of the dequantization
    // kernel's strided rows, down_proj's [dy | g] [W; A] where it is at least twice as wide in as out)
    const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
    const double groups = hidden % kernels::kNf4StridedCols == 0 ? q + 2 * kv + 2 * I : 0.0;
    const double down = in.dropout_widths > 0 || inter < 2 * hidden || hidden % 8 != 0 ? 0.0 : 2 * I - 2 * H;
    t.terms.emplace_back("lora_terms_in_gemms", -L * T * e * (groups + down) / kLoraFoldBytesPerS * slow);
  }
  // The memory-bound term counts every block's two NF4 dequantizations a step; those holding their weights
  // dequantized run none.
  const double held = in.nf4 ? static_cast<double>(std::min<int64_t>(p.dequantized_blocks, c.num_hidden_layers)) : 0.0;
  // (At most the memory-bound work the term counts for those blocks: it scales with the tokens, the saving does not,
  // and a few tokens a step would otherwise be predicted a negative time.)
  if (held > 0)
    t.terms.emplace_back("dequantization_held",
                         -held * std::min(2 * block_params * (0.5 + 1.0 / 64 + 4.0 / (64 * 256) + e) /
                                              kInlineDequantBytesPerS * slow,
                                          width_s));
  const double block_forward = 2 * T * block_params / kMatrixFlopsPerS + 2 * span * q * T / attention_rate + width_s / 3;
  const int64_t chunks = p.mlp_chunk_tokens > 0 && in.micro_batch * in.seq > p.mlp_chunk_tokens
                             ? (in.micro_batch * in.seq + p.mlp_chunk_tokens - 1) / p.mlp_chunk_tokens
                             : 1;
  const double n = static_cast<double>(chunks), gate_up = 2 * H * I, down = H * I;
  if (p.checkpointing) {
    const double whole = static_cast<double>(std::min<int64_t>(p.blocks_without_checkpointing, c.num_hidden_layers));
    const double recomputed_blocks = L - whole;
    // A checkpointed block's recomputation runs its forward pass again less what the keep ladder kept and what its
    // backward pass never reads: down_proj's output always, q / k / v's projection from qkv, o_proj from residual;
    // the attention forward from attention (replayed).
    double attn_weights = 0;
    if (p.keep < KeepLevel::Qkv) attn_weights += H * (q + 2 * kv);
    if (p.keep < KeepLevel::Residual) attn_weights += q * H;
    const double recompute = 2 * T * (attn_weights + gate_up) / kMatrixFlopsPerS +
                             (p.keep < KeepLevel::Attention ? 2 * span * q * T / attention_rate : 0.0) + width_s / 3;
    // Blocks keeping their gate / up output run no gate / up GEMM in their recomputation.
    const GateUpKept kept = gate_up_kept(in, p);
    const double kept_gate_up = std::min(kept.total(), recomputed_blocks);
    const double gate_up_gemm = 2 * T * gate_up / kMatrixFlopsPerS;
    t.terms.emplace_back("recomputation", recomputed_blocks * recompute);
    if (kept_gate_up > 0) t.terms.emplace_back("gate_up_kept", -kept_gate_up * gate_up_gemm);
    // The weights a recomputation dequantizes are dequantized once more in the backward pass unless kept; the MLP
    // in chunks dequantizes gate and up twice and down once per chunk (its backward pass recomputes chunk by chunk
    // and keeps nothing), where one backward pass without chunks dequantizes each once; and since the tenth session
    // the block's forward pass runs its MLP in chunks too, each chunk dequantizing gate / up and down again.
    double weights = p.keep_dequantized ? 0.0 : attn_weights;
    if (chunks > 1) weights += (n - 1) * (2 * gate_up + down) + gate_up + (n - 1) * (gate_up + down);
    else if (!p.keep_dequantized) weights += gate_up;
    // Blocks holding their weights dequantized (the first ones, checkpointed) dequantize nothing.
    const double held_recomputed = std::min(recomputed_blocks, held);
    if (weights > 0 && in.nf4 && recomputed_blocks > held_recomputed)
      t.terms.emplace_back("dequantization", (recomputed_blocks - held_recomputed) * weights * dequant_s);
    // Without keep_dequantized the recomputation's gate / up dequantization is one more than a step's two: blocks
    // keeping their gate / up output run none there (those holding their weights dequantized, the first, none
    // anyway).
    double kept_not_held = 0;
    if (kept_gate_up > 0)
      for (int64_t layer = static_cast<int64_t>(held); layer < static_cast<int64_t>(recomputed_blocks); ++layer)
        if (p.keeps_gate_up(layer, c.num_hidden_layers)) kept_not_held += 1;
    if (kept_not_held > 0 && in.nf4 && !p.keep_dequantized && chunks == 1)
      t.terms.emplace_back("gate_up_kept_dequantization", -kept_not_held * gate_up * dequant_s);
    // Blocks without checkpointing whose MLP runs in chunks recompute it in the backward pass, chunk by chunk.
    if (whole > 0 && chunks > 1)
      t.terms.emplace_back("mlp_chunks_recomputed",
                           whole * (2 * T * gate_up / kMatrixFlopsPerS + width_s / 3 +
                                    (2 * (n - 1) * (gate_up + down) + n * gate_up) * dequant_s));
    // Offloaded block inputs (and what the ladder keeps) go to the host behind the next block's forward pass and
    // come back behind the backward pass of the block after them; what a block's compute does not cover shows,
    // and so does the first fetch of the backward pass (nothing before it to hide behind).
    // Offloaded gate / up outputs (spread evenly over the checkpointed blocks before those keeping theirs on the
    // device) are let go a block later than the rest, so their copies share PCIe with the blocks' around them: the
    // forward pass over those blocks shows what all their copies take beyond all their compute. In the backward
    // pass each comes back with its block's other tensors, behind a backward pass without the gate / up GEMM.
    if (p.offload && in.cuda && recomputed_blocks > 0) {
      const double bytes = e * T * (H + static_cast<double>(keep_width(c, p.keep))), gate_up_bytes = e * T * 2 * I;
      const double copy = bytes / pcie_rate, copy_out = bytes / out_rate;
      const double backward = 2 * block_forward + recompute;
      const double offloaded = kept.host, gate_up_copy = gate_up_bytes / pcie_rate;
      const double spread = recomputed_blocks - kept.device;  // the blocks they are spread over
      double forward = recomputed_blocks * std::max(0.0, copy - block_forward);
      if (offloaded > 0)
        forward = std::max(forward, kept.device * std::max(0.0, copy - block_forward) +
                                        spread * (copy_out - block_forward) +
                                        offloaded * gate_up_bytes / out_rate);
      // (The first block of the backward pass, the last checkpointed, is one of them only where all are.)
      const double fetched_first = copy + (offloaded > 0 && kept.device == 0 && offloaded >= spread ? gate_up_copy : 0.0);
      t.terms.emplace_back("offload",
                           forward + (recomputed_blocks - offloaded) * std::max(0.0, copy - backward) +
                               offloaded * std::max(0.0, copy + gate_up_copy - (backward - gate_up_gemm)) +
                               fetched_first);
    }
    // (A checkpointed block's recomputation on average, those keeping their gate / up output counted as they run.)
    if (whole > 0 && recomputed_blocks > 0)
      t.terms.emplace_back("partial_checkpointing",
                           kPartialShortfall * std::min(whole, recomputed_blocks) *
                               (recompute - kept_gate_up / recomputed_blocks * gate_up_gemm));
  }
  // The memory-bound term counts every block's SwiGLU computed again in its backward pass: checkpointed blocks never
  // do (their recomputation keeps it), the others where the plan does not keep it.
  const double whole_blocks =
      p.checkpointing ? static_cast<double>(std::min<int64_t>(p.blocks_without_checkpointing, c.num_hidden_layers)) : L;
  const double swiglu_kept = (L - whole_blocks) + (p.keep_swiglu ? whole_blocks : 0.0);
  if (swiglu_kept > 0) t.terms.emplace_back("swiglu_kept", -swiglu_kept * swiglu_recompute_s(in));
  if (in.dropout_widths > 0) {  // bytes an element, as kDropoutBytesPerS's comment counts them
    const double draw = 2 * e, every_block = 2 * draw + 2 * e;
    const double recomputed =
        p.checkpointing ? L - static_cast<double>(std::min<int64_t>(p.blocks_without_checkpointing, c.num_hidden_layers))
                        : 0.0;
    t.terms.emplace_back("lora_dropout", (L * every_block + recomputed * draw) * T *
                                             static_cast<double>(in.dropout_widths) / kDropoutBytesPerS * slow);
  }
  if (p.embeddings_on_host && in.cuda) t.terms.emplace_back("embeddings_on_host", T * H * e / kHostRowsBytesPerS);
  // Block weights streamed from the host: each streamed block's bytes over PCIe before its forward pass and again
  // before its recomputation, behind the blocks since the streamed one before it (L / streamed of them; what their
  // compute does not cover shows), the first of each pass behind nothing; and a cost per fetch.
  const double streamed = static_cast<double>(std::min<int64_t>(p.streamed_blocks, c.num_hidden_layers));
  const double copy = block_host_bytes(in) / kStreamBytesPerS * link;  // a streamed block's fetch
  const double block_fwd = 2 * T * block_params / kMatrixFlopsPerS + width_s / 3;  // what a fetch hides behind
  if (streamed > 0 && in.cuda) {
    const double behind = L / streamed;  // blocks of compute each fetch hides behind
    const double block_bwd = 3 * block_fwd;  // its recomputation (one forward) and backward pass (two)
    t.terms.emplace_back("weights_streamed", (streamed - 1) * (std::max(0.0, copy - behind * block_fwd) +
                                                               std::max(0.0, copy - behind * block_bwd)) +
                                                 2 * copy + 2 * streamed * kStreamFetchS);
  }
  if (p.optimizer_on_host && in.cuda) {
    const double trained = static_cast<double>(in.lora_params + in.full_params);
    t.terms.emplace_back("optimizer_on_host", trained * (12.0 / pcie_rate + 1.0 / kHostAdamwElemsPerS));
  }
  if (wide_loss_tiles(in, p))
    t.terms.emplace_back("loss_tiles", -kWideLossSaving * T * 4 * V * H / kMatrixFlopsPerS);
  // lm_head streamed: V H e bytes over PCIe in each of the loss's two passes, behind that pass's GEMM (2 T V H).
  if (p.lm_head_on_host && in.cuda)
    t.terms.emplace_back("lm_head_streamed",
                         2 * std::max(0.0, V * H * e / pcie_rate - 2 * T * V * H / kMatrixFlopsPerS));
  // DPO: the reference's forward pass over the micro-batch, without gradient, before the policy's: each block's
  // forward pass as the policy's and lm_head's logits (the loss's forward GEMM). Fresh adapters are left out through
  // the linears one by one, which dequantize again the weights that blocks hold dequantized; streamed blocks come
  // over PCIe once more, behind the blocks' forward passes.
  if (in.dpo_reference) {
    double forward = L * block_forward + 2 * T * V * H / kMatrixFlopsPerS;  // a pass without gradient, the policy's
    if (p.embeddings_on_host && in.cuda) forward += T * H * e / kHostRowsBytesPerS;
    if (streamed > 0 && in.cuda)
      forward += (streamed - 1) * std::max(0.0, copy - L / streamed * block_fwd) + copy + streamed * kStreamFetchS;
    double reference = forward;
    if (!in.reference_adapters && held > 0) reference += held * block_params * dequant_s;
    t.terms.emplace_back("dpo_reference", reference);
    // KTO: the reference's pass over the KL sequences and the policy's (the micro-batch's other half)
    if (in.kto_kl) t.terms.emplace_back("kto_kl_sequences", reference + forward);
  }
  return t;
}

Decision decide_plan(const PlanInputs& in, const PlanRequest& r, double free_gib) {
  const std::string& file = in.file;
  const std::string m = "train.memory.";
  // Consistency of what was forced.
  const bool ckpt_forced_off = r.checkpointing.has_value() && !*r.checkpointing;
  // Checkpointed blocks keeping their gate / up output, forced: on the device, and offloaded.
  const int64_t kept_forced = r.gate_up_kept_blocks.value_or(0), offloaded_forced = r.gate_up_offloaded_blocks.value_or(0);
  const std::pair<const char*, int64_t> gate_up_forced[] = {{"gate_up_kept_blocks", kept_forced},
                                                            {"gate_up_offloaded_blocks", offloaded_forced}};
  if (ckpt_forced_off) {
    if (r.offload.value_or(false))
      fail_key(ErrorKind::Config, file, m + "offload", "true needs train.memory.checkpointing true (it is false)");
    if (r.keep && *r.keep != KeepLevel::Input)
      fail_key(ErrorKind::Config, file, m + "keep",
               std::string("\"") + keep_level_name(*r.keep) + "\" needs train.memory.checkpointing true (it is false)");
    if (r.keep_dequantized.value_or(false))
      fail_key(ErrorKind::Config, file, m + "keep_dequantized", "true needs train.memory.checkpointing true (it is false)");
    if (r.mlp_chunk_tokens.value_or(0) > 0)
      fail_key(ErrorKind::Config, file, m + "mlp_chunk_tokens", "needs train.memory.checkpointing true (it is false)");
    if (r.blocks_without_checkpointing.value_or(0) > 0)
      fail_key(ErrorKind::Config, file, m + "blocks_without_checkpointing",
               "needs train.memory.checkpointing true or \"auto\" (it is false: no block is checkpointed)");
    for (const auto& [key, n] : gate_up_forced)
      if (n > 0)
        fail_key(ErrorKind::Config, file, m + key,
                 "needs train.memory.checkpointing true or \"auto\" (it is false: no block is recomputed)");
  }
  if (offloaded_forced > 0 && r.offload.has_value() && !*r.offload)
    fail_key(ErrorKind::Config, file, m + "gate_up_offloaded_blocks",
             "keeps gate / up outputs in the offloaded pool: it needs train.memory.offload true or \"auto\" (it is "
             "false)");
  if (kept_forced + offloaded_forced > in.model.num_hidden_layers)
    fail_key(ErrorKind::Config, file, m + (offloaded_forced > 0 ? "gate_up_offloaded_blocks" : "gate_up_kept_blocks"),
             (kept_forced > 0 && offloaded_forced > 0
                  ? "with train.memory.gate_up_kept_blocks " + std::to_string(kept_forced) + " keeps " +
                        std::to_string(kept_forced + offloaded_forced) + " blocks' gate / up output"
                  : "is " + std::to_string(kept_forced + offloaded_forced)) +
                 ", the model has " + std::to_string(in.model.num_hidden_layers) + " blocks");
  for (const auto& [k, n] : gate_up_forced) {
    if (n <= 0) continue;
    const std::string key = m + k;
    if (r.keep && *r.keep == KeepLevel::Input)
      fail_key(ErrorKind::Config, file, key,
               "needs train.memory.keep \"attention\" or above (it is \"input\"): the gate / up output is kept in "
               "the keep ladder's record of a block");
    if (r.mlp_chunk_tokens.value_or(0) > 0)
      fail_key(ErrorKind::Config, file, key, "needs the MLP whole (train.memory.mlp_chunk_tokens is " +
                                                 std::to_string(*r.mlp_chunk_tokens) + ")");
    if (!in.nf4)
      fail_key(ErrorKind::Config, file, key, "needs an NF4 base (model.quant): gate / up run as one group only there");
  }
  if (r.mlp_chunk_tokens.value_or(0) > 0 && in.mlp_dropout)
    fail_key(ErrorKind::Config, file, m + "mlp_chunk_tokens",
             "needs no LoRA dropout on the MLP's linears (lora.dropout is set): a chunk's recomputation would draw "
             "other masks");
  if (r.blocks_without_checkpointing.value_or(0) >= in.model.num_hidden_layers)
    fail_key(ErrorKind::Config, file, m + "blocks_without_checkpointing",
             "is " + std::to_string(*r.blocks_without_checkpointing) + ", the model has " +
                 std::to_string(in.model.num_hidden_layers) + " blocks: at most " +
                 std::to_string(in.model.num_hidden_layers - 1) + " (train.memory.checkpointing false runs none)");
  if (r.blocks_without_checkpointing.value_or(0) > 0 && in.sharded)
    fail_key(ErrorKind::Config, file, m + "blocks_without_checkpointing",
             "is not available with train.shard \"blocks\" (a sharded block's weights exist only while it runs)");
  if (r.keep && *r.keep != KeepLevel::Input && r.offload.has_value() && !*r.offload)
    fail_key(ErrorKind::Config, file, m + "keep",
             std::string("\"") + keep_level_name(*r.keep) +
                 "\" keeps tensors in the offloaded pool: it needs train.memory.offload true or \"auto\" (it is false)");
  const bool tied = in.model.tie_word_embeddings;
  if (tied && r.embeddings_on_host.has_value() && r.lm_head_on_host.has_value() &&
      *r.embeddings_on_host != *r.lm_head_on_host)
    fail_key(ErrorKind::Config, file, m + "embeddings",
             "and train.memory.lm_head: the model ties them (one tensor), so both are \"host\" or both \"device\"");
  if (r.embeddings_on_host.value_or(false) && in.embeddings_trained)
    fail_key(ErrorKind::Config, file, m + "embeddings", "\"host\" holds frozen embeddings only; lora.modules_to_save trains them");
  if (r.lm_head_on_host.value_or(false) && (in.lm_head_trained || (tied && in.embeddings_trained)))
    fail_key(ErrorKind::Config, file, m + "lm_head", "\"host\" holds a frozen lm_head only; lora.modules_to_save trains it");
  if ((r.embeddings_on_host.value_or(false) || r.lm_head_on_host.value_or(false)) && in.sharded)
    fail_key(ErrorKind::Config, file, m + "embeddings", "\"host\" is not available with train.shard \"blocks\"");
  if (r.loss_chunk_tokens.value_or(0) > 0 && (in.lm_head_trained || (tied && in.embeddings_trained)))
    fail_key(ErrorKind::Config, file, m + "loss_chunk_tokens",
             "applies to a frozen lm_head only (lora.modules_to_save trains it; its loss takes its own tiles)");
  if (r.loss_chunk_tokens.value_or(0) > 0 && r.lm_head_on_host.value_or(false))
    fail_key(ErrorKind::Config, file, m + "loss_chunk_tokens",
             "applies to an lm_head on the device (train.memory.lm_head is \"host\": its loss streams it in slices)");

  const int64_t L = in.model.num_hidden_layers;
  // Block weights streamed: "host" streams every block unless streamed_blocks names how many; "device" none.
  std::optional<int64_t> stream_forced;
  if (r.streamed_blocks) {
    if (*r.streamed_blocks > L)
      fail_key(ErrorKind::Config, file, m + "streamed_blocks",
               "is " + std::to_string(*r.streamed_blocks) + ", the model has " + std::to_string(L) + " blocks");
    if (*r.streamed_blocks > 0 && r.weights_on_host == std::optional<bool>(false))
      fail_key(ErrorKind::Config, file, m + "streamed_blocks",
               "is " + std::to_string(*r.streamed_blocks) + " but train.memory.weights is \"device\"");
    stream_forced = *r.streamed_blocks;
  } else if (r.weights_on_host) {
    stream_forced = *r.weights_on_host ? L : 0;
  }
  if (stream_forced.value_or(0) > 0) {
    const std::string key = m + (r.streamed_blocks ? "streamed_blocks" : "weights");
    if (ckpt_forced_off)
      fail_key(ErrorKind::Config, file, key,
               "(block weights streamed from the host) needs train.memory.checkpointing true or \"auto\" (it is "
               "false): a block's weights are on the GPU only while it runs or is recomputed");
    if (r.blocks_without_checkpointing.value_or(0) > 0)
      fail_key(ErrorKind::Config, file, key,
               "(block weights streamed from the host) needs every block checkpointed: "
               "train.memory.blocks_without_checkpointing is " + std::to_string(*r.blocks_without_checkpointing));
    if (in.sharded)
      fail_key(ErrorKind::Config, file, key,
               "(block weights streamed from the host) is not available with train.shard \"blocks\"");
  }
  // Blocks holding their weights dequantized, forced: NF4 weights, not streamed, not sharded.
  if (r.dequantized_blocks.value_or(0) > 0) {
    const std::string key = m + "dequantized_blocks";
    if (*r.dequantized_blocks > L)
      fail_key(ErrorKind::Config, file, key,
               "is " + std::to_string(*r.dequantized_blocks) + ", the model has " + std::to_string(L) + " blocks");
    if (!in.nf4)
      fail_key(ErrorKind::Config, file, key,
               "holds NF4 weights dequantized, and the base is not NF4 (model.quant): its 16-bit weights are used as "
               "they are");
    if (stream_forced.value_or(0) > 0)
      fail_key(ErrorKind::Config, file, key,
               "and block weights streamed from the host (train.memory.weights / streamed_blocks) exclude each other: "
               "set one of them to 0 or \"device\"");
    if (in.sharded)
      fail_key(ErrorKind::Config, file, key,
               "is not available with train.shard \"blocks\" (a sharded block's weights exist only while it runs)");
  }
  const int64_t tokens = in.micro_batch * in.seq;
  Decision d;
  d.layers = L;
  d.memory_bytes_per_s = in.memory_bytes_per_s;
  d.host_link_bytes_per_s = in.host_link_bytes_per_s;
  d.budget_gib = r.gpu_memory_gib ? *r.gpu_memory_gib
                                 : (in.cuda && free_gib > 0 ? free_gib + kContextAtStartGiB - kFreeMarginGiB : -1);
  // Checkpointing "auto" weighs plans without it, or without it for the last blocks, where there is a budget to
  // weigh their activations against (without one, on the CPU, every block is checkpointed, as before "auto"
  // became the default) and the blocks are not sharded (a sharded block's weights exist only while it runs). Not
  // where a forced field needs checkpointing.
  const bool weigh_checkpointing = !r.checkpointing && d.budget_gib >= 0 && !in.sharded && stream_forced.value_or(0) == 0;
  const bool may_skip = weigh_checkpointing && !r.offload.value_or(false) &&
                        r.keep.value_or(KeepLevel::Input) == KeepLevel::Input && !r.keep_dequantized.value_or(false) &&
                        r.mlp_chunk_tokens.value_or(0) == 0 && r.blocks_without_checkpointing.value_or(0) == 0 &&
                        r.gate_up_kept_blocks.value_or(0) == 0 && r.gate_up_offloaded_blocks.value_or(0) == 0;
  // The fastest plan with checkpointing (the measured defaults, docs/PERFORMANCE.md): on CUDA from 4096 tokens per
  // micro-batch the block inputs offloaded (the copies hide behind the forward pass) with q, k, v and the attention
  // output kept where half the host holds them; the recomputation's 16-bit weights kept below 8192 tokens; the MLP
  // chunked above 32768 tokens; everything on the device.
  ExecPlan best;
  best.attention = r.attention;
  best.row_multiple = in.cuda && whole_rows_under_cudnn(in, r.attention) && cudnn_grouped_kv(128, in.model.head_dim) ? 128 : 1;
  best.expandable_segments = r.expandable_segments.value_or(in.cuda);
  best.embeddings_on_host = r.embeddings_on_host.value_or(false) && in.cuda;
  best.lm_head_on_host = r.lm_head_on_host.value_or(tied && best.embeddings_on_host) && in.cuda;
  if (tied) best.embeddings_on_host = best.lm_head_on_host = best.embeddings_on_host || best.lm_head_on_host;
  best.optimizer_on_host = r.optimizer_on_host.value_or(false);  // forced on the CPU too (the same code runs)
  best.streamed_blocks = stream_forced.value_or(0);
  best.dequantized_blocks = r.dequantized_blocks.value_or(0);
  std::vector<ExecPlan> candidates;  // every plan weighed, in the order that settles ties
  if (may_skip) candidates.push_back(best);  // no checkpointing (ExecPlan's defaults)
  best.checkpointing = r.checkpointing.value_or(true);
  if (!best.checkpointing) candidates.push_back(best);  // forced off
  if (best.checkpointing) {
    best.blocks_without_checkpointing = r.blocks_without_checkpointing.value_or(0);
    best.offload = r.offload.value_or(in.cuda && tokens >= 4096 && host_holds(in, KeepLevel::Input)) && in.cuda;
    KeepLevel k = KeepLevel::Input;
    if (best.offload && tokens >= 4096)
      for (KeepLevel l : {KeepLevel::Residual, KeepLevel::Qkv, KeepLevel::Attention})
        if (host_holds(in, l)) {
          k = l;
          break;
        }
    best.keep = r.keep.value_or(k);
    best.keep_dequantized = r.keep_dequantized.value_or(tokens < 8192);
    best.mlp_chunk_tokens = r.mlp_chunk_tokens.value_or(tokens > 32768 && !in.mlp_dropout ? 8192 : 0);
  }
  // With checkpointing, a ladder from fastest to leanest: each step gives up what costs least speed for the memory
  // it frees.
  std::vector<ExecPlan> ladder;
  ExecPlan p = best;
  if (p.checkpointing) ladder.push_back(p);
  auto step = [&](auto change) {
    ExecPlan next = p;
    change(next);
    if (next.keep_dequantized != p.keep_dequantized || next.offload != p.offload || next.keep != p.keep ||
        next.expandable_segments != p.expandable_segments || next.embeddings_on_host != p.embeddings_on_host ||
        next.lm_head_on_host != p.lm_head_on_host || next.mlp_chunk_tokens != p.mlp_chunk_tokens ||
        next.optimizer_on_host != p.optimizer_on_host) {
      p = next;
      ladder.push_back(p);
    }
  };
  if (in.cuda && p.checkpointing) {
    if (!r.expandable_segments) step([](ExecPlan& x) { x.expandable_segments = true; });
    if (!r.keep_dequantized) step([](ExecPlan& x) { x.keep_dequantized = false; });
    if (!r.offload) step([](ExecPlan& x) { x.offload = true; });
    if (!r.keep)
      for (KeepLevel l : {KeepLevel::Qkv, KeepLevel::Attention, KeepLevel::Input})
        step([&](ExecPlan& x) { x.keep = std::min(x.keep, l); });
    const bool embed_free = !r.embeddings_on_host && !in.embeddings_trained && !in.sharded && !tied;
    if (embed_free) step([](ExecPlan& x) { x.embeddings_on_host = true; });
    if (!r.mlp_chunk_tokens && !in.mlp_dropout)
      for (int64_t chunk : {int64_t{8192}, int64_t{4096}, int64_t{2048}})
        if (tokens > chunk) step([&](ExecPlan& x) { x.mlp_chunk_tokens = x.mlp_chunk_tokens ? std::min(x.mlp_chunk_tokens, chunk) : chunk; });
    // lm_head streamed from the host (2 V H bytes over PCIe a step: about 2.1 GB at Llama 3.1 8B) after the MLP
    // chunks, which cost less; then the MLP in chunks of 1024 tokens.
    const bool head_free = !r.lm_head_on_host && !in.lm_head_trained && !in.sharded && !(tied && in.embeddings_trained) &&
                           !(tied && r.embeddings_on_host.has_value());
    if (head_free) step([&](ExecPlan& x) { x.lm_head_on_host = true; if (tied) x.embeddings_on_host = true; });
    if (!r.mlp_chunk_tokens && !in.mlp_dropout && tokens > 1024)
      step([](ExecPlan& x) { x.mlp_chunk_tokens = x.mlp_chunk_tokens ? std::min<int64_t>(x.mlp_chunk_tokens, 1024) : 1024; });
    // Last, AdamW's moments on the host (8 bytes an element of the device; 0.31 GiB at 8B with r = 16 on all seven
    // linears, for about 75 ms a step of copies and the update on the CPU, measured on an H200 host).
    if (!r.optimizer_on_host) step([](ExecPlan& x) { x.optimizer_on_host = true; });
  }
  // Between no checkpointing and all of it: each rung of the ladder without MLP chunks with its last 1 to L - 1
  // blocks run without checkpointing (their activations kept, their recomputation saved).
  if (weigh_checkpointing && !r.blocks_without_checkpointing)
    for (const ExecPlan& rung : ladder)
      if (rung.mlp_chunk_tokens == 0)
        for (int64_t whole = L - 1; whole >= 1; --whole) {
          ExecPlan partial = rung;
          partial.blocks_without_checkpointing = whole;
          candidates.push_back(partial);
        }
  candidates.insert(candidates.end(), ladder.begin(), ladder.end());
  // Block weights streamed from the host, as few blocks as fit: each rung of the ladder with 1 to L of them, where
  // there is a budget to weigh them against and every block is checkpointed (what they pin of the host is checked
  // with the rest below).
  const bool may_stream = !stream_forced && in.cuda && !in.sharded && d.budget_gib >= 0 && !ckpt_forced_off &&
                          r.blocks_without_checkpointing.value_or(0) == 0 && r.dequantized_blocks.value_or(0) == 0;
  if (may_stream)
    for (const ExecPlan& rung : ladder)
      for (int64_t n = 1; n <= L; ++n) {
        ExecPlan streamed = rung;
        streamed.streamed_blocks = n;
        candidates.push_back(streamed);
      }
  // The least predicted step time among the candidates that fit (the first of equal ones).
  // What a plan pins of the host's memory must leave it the rest (on the CPU nothing is pinned).
  auto host_fits = [&](const Footprint& h) {
    return !in.cuda || in.host_bytes == 0 || h.total() <= kHostPinnedShare * static_cast<double>(in.host_bytes);
  };
  // Blocks holding their weights dequantized ("auto"): each candidate that fits, with as many as the rest of the
  // budget holds (each saves time, none costs any), where its weights are on the device and its MLP unchunked.
  const bool may_hold = !r.dequantized_blocks && in.cuda && in.nf4 && !in.sharded && d.budget_gib >= 0;
  const double held_block_bytes = block_params(in.model) * static_cast<double>(in.element_size);
  // The SwiGLU output kept by blocks that keep their activations ("auto"): each such candidate with it and without
  // it (I elements a token and block), each then given the loss's wide tiles and held weights where they fit. Kept,
  // it saves a pass over 3 I elements a block; but where it leaves no room for the wide tiles, the plan without it
  // can be the faster (8B 2 x 2048 at 10.75 GiB: 4 blocks without checkpointing, 0.3117 s without it and 2048-token
  // tiles against 0.3130 with it and none).
  std::vector<ExecPlan> weighed;
  for (const ExecPlan& c0 : candidates) {
    ExecPlan kept_swiglu = c0;
    kept_swiglu.keep_swiglu = r.keep_swiglu.value_or(true);
    weighed.push_back(kept_swiglu);
    if (!r.keep_swiglu && (!c0.checkpointing || c0.blocks_without_checkpointing > 0)) {
      ExecPlan recomputed = c0;
      recomputed.keep_swiglu = false;
      weighed.push_back(recomputed);
    }
  }
  // Checkpointed blocks keeping their gate / up output ("auto"): each candidate that can (keep "attention" or above,
  // the MLP whole, weights on the device) with as many as the rest of the budget holds, after the loss's wide tiles
  // (more time a byte) and before held weights (less: 4 H I FLOPs a token for 4 I bytes against two dequantizations
  // of 2.5 bytes a weight for 2). Packed rows too (their CUDA path, FlashAttention-2 varlen with the output kept on
  // the device or offloaded, passed its [gpu] test on an H100 in the twenty-fourth session).
  const bool may_keep_gate_up = !r.gate_up_kept_blocks && in.cuda && in.nf4 && d.budget_gib >= 0;
  const bool may_offload_gate_up = !r.gate_up_offloaded_blocks && in.cuda && in.nf4 && d.budget_gib >= 0;
  const double gate_up_block_bytes = static_cast<double>(in.micro_batch) *
                                     static_cast<double>(padded_row_length(in.seq, best.row_multiple)) * 2 *
                                     static_cast<double>(in.model.intermediate_size) *
                                     static_cast<double>(in.element_size);
  auto takes_gate_up = [&](const ExecPlan& x) {
    return x.keeps(KeepLevel::Attention) && x.mlp_chunk_tokens == 0 && x.streamed_blocks == 0;
  };
  bool found = false;
  for (ExecPlan cand : weighed) {
    cand.loss_chunk_tokens = r.loss_chunk_tokens.value_or(0);  // (forced: weighed with its tile from the start)
    if (r.gate_up_kept_blocks) {  // forced: only the plans that can keep that many
      cand.gate_up_kept_blocks = *r.gate_up_kept_blocks;
      if (cand.gate_up_kept_blocks > 0 &&
          (!takes_gate_up(cand) || cand.gate_up_kept_blocks > L - cand.blocks_without_checkpointing))
        continue;
    }
    if (r.gate_up_offloaded_blocks) {  // likewise, with the ones kept on the device if forced too
      cand.gate_up_offloaded_blocks = *r.gate_up_offloaded_blocks;
      if (cand.gate_up_offloaded_blocks > 0 &&
          (!takes_gate_up(cand) || (in.cuda && !cand.offload) ||
           cand.gate_up_kept_blocks + cand.gate_up_offloaded_blocks > L - cand.blocks_without_checkpointing))
        continue;
    }
    Footprint f = predict_footprint(in, cand);
    // Plans that keep whole blocks' activations (none or some blocks without checkpointing) fit with headroom:
    // their activation term is fitted on one row, and a run that dies of memory loses more than they gain.
    const bool keeps_blocks = !cand.checkpointing || cand.blocks_without_checkpointing > 0;
    const double limit = (keeps_blocks ? 1 - kSpeedHeadroom : 1.0) * d.budget_gib * kGiB;
    if (d.budget_gib >= 0 && f.total() > limit) continue;
    // The loss's logits in tiles of kWideLossChunk tokens ("auto"): where the plan still fits with the larger tile,
    // before blocks hold their weights dequantized (about 1.75 ms a step at 8B for 0.3 GiB, against 0.27 ms for a
    // block's 0.41 GiB).
    if (!r.loss_chunk_tokens && in.cuda && d.budget_gib >= 0) {
      ExecPlan wide = cand;
      wide.loss_chunk_tokens = kWideLossChunk;
      if (wide_loss_tiles(in, wide)) {
        Footprint fw = predict_footprint(in, wide);
        if (fw.total() <= limit) {
          cand = wide;
          f = std::move(fw);
        }
      }
    }
    // The most of a count (field) from `most` down that still fits the limit, set on cand.
    auto fill = [&](int64_t ExecPlan::*field, int64_t most) {
      for (int64_t n = most; n > 0; --n) {
        ExecPlan more = cand;
        more.*field = n;
        Footprint fm = predict_footprint(in, more);
        if (fm.total() <= limit) {
          cand = more;
          f = std::move(fm);
          return;
        }
      }
    };
    // (+1: the first block's own output replaces the recomputation's.)
    if (may_keep_gate_up && takes_gate_up(cand))
      fill(&ExecPlan::gate_up_kept_blocks,
           std::min<int64_t>(L - cand.blocks_without_checkpointing - cand.gate_up_offloaded_blocks,
                             static_cast<int64_t>(std::floor((limit - f.total()) / gate_up_block_bytes)) + 1));
    // Then offloaded ones ("auto", with offload): as many as are predicted fastest (each saves its GEMM until their
    // copies outlast the forward pass's compute) and the host holds, for the room of their one output on the
    // device at a time, which may be that of one or two kept there.
    if (may_offload_gate_up && cand.offload && takes_gate_up(cand)) {
      const int64_t device = cand.gate_up_kept_blocks, checkpointed = cand.checkpointed_blocks(L);
      ExecPlan fastest = cand;
      double fastest_s = predict_step_time(in, cand).total();
      for (int64_t kept = device; kept >= (r.gate_up_kept_blocks ? device : std::max<int64_t>(0, device - 2)); --kept) {
        ExecPlan x = cand;
        x.gate_up_kept_blocks = kept;
        x.gate_up_offloaded_blocks = 1;
        if (predict_footprint(in, x).total() > limit) continue;  // (the same for any count offloaded)
        for (int64_t n = 1; n <= checkpointed - kept; ++n) {
          x.gate_up_offloaded_blocks = n;
          if (!host_fits(predict_host(in, x))) break;
          const double sx = predict_step_time(in, x).total();
          if (sx < fastest_s) fastest = x, fastest_s = sx;
        }
      }
      if (fastest.gate_up_offloaded_blocks > 0) {
        cand = fastest;
        f = predict_footprint(in, cand);
      }
    }
    if (may_hold && cand.streamed_blocks == 0 && cand.mlp_chunk_tokens == 0)
      fill(&ExecPlan::dequantized_blocks,
           std::min<int64_t>(L, static_cast<int64_t>(std::floor((limit - f.total()) / held_block_bytes))));
    Footprint h = predict_host(in, cand);
    if (!host_fits(h)) continue;
    StepTime t = predict_step_time(in, cand);
    d.alternatives.push_back({cand, f.total(), t.total()});
    if (found && t.total() >= d.step.total()) continue;
    d.plan = cand;
    d.footprint = std::move(f);
    d.host = std::move(h);
    d.step = std::move(t);
    found = true;
  }
  d.seq = in.seq;
  if (found) {
    d.run_seq = padded_row_length(in.seq, d.plan.row_multiple);
    return d;
  }
  // Nothing fits: the plan of least device memory is named, and the host memory it would pin where that is more
  // than the host gives.
  const ExecPlan* least = nullptr;
  double least_bytes = 0;
  for (ExecPlan& cand : candidates) {
    cand.keep_swiglu = r.keep_swiglu.value_or(false);
    cand.loss_chunk_tokens = r.loss_chunk_tokens.value_or(0);
    if (takes_gate_up(cand)) {
      cand.gate_up_kept_blocks = r.gate_up_kept_blocks.value_or(0);
      if (cand.offload) cand.gate_up_offloaded_blocks = r.gate_up_offloaded_blocks.value_or(0);
    }
    const double bytes = predict_footprint(in, cand).total();
    if (!least || bytes < least_bytes) least = &cand, least_bytes = bytes;
  }
  d.plan = *least;
  d.run_seq = padded_row_length(in.seq, d.plan.row_multiple);
  d.footprint = predict_footprint(in, d.plan);
  d.host = predict_host(in, d.plan);
  // Nothing fits: name the budget, what the leanest plan needs, and what lowers it.
  const std::string where = r.gpu_memory_gib ? "train.memory.gpu_memory_gib " + fmt_gib(*r.gpu_memory_gib * kGiB)
                                             : "the GPU's free memory (" + fmt_gib(free_gib * kGiB) +
                                                   " GiB, with this process's " + fmt_gib(kContextAtStartGiB * kGiB) +
                                                   " GiB context added back and a " + fmt_gib(kFreeMarginGiB * kGiB) +
                                                   " GiB margin kept: " + fmt_gib(d.budget_gib * kGiB) + " GiB)";
  // Streaming forced off (or limited): named where streaming every block would fit.
  std::string streamed;
  if (stream_forced && *stream_forced < L && !in.sharded && in.cuda && d.plan.checkpointing && d.budget_gib >= 0) {
    ExecPlan lean = d.plan;
    lean.streamed_blocks = L;
    lean.blocks_without_checkpointing = 0;
    const double need = predict_footprint(in, lean).total();
    if (need <= d.budget_gib * kGiB)
      streamed = ", or stream the block weights from the host (train.memory.weights \"host\": predicted " +
                 fmt_gib(need) + " GiB)";
  }
  // fp32 moments: named where 8-bit ones would let the leanest plan fit.
  std::string eight_bit;
  if (in.optimizer_state_bytes > kEightBitMomentBytes && d.budget_gib >= 0 &&
      in.lora_params + in.full_params > 0) {
    PlanInputs q8 = in;
    q8.optimizer_state_bytes = kEightBitMomentBytes;
    const double need = predict_footprint(q8, d.plan).total();
    if (need <= d.budget_gib * kGiB && host_fits(predict_host(q8, d.plan)))
      eight_bit = ", or keep AdamW's moments in 8 bits (optim.name \"adamw_8bit\": predicted " + fmt_gib(need) +
                  " GiB)";
  }
  const std::string host = host_fits(d.host) ? std::string()
                                             : " and would pin " + fmt_gib(d.host.total()) + " GiB of host memory (" +
                                                   fmt_gib(kHostPinnedShare * static_cast<double>(in.host_bytes)) +
                                                   " GiB is three quarters of this rank's share of the host)";
  // (The GPU would hold the leanest plan and the host's pinned share not: the host is named first.)
  const bool device_fits = d.budget_gib >= 0 && d.footprint.total() <= d.budget_gib * kGiB;
  const std::string headline = device_fits && !host.empty()
                                   ? "the run does not fit this host's memory (the GPU's budget, " + where +
                                         (r.gpu_memory_gib ? " GiB" : "") + ", would hold it)"
                                   : "the run does not fit " + where + (r.gpu_memory_gib ? " GiB" : "");
  fail_at(ErrorKind::Config, file,
          headline + ": its leanest plan (" + describe(d) + ") needs " +
              fmt_gib(d.footprint.total()) + " GiB" + host + ". Lower train.micro_batch_size (now " +
              std::to_string(in.micro_batch) + ") or data.max_seq_len (now " + std::to_string(in.seq) +
              "), or free train.memory's forced settings" + streamed + eight_bit + ", or use a GPU" +
              (host.empty() ? "" : " or a host") + " with more memory");
}

MicroDecision decide_micro_batch(PlanInputs in, const PlanRequest& request, double free_gib, int64_t per_rank,
                                 int64_t forced) {
  per_rank = std::max<int64_t>(1, per_rank);
  std::vector<int64_t> sizes;  // the largest first
  if (forced > 0) {
    sizes.push_back(std::min(forced, per_rank));
  } else {  // the divisors of per_rank, in pairs up to its square root
    for (int64_t m = 1; m * m <= per_rank; ++m)
      if (per_rank % m == 0) {
        sizes.push_back(m);
        if (m != per_rank / m) sizes.push_back(per_rank / m);
      }
    std::sort(sizes.begin(), sizes.end(), std::greater<int64_t>());
  }
  std::optional<MicroDecision> best;
  std::vector<MicroDecision::Size> weighed;
  double best_s = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    in.micro_batch = sizes[i];
    const bool last = i + 1 == sizes.size();
    Decision d;
    try {
      d = decide_plan(in, request, free_gib);
    } catch (const Error&) {
      if (last && !best) throw;  // the smallest does not fit either: its refusal names the figure
      continue;
    }
    // Per optimizer step; where the step time is unknown (no terms), the micro-batches a step count alone. The
    // held weights' saving is left out of the comparison: the memory-bound term counts the dequantizations per
    // token (fitted at 4096 tokens) while the saving is per pass, which would credit small micro-batches with
    // dequantizations they never paid for.
    double held = 0;
    for (const auto& [name, sec] : d.step.terms)
      if (name == "dequantization_held") held += sec;
    const double per_step =
        static_cast<double>(per_rank / sizes[i]) * (d.step.terms.empty() ? 1.0 : d.step.total() - held);
    weighed.push_back({sizes[i], per_step, d.footprint.total(), describe(d)});
    if (!best || per_step < best_s * (1 - kMicroBatchTie)) {
      best = MicroDecision{sizes[i], std::move(d), {}};
      best_s = per_step;
    }
  }
  best->sizes = std::move(weighed);
  return *best;
}

std::string describe(const ExecPlan& p, int64_t layers) {
  std::string s = p.checkpointing ? "checkpointing" : "no checkpointing";
  if (p.checkpointing) {
    if (p.blocks_without_checkpointing > 0)
      s += p.blocks_without_checkpointing == 1
               ? std::string(" (the last block without)")
               : " (the last " + std::to_string(p.blocks_without_checkpointing) + " blocks without)";
    s += p.offload ? ", offloaded" : ", on the device";
    s += std::string(", keep ") + keep_level_name(p.keep);
    if (p.keep_dequantized) s += ", dequantized weights kept";
    if (p.mlp_chunk_tokens > 0) s += ", MLP in chunks of " + std::to_string(p.mlp_chunk_tokens) + " tokens";
    auto blocks = [](int64_t n) { return n == 1 ? std::string("1 block") : std::to_string(n) + " blocks"; };
    if (p.gate_up_kept_blocks > 0) s += ", gate / up kept by " + blocks(p.gate_up_kept_blocks);
    if (p.gate_up_offloaded_blocks > 0)
      s += std::string(p.gate_up_kept_blocks > 0 ? " and" : ", gate / up") + " offloaded by " +
           blocks(p.gate_up_offloaded_blocks);
  }
  if (p.keep_swiglu && (!p.checkpointing || p.blocks_without_checkpointing > 0)) s += ", SwiGLU kept";
  s += p.attention == AttentionKernel::Cudnn ? ", cuDNN attention" : ", flash attention";
  if (p.expandable_segments) s += ", expandable segments";
  if (p.embeddings_on_host) s += ", embeddings on the host";
  if (p.lm_head_on_host) s += ", lm_head streamed from the host";
  if (p.optimizer_on_host) s += ", AdamW on the host";
  if (p.loss_chunk_tokens > 0) s += ", the loss in tiles of " + std::to_string(p.loss_chunk_tokens) + " tokens";
  if (p.dequantized_blocks > 0)
    s += p.dequantized_blocks >= layers && layers > 0
             ? std::string(", every block's weights held dequantized")
             : ", " + std::to_string(p.dequantized_blocks) + (layers > 0 ? " of " + std::to_string(layers) : std::string()) +
                   " blocks' weights held dequantized";
  if (p.streamed_blocks > 0)
    s += p.streamed_blocks >= layers && layers > 0
             ? std::string(", block weights streamed from the host")
             : ", " + std::to_string(p.streamed_blocks) + (layers > 0 ? " of " + std::to_string(layers) : std::string()) +
                   " blocks' weights streamed from the host";
  return s;
}

std::string describe(const Decision& d) {
  std::string s = describe(d.plan, d.layers);
  if (d.run_seq > d.seq && d.seq > 0)
    s += " (rows of " + std::to_string(d.seq) + " tokens padded to " + std::to_string(d.run_seq) + " for cuDNN's grouped K / V)";
  if (!d.footprint.terms.empty()) s += "; predicted " + fmt_gib(d.footprint.total()) + " GiB";
  if (d.budget_gib >= 0) s += " of a " + fmt_gib(d.budget_gib * kGiB) + " GiB budget";
  if (!d.step.terms.empty()) {
    char buf[128];
    if (d.memory_bytes_per_s > 0 && std::abs(d.memory_bytes_per_s / kReferenceMemoryBytesPerS - 1) > 0.01)
      std::snprintf(buf, sizeof buf, " and %.3f s a step (at an H200's rates, memory-bound work at %.2f TB/s)",
                    d.step.total(), d.memory_bytes_per_s / 1e12);
    else
      std::snprintf(buf, sizeof buf, " and %.3f s a step (at an H200's rates)", d.step.total());
    s += buf;
    if (d.host_link_bytes_per_s > 0 &&
        std::abs(kReferenceHostLinkBytesPerS / d.host_link_bytes_per_s - 1) > 0.1) {
      std::snprintf(buf, sizeof buf, "; copies to and from the host at %.1f GB/s",
                    d.host_link_bytes_per_s / 1e9);
      s += buf;
    }
  }
  return s;
}

Json plan_fields(const ExecPlan& p) {
  return Json{{"checkpointing", p.checkpointing},
              {"blocks_without_checkpointing", p.blocks_without_checkpointing},
              {"offload", p.offload},
              {"keep", keep_level_name(p.keep)},
              {"keep_dequantized", p.keep_dequantized},
              {"mlp_chunk_tokens", p.mlp_chunk_tokens},
              {"attention", p.attention == AttentionKernel::Cudnn ? "cudnn" : "flash"},
              {"expandable_segments", p.expandable_segments},
              {"embeddings", p.embeddings_on_host ? "host" : "device"},
              {"lm_head", p.lm_head_on_host ? "host" : "device"},
              {"optimizer", p.optimizer_on_host ? "host" : "device"},
              {"weights", p.streamed_blocks > 0 ? "host" : "device"},
              {"streamed_blocks", p.streamed_blocks},
              {"dequantized_blocks", p.dequantized_blocks},
              {"keep_swiglu", p.keep_swiglu},
              {"loss_chunk_tokens", p.loss_chunk_tokens},
              {"gate_up_kept_blocks", p.gate_up_kept_blocks},
              {"gate_up_offloaded_blocks", p.gate_up_offloaded_blocks}};
}

Json to_json(const Decision& d) {
  Json j = plan_fields(d.plan);
  // (Not a train.memory key: the plan pads rows for cuDNN where it applies.)
  if (d.run_seq > 0) j["seq_as_run"] = d.run_seq;
  j["budget_gib"] = d.budget_gib >= 0 ? Json(std::round(d.budget_gib * 1000) / 1000) : Json(nullptr);
  j["predicted_gib"] = d.footprint.to_json();
  j["predicted_host_gib"] = d.host.to_json();
  j["predicted_step_s"] = d.step.terms.empty() ? Json(nullptr) : d.step.to_json();
  // The host link's rate the PCIe terms took (null: the reference's, unmeasured).
  j["host_link_gb_s"] =
      d.host_link_bytes_per_s > 0 ? Json(std::round(d.host_link_bytes_per_s / 1e8) / 10) : Json(nullptr);
  return j;
}

double device_free_gib(bool cuda, int device_index) {
  if (!cuda) return -1;
  // Back to the device current before only where that one has a context already: cudaSetDevice would make one
  // (hundreds of MiB) on device 0 for a run on another GPU.
  const c10::DeviceIndex before = c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(device_index));
  size_t free = 0, total = 0;
  const bool ok = cudaMemGetInfo(&free, &total) == cudaSuccess;
  (void)c10::cuda::MaybeSetDevice(before);
  return ok ? static_cast<double>(free) / kGiB : -1;
}

double device_memory_bytes_per_s(bool cuda, int device_index) {
  if (!cuda) return 0;
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device_index) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device_index) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return 2.0 * clock_khz * 1e3 * bus_bits / 8;
}

bool device_has_reference_rates(bool cuda, int device_index) {
  int devices = 0, major = 0;
  if (!cuda || cudaGetDeviceCount(&devices) != cudaSuccess || device_index >= devices ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_index) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9;
}

double host_link_bytes_per_s(bool cuda, int device_index) {
  int devices = 0;
  if (!cuda || cudaGetDeviceCount(&devices) != cudaSuccess || device_index >= devices) {
    (void)cudaGetLastError();
    return 0;
  }
  constexpr size_t kBytes = size_t{32} << 20;
  const c10::DeviceIndex before = c10::cuda::ExchangeDevice(static_cast<c10::DeviceIndex>(device_index));
  void* device = nullptr;
  void* host = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  double rate = 0;
  bool ok = cudaMalloc(&device, kBytes) == cudaSuccess && cudaHostAlloc(&host, kBytes, cudaHostAllocDefault) == cudaSuccess &&
            cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess &&
            cudaEventCreate(&start) == cudaSuccess && cudaEventCreate(&stop) == cudaSuccess;
  // A copy each way first (the link and copy engine awake), then the best of three each way.
  for (int direction = 0; ok && direction < 2; ++direction) {
    const bool out = direction == 0;
    float best_ms = 0;
    for (int i = 0; ok && i < 4; ++i) {
      ok = cudaEventRecord(start, stream) == cudaSuccess &&
           cudaMemcpyAsync(out ? host : device, out ? device : host, kBytes,
                           out ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, stream) == cudaSuccess &&
           cudaEventRecord(stop, stream) == cudaSuccess && cudaEventSynchronize(stop) == cudaSuccess;
      float ms = 0;
      ok = ok && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess && ms > 0;
      if (ok && i > 0 && (best_ms == 0 || ms < best_ms)) best_ms = ms;
    }
    if (ok) {
      const double r = static_cast<double>(kBytes) / (best_ms * 1e-3);
      rate = direction == 0 ? r : std::min(rate, r);
    }
  }
  if (stop) (void)cudaEventDestroy(stop);
  if (start) (void)cudaEventDestroy(start);
  if (stream) (void)cudaStreamDestroy(stream);
  if (host) (void)cudaFreeHost(host);
  if (device) (void)cudaFree(device);
  (void)cudaGetLastError();
  (void)c10::cuda::MaybeSetDevice(before);
  return ok ? rate : 0;
}

void apply_allocator_settings(const ExecPlan& plan) {
  // PYTORCH_CUDA_ALLOC_CONF, when the user set it, is torch's own switch and wins.
  if (std::getenv("PYTORCH_CUDA_ALLOC_CONF") || std::getenv("PYTORCH_ALLOC_CONF")) return;
  c10::CachingAllocator::setAllocatorSettings(plan.expandable_segments ? "expandable_segments:True"
                                                                       : "expandable_segments:False");
}

}  // namespace qt
