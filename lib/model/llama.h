#pragma once
// A LLaMA decoder in plain ATen ops (autograd-capable): RMSNorm, RoPE, grouped-query attention through
// at::scaled_dot_product_attention, SwiGLU MLP, lm_head. Parameter names follow Hugging Face's LlamaForCausalLM.
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/batch.h"
#include "lib/model/exec_plan.h"
#include "lib/model/llama_config.h"
#include "lib/quant/nf4.h"

namespace qt {

// Trainable low-rank adapter (Hu et al., LoRA, 2021): y += scale * B(A(dropout(x))).
// With `magnitude` defined it is DoRA (Liu et al., 2024, arXiv:2402.09353) as PEFT computes it
// (peft.tuners.lora.dora.DoraLinearLayer): y = m / ||W + scale B A||_row * (x W^T + scale B A x) (+ bias), the
// norm per output feature taken without gradient (the paper's section 4.3).
struct LoraAdapter {
  at::Tensor A;          // [r, in]   (PEFT: lora_A.weight)
  at::Tensor B;          // [out, r]  (PEFT: lora_B.weight), zero at init so training starts from the base
  at::Tensor magnitude;  // [out]     DoRA only (PEFT: lora_magnitude_vector); undefined for plain LoRA
  double scale = 1.0;    // alpha / r, or alpha / sqrt(r) with rsLoRA
  double dropout = 0.0;

  bool dora() const { return magnitude.defined(); }
};

// A block linear y = x W^T (+ b) (+ LoRA). The base is either dense (`weight`) or frozen NF4 (`nf4`), never both;
// the bias (attention_bias / mlp_bias) is always dense, even beside an NF4 base.
struct Linear {
  at::Tensor weight;                 // dense base [out, in]; undefined when quantized
  at::Tensor bias;                   // optional dense bias [out]; undefined when the config has none
  std::shared_ptr<Nf4Weight> nf4;    // frozen NF4 base; dequantized just in time, never kept in 16-bit
  std::shared_ptr<LoraAdapter> lora;  // null when the layer is not a LoRA target
  bool training = false;              // LoRA dropout is active only while training

  bool quantized() const { return static_cast<bool>(nf4); }
  int64_t out_features() const;
  int64_t in_features() const;
  // The base weight in `dtype` (dequantized when NF4): for export and tests, not for the forward pass.
  at::Tensor base_weight(c10::ScalarType dtype) const;
  at::Tensor forward(const at::Tensor& x) const;

