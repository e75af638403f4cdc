#pragma once
// A LLaMA decoder in plain ATen ops (autograd-capable): RMSNorm, RoPE, grouped-query attention through
// at::scaled_dot_product_attention, SwiGLU MLP, lm_head. Parameter names follow Hugging Face's LlamaForCausalLM.
// The model (llama.cpp), its attention (attention.cpp), the block linears (qlora_linear.h), the grouped projections
// (projection_group.h), block checkpointing (block_checkpoint.h) and the activation offload
// (activation_offload.h) each have their file; a pass's settings travel explicitly (pass.h).
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
#include "lib/model/pass.h"
#include "lib/model/qlora_linear.h"

namespace qt {

class ActivationOffload;

// A tensor of the model as a sharding layer sees it (lib/dist/fully_shard.h): its name (HF's, or PEFT's for the
// adapters), the model field that holds it whole while gathered, whether it is trained, and what the field holds
// while the tensor is released: nothing, a [0, ...] tensor of its dtype and device (embeddings: model.device()
// keeps working), or a meta tensor of the full shape (Linear::in_features() and LoraAdapter::dora() keep working,
// any compute on it fails loudly).
struct ShardTensor {
  enum class Released { Undefined, EmptyRows, Meta };
  std::string name;
  at::Tensor* slot = nullptr;
  bool trainable = false;
  Released released = Released::Undefined;
};

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
  // What the passes did (for tests and logs); the activation offload (its pinned buffers, side stream and copies
  // in flight) and the compute-dtype LoRA factors kept between passes (keep_dequantized). Shared by copies of the
  // model.
  std::shared_ptr<ModelStats> stats;
  std::shared_ptr<ActivationOffload> offload;
  std::shared_ptr<LoraFactorCache> lora_factor_cache;
  // The settings of a forward pass under this plan (the factor cache where keep_dequantized, the stats).
  Pass base_pass() const;
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
  // The first `blocks` blocks' NF4 linears hold their weights dequantized for the run (plan.dequantized_blocks: a
  // HeldWeight each, filled on first use), the others none (0: none hold).
  void hold_dequantized(int64_t blocks);
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

  // The tensors of decoder block `layer`, one unit of sharding: its two norms, each linear's base (NF4: the packed
  // codes and their statistics) and bias, the LoRA A and B and DoRA's magnitude. The block's linears get private
  // copies of their NF4 weights and adapters first, so that the fields a sharding layer rewrites alias no other
  // model's. Qwen3's q / k norms are not listed (they stay whole).
  std::vector<ShardTensor> block_shard_tensors(size_t layer);
  // The input embeddings, and lm_head unless tied (then the one tensor is the embeddings'), as units of their own.
  ShardTensor embeddings_shard_tensor();
  ShardTensor lm_head_shard_tensor();

  // Hugging Face names of every dense tensor the model holds (lm_head omitted when tied; NF4 linears omitted;
  // linear biases included when the config has them, NF4 base or not).
  std::vector<std::pair<std::string, at::Tensor*>> named_tensors();

  at::Device device() const;
  c10::ScalarType dtype() const;

 private:
  // x_widened: x has the q / k / v group's concatenation columns after it (project_group's x_widened).
  at::Tensor attention(const LlamaBlock& b, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const AttentionMask& mask, const Pass& pass, bool x_widened = false) const;
  // The blocks and the final norm; rows of one whole document padded for cuDNN where the plan says so
  // (ExecPlan::row_multiple), the output cut back to the rows given.
  at::Tensor run_blocks(const at::Tensor& inputs_embeds, const at::Tensor& positions, const AttentionMask& mask) const;
  at::Tensor run_blocks_as_they_are(const at::Tensor& inputs_embeds, const at::Tensor& positions,
                                    const AttentionMask& mask) const;
  // Mistral's sliding window on a boolean mask over token indices: keeps j with i - window < j (undefined mask:
  // the plain causal one). Returns an undefined mask when the window covers the whole sequence.
  at::Tensor window_mask(const at::Tensor& mask, int64_t S, at::Device device) const;

 public:
  // The flash attention varlen layout for documents `doc_ids` [B, S] (-1: padding), or an undefined mask when
  // flash attention does not apply (CPU, fp32, head_dim): then dense masks are used.
  AttentionMask varlen_mask(const at::Tensor& doc_ids, at::Device device, c10::ScalarType dtype) const;
  // One decoder block (attention + MLP with their residuals); used by run_blocks and by the recomputation.
  at::Tensor block_forward(size_t layer, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                           const AttentionMask& mask, const Pass& pass) const;
  // A block's output left unsummed, h = x + y (x the residual after attention, y the MLP's output), so that the next
  // block's input norm (or the final norm) adds it in its own kernel (add_rms_norm_fused).
  struct Residual {
    at::Tensor x, y;
  };
  // block_forward whose input comes unsummed (`in` non-null: h is not read) and / or whose output is left unsummed
  // (`out` non-null: filled, and an undefined tensor returned, where the block ran the fused add and norm).
  at::Tensor block_forward_residual(size_t layer, const Residual* in, const at::Tensor& h, const at::Tensor& cos,
                                    const at::Tensor& sin, const AttentionMask& mask, const Pass& pass,
                                    Residual* out) const;
  // x_widened: x has gate / up's concatenation columns after it (project_group's x_widened).
  at::Tensor mlp(const LlamaBlock& b, const at::Tensor& x, const Pass& pass, bool x_widened = false) const;
  // x + mlp(post_attention_layernorm(x)) of one block.
  at::Tensor mlp_residual(size_t layer, const at::Tensor& x, const Pass& pass) const;
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