 private:
  at::Tensor dora_forward(const at::Tensor& x) const;
};

// y = x W^T with W dequantized from NF4 into a scratch buffer in the forward pass and again in the backward
// pass (the QLoRA recipe: no 16-bit copy of W lives between them). Gradient flows to x only.
at::Tensor nf4_linear(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w);

// Linears reading one input (q, k, v of a block; gate, up) as one projection: their outputs side by side,
// [.., sum of out_features], equal to each member's forward() (the same rounding as LoraLinearFn, one launch
// dequantizes every base, one GEMM each for the bases, the LoRA As and the LoRA Bs, one GEMM for the input
// gradient). Undefined when a member is not an NF4 base with a plain LoRA adapter (no DoRA, no dropout in
// training, no bias, fp32 A and B), the inputs differ in width, or there are more than 4: call each forward().
// concat_b: the LoRA B terms inside the base GEMM, [x | x A^T] [W | s B]^T, instead of an addmm over the output
// (on CUDA where the input width is a multiple of 1024; the same values, one rounding fewer).
// output_unused: only what the backward saves is computed; the output is left unwritten (a recomputation that
// takes the values from elsewhere).
at::Tensor project_group(const std::vector<const Linear*>& linears, const at::Tensor& x, bool concat_b = false,
                         bool output_unused = false);

// How often the LoRA nodes have made their compute-dtype factors (the As stacked, the scaled Bs) and kept them so
// far: under keep_dequantized once per linear or group and version of its fp32 masters, shared by every forward
// pass in between; never otherwise (for tests).
int64_t lora_factor_builds();

// How many forward passes of project_group took concat_b's path so far (for tests).
int64_t lora_b_in_gemm_runs();

// How many outputs the recomputations left unwritten so far (skip_unused_outputs: down_proj's, chunked MLPs'; with
// keep_qkv / keep_residual also q / k / v's and o_proj's; for tests).
int64_t recomputed_outputs_skipped();

// How many recomputations took their rotated q, k, v from keep_qkv so far (for tests).
int64_t qkv_replays();

// How many recomputations took their residual after attention from keep_residual so far (for tests).
int64_t residual_replays();

// DoRA's weight norm: the L2 norm of each row (output feature) of W + scale * B A, in fp32, without gradient.
// Computed over blocks of rows so that W + scale * B A never exists whole; W may be any floating dtype.
// PEFT: DoraLinearLayer.get_weight_norm (torch.linalg.norm(weight + scaling * lora_weight, dim=1)).
at::Tensor dora_weight_norm(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale);

// nf4_linear that also returns dora_weight_norm(W, A, B, scale) of the same just-in-time dequantized W (one
// dequantization serves both). The norm carries no gradient; A and B are read detached.
std::pair<at::Tensor, at::Tensor> nf4_linear_dora_norm(const at::Tensor& x, const std::shared_ptr<Nf4Weight>& w,
                                                       const at::Tensor& A, const at::Tensor& B, double scale);

struct LlamaBlock {
  at::Tensor input_layernorm;           // [H]
  at::Tensor post_attention_layernorm;  // [H]
  Linear q_proj, k_proj, v_proj, o_proj;
  Linear gate_proj, up_proj, down_proj;
  at::Tensor q_norm, k_norm;  // Qwen3: RMSNorm weights [head_dim] applied per head to q and k before RoPE
};

// What a forward pass may attend to. All undefined: plain causal. `dense`: a boolean mask [B|1, 1, S, S] (true =
// visible) for SDPA. `cu_seqlens`: packed documents in the varlen layout over the B * S grid tokens (see
// lib/kernels/varlen_attention.h), taken by flash attention on CUDA bf16/fp16 with no [S, S] mask built; `window`
// is Mistral's sliding window there (-1: none).
struct AttentionMask {
  at::Tensor dense;
  at::Tensor cu_seqlens;
  int64_t max_seqlen = 0;
  int64_t window = -1;
};

// Called around each decoder block (FullyShard gathers a block's shards before it runs and frees or
// reduce-scatters after). `backward`: the block's recomputation and backward pass under grad checkpointing.
struct BlockHooks {
  virtual ~BlockHooks() = default;
  virtual void before_block(size_t layer, bool backward) = 0;
  virtual void after_block(size_t layer, bool backward) = 0;
};

// LLaMA's RMSNorm (transformers' LlamaRMSNorm): normalise in fp32, cast back, then scale.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

class LlamaModel {
 public:
  LlamaConfig config;
  at::Tensor embed_tokens;  // [V, H]
  std::vector<LlamaBlock> layers;
  at::Tensor norm;     // [H]
  at::Tensor lm_head;  // [V, H]; the same tensor as embed_tokens when tie_word_embeddings
  at::Tensor inv_freq;  // [head_dim / 2] fp32, CPU
  // PEFT's modules_to_save: trainable fp32 copies that stand in for embed_tokens / lm_head in the forward pass
  // (cast to dtype() there, so that the gradient reaches the fp32 copy). Undefined: the frozen tensor above is used.
  // With tie_word_embeddings the two are one tensor, trained in both roles.
  at::Tensor embed_tokens_trainable;
  at::Tensor lm_head_trainable;

  // How a step runs (lib/model/exec_plan.h): checkpointing, offload, the keep ladder, kept dequantized weights, MLP
  // chunks, the attention kernel, where embeddings and lm_head live. Decided once (decide_plan) and set before
  // use; a default plan keeps everything (no checkpointing) on the model's device. The q, k, v and gate, up
  // projections run as one each wherever project_group takes them, gate / up's LoRA B terms inside the base GEMM,
  // and a checkpointed block's recomputation leaves out what only its output needs: not plan choices, the model's
  // way.
  ExecPlan plan;
  // The offloaded block inputs of the last forward pass, by layer, and the copies back to the GPU started ahead of
  // the backward pass (lib/model/llama.cpp: while block L's backward runs, block L-1's input is fetched on the side
  // stream). Shared by copies of the model.
  struct OffloadPrefetch;
  std::shared_ptr<OffloadPrefetch> offload_prefetch;
  // Offloaded tensors (block inputs, kept attention outputs) that the backward passes so far took from a copy
  // started ahead (for tests and logs).
  int64_t prefetched_offloads() const;
  // The SDPA backend (at::SDPBackend's value) that attention() runs for unpacked, unmasked rows of `seq` tokens
  // on `device` in `dtype` (allocates one [1, seq, heads, head_dim] query to ask torch).
  int64_t dense_attention_backend(int64_t seq, at::Device device, c10::ScalarType dtype) const;
  // cuDNN builds an execution plan for every new [batch, seq] shape (a tenth of a second or more, forward and
  // backward), so rows whose length changes from call to call (generation, one unpadded document per row) would
  // pay it on nearly every call. The first kCudnnShapes distinct shapes are admitted to the cuDNN path; a shape
  // seen before stays admitted; later new shapes take SDPA's own order (and flash varlen for batches).
  static constexpr size_t kCudnnShapes = 16;
  bool cudnn_admits(int64_t batch, int64_t seq) const;
  struct CudnnShapes {
    std::mutex mutex;
    std::set<std::pair<int64_t, int64_t>> admitted;
  };
  std::shared_ptr<CudnnShapes> cudnn_shapes = std::make_shared<CudnnShapes>();
  // Not owned; null when the blocks' parameters are all held (no sharding). With hooks, a block that records
  // for autograd must be checkpointed (its weights exist only between the hooks).
  BlockHooks* block_hooks = nullptr;

  explicit LlamaModel(LlamaConfig cfg);

  // [B, S] ids on any device -> [B, S, H] on device(). Host ids cost no sync when the embeddings live on the host.
  at::Tensor embed(const at::Tensor& input_ids) const;
  // Keeps the input embeddings and / or lm_head in pinned host memory (CUDA; a no-op on the CPU), frozen ones only;
  // tied, the one tensor moves in both roles. embed() then gathers the rows on the host and ships only them;
  // training's loss streams lm_head through the GPU in vocabulary slices (streamed_linear_cross_entropy). Each is
  // [V, H] in 16 bits: 0.98 GiB at Llama 3.1 8B.
  void to_host(bool embeddings, bool lm_head);
  bool embeddings_on_host() const;
  bool lm_head_on_host() const;
  // The [V, H] weights the forward pass uses, in dtype(): the trainable copy when there is one (differentiable
  // while grad mode is on, detached otherwise), else the frozen tensor.
  at::Tensor embed_weight() const;
  at::Tensor lm_head_weight() const;
  // Runs the blocks and the final norm. positions: [B, S] integer positions (undefined: 0..S-1 for each row).
  at::Tensor forward_hidden(const at::Tensor& inputs_embeds, const at::Tensor& positions = {}) const;
  at::Tensor logits(const at::Tensor& hidden) const;  // [.., H] -> [.., V]
  at::Tensor forward(const at::Tensor& input_ids) const { return logits(forward_hidden(embed(input_ids))); }
  // The batch's documents: positions restart per document and attention stays inside each document.
  at::Tensor forward_hidden(const at::Tensor& inputs_embeds, const Batch& batch) const;

  // Calls f(name, linear) for each block linear, with HF module names ("model.layers.0.self_attn.q_proj").
  template <typename F>
  void for_each_linear(F&& f);
  void set_training(bool training);

  // Hugging Face names of every dense tensor the model holds (lm_head omitted when tied; NF4 linears omitted;
  // linear biases included when the config has them, NF4 base or not).
  std::vector<std::pair<std::string, at::Tensor*>> named_tensors();

  at::Device device() const;
  c10::ScalarType dtype() const;

 private:
  at::Tensor attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const AttentionMask& mask) const;
  at::Tensor run_blocks(const at::Tensor& inputs_embeds, const at::Tensor& positions, const AttentionMask& mask) const;
  // Mistral's sliding window on a boolean mask over token indices: keeps j with i - window < j (undefined mask:
  // the plain causal one). Returns an undefined mask when the window covers the whole sequence.
  at::Tensor window_mask(const at::Tensor& mask, int64_t S, at::Device device) const;

 public:
  // The flash attention varlen layout for documents `doc_ids` [B, S] (-1: padding), or an undefined mask when
  // flash attention does not apply (CPU, fp32, head_dim): then dense masks are used.
  AttentionMask varlen_mask(const at::Tensor& doc_ids, at::Device device, c10::ScalarType dtype) const;
  // One decoder block (attention + MLP with their residuals); used by run_blocks and by the recomputation.
  at::Tensor block_forward(size_t layer, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                           const AttentionMask& mask) const;
  at::Tensor mlp(const LlamaBlock& b, const at::Tensor& x) const;
  // x + mlp(post_attention_layernorm(x)) of one block.
  at::Tensor mlp_residual(size_t layer, const at::Tensor& x) const;
};

template <typename F>
void LlamaModel::for_each_linear(F&& f) {
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& b = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    f(p + "self_attn.q_proj", b.q_proj);
    f(p + "self_attn.k_proj", b.k_proj);
    f(p + "self_attn.v_proj", b.v_proj);
    f(p + "self_attn.o_proj", b.o_proj);
    f(p + "mlp.gate_proj", b.gate_proj);
    f(p + "mlp.up_proj", b.up_proj);
    f(p + "mlp.down_proj", b.down_proj);
  }
}

}  // namespace qt
