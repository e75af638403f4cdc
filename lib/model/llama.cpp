#include "lib/model/llama.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/attention_core.h"
#include "lib/kernels/fused_ops.h"
#include "lib/kernels/nf4_gemm.h"
#include "lib/model/activation_offload.h"
#include "lib/model/block_checkpoint.h"
#include "lib/model/lora.h"
#include "lib/model/projection_group.h"
#include "lib/model/rope.h"

namespace qt {

void LlamaModel::set_training(bool training) {
  for_each_linear([&](const std::string&, Linear& l) { l.training = training; });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm_fused(x, weight, eps);  // the plain-ATen reference off CUDA
}

LlamaModel::LlamaModel(LlamaConfig cfg)
    : config(std::move(cfg)),
      stats(std::make_shared<ModelStats>()),
      offload(std::make_shared<ActivationOffload>(stats.get())),
      lora_factor_cache(std::make_shared<LoraFactorCache>()) {
  layers.resize(config.num_hidden_layers);
  inv_freq = rope_inv_freq(config.rope, config.head_dim);
}

Pass LlamaModel::base_pass() const {
  Pass p;
  // (the cache is kept where the plan keeps dequantized weights, for the recomputation or held for the run)
  p.factors = plan.keep_dequantized || plan.dequantized_blocks > 0 ? lora_factor_cache.get() : nullptr;
  p.stats = stats.get();
  p.keep_swiglu = plan.keep_swiglu;
  const char* fold = std::getenv("QT_LORA_GRAD_GEMM");
  p.lora_in_grad_gemm = !(fold && std::string(fold) == "0");
  const char* dropout_kernels = std::getenv("QT_LORA_DROPOUT_KERNELS");
  p.dropout_kernels = !(dropout_kernels && std::string(dropout_kernels) == "0");
  const char* refresh = std::getenv("QT_LORA_FACTOR_REFRESH");
  p.refresh_factors = !(refresh && std::string(refresh) == "0");
  const char* add_norm = std::getenv("QT_FUSED_ADD_NORM");
  p.fused_add_norm = !(add_norm && std::string(add_norm) == "0");
  const char* lora_gemm = std::getenv("QT_LORA_GEMM_KERNELS");
  const std::string gemm = lora_gemm ? lora_gemm : "";
  QT_CHECK(gemm.empty() || gemm == "0" || gemm == "1" || gemm == "project" || gemm == "grads" || gemm == "narrow",
           ErrorKind::Usage, "QT_LORA_GEMM_KERNELS=" + gemm + ": expected 0, 1, project, grads or narrow");
  p.lora_project_kernel = gemm.empty() ? kLoraProjectKernelByDefault : gemm == "1" || gemm == "project";
  p.lora_grad_kernel = gemm.empty() ? kLoraGradKernelByDefault : gemm == "1" || gemm == "grads" || gemm == "narrow";
  p.lora_grad_max_width = gemm == "narrow" ? kLoraGradNarrowWidth : 0;
  const char* add_after = std::getenv("QT_LORA_ADD_AFTER");
  p.lora_add_after = add_after && std::string(add_after) == "1";
  const char* norm_concat = std::getenv("QT_NORM_INTO_CONCAT");
  p.norm_into_concat = !(norm_concat && std::string(norm_concat) == "0");
  const char* nf4_gemm = std::getenv("QT_NF4_GEMM");
  p.nf4_gemm = nf4_gemm && std::string(nf4_gemm) == "1";
  if (const char* variant = std::getenv("QT_NF4_GEMM_VARIANT")) p.nf4_gemm_variant = kernels::nf4_gemm_variant(variant);
  return p;
}

// The final norm's weight: embed_tokens and lm_head may live on the host (to_host).
at::Device LlamaModel::device() const { return norm.device(); }
c10::ScalarType LlamaModel::dtype() const { return norm.scalar_type(); }

bool LlamaModel::embeddings_on_host() const { return embed_tokens.device() != device(); }
bool LlamaModel::lm_head_on_host() const { return lm_head.device() != device(); }

void LlamaModel::hold_dequantized(int64_t blocks) {
  for (int64_t i = 0; i < static_cast<int64_t>(layers.size()); ++i) {
    LlamaBlock& b = layers[static_cast<size_t>(i)];
    for (Linear* l : {&b.q_proj, &b.k_proj, &b.v_proj, &b.o_proj, &b.gate_proj, &b.up_proj, &b.down_proj}) {
      if (i < blocks && l->quantized()) {
        if (!l->held) l->held = std::make_shared<HeldWeight>();
      } else {
        l->held.reset();
      }
    }
  }
}

void LlamaModel::to_host(bool embeddings, bool head) {
  const bool tied = config.tie_word_embeddings || lm_head.is_same(embed_tokens);
  QT_CHECK(!tied || embeddings == head, ErrorKind::Internal,
           "to_host: tied embeddings are one tensor, on the host in both roles or in neither");
  QT_CHECK((!embeddings || !embed_tokens_trainable.defined()) && (!head || !lm_head_trainable.defined()),
           ErrorKind::Internal, "to_host: only frozen tensors live on the host (modules_to_save trains them)");
  if (!device().is_cuda()) return;
  if (embeddings && !embeddings_on_host()) embed_tokens = embed_tokens.to(at::kCPU).pin_memory();
  if (head && !lm_head_on_host()) lm_head = tied ? embed_tokens : lm_head.to(at::kCPU).pin_memory();
}

namespace {
at::Tensor compute_weight(const at::Tensor& frozen, const at::Tensor& trainable) {
  if (!trainable.defined()) return frozen;
  at::Tensor w = trainable.to(frozen.scalar_type());
  return at::GradMode::is_enabled() ? w : w.detach();
}
}  // namespace

at::Tensor LlamaModel::embed_weight() const { return compute_weight(embed_tokens, embed_tokens_trainable); }
at::Tensor LlamaModel::lm_head_weight() const { return compute_weight(lm_head, lm_head_trainable); }

at::Tensor LlamaModel::embed(const at::Tensor& input_ids) const {
  if (!embeddings_on_host()) return at::embedding(embed_weight(), to_device_async(input_ids, device()));
  // The rows gathered on the host and only they shipped, from pinned memory without waiting (the caching host
  // allocator keeps the staging block until the copy is done): [tokens, H] over PCIe instead of [V, H] on the GPU.
  // Gathered straight into a pinned block the host allocator reuses: at::embedding's fresh [tokens, H] tensor took
  // a page fault a page and pin_memory() copied it again (on this project's 2-core machine, 4096 rows of 8 KB:
  // 33-77 ms through at::embedding, 6 ms with index_select into a buffer already touched).
  const at::Tensor ids = input_ids.to(at::kCPU).reshape({-1});
  at::Tensor rows = at::empty({ids.numel(), embed_tokens.size(1)}, embed_tokens.options().pinned_memory(true));
  at::index_select_out(rows, embed_tokens, 0, ids);
  std::vector<int64_t> shape(input_ids.sizes().begin(), input_ids.sizes().end());
  shape.push_back(embed_tokens.size(1));
  return rows.view(shape).to(device(), /*non_blocking=*/true);
}

// The block's last linear: in a recomputation whose output is not read, down_proj computes only what its backward
// saves.
at::Tensor LlamaModel::mlp(const LlamaBlock& b, const at::Tensor& x, const Pass& pass, bool x_widened) const {
  auto down = [&](const at::Tensor& a) {
    return pass.output_unused ? linear_output_unused(b.down_proj, a, pass) : b.down_proj.forward(a, pass);
  };
  // A checkpointed block that keeps its gate / up output (ExecPlan::gate_up_kept_blocks): recorded in its forward
  // pass; in its recomputation the projection's node for the backward pass without its output (no GEMM), the kept
  // value in its place. (Packed rows too: this needs none of the attention output the ladder keeps.)
  AttentionStash* stash = pass.stash;
  at::Tensor gate_up;
  if (stash && stash->replay && stash->gate_up.defined()) {
    if (at::Tensor graph = project_group({&b.gate_proj, &b.up_proj}, x, pass, /*concat_b=*/false,
                                         /*output_unused=*/true, x_widened);
        graph.defined()) {
      gate_up = keep_value(graph, stash->gate_up.detach());
      pass.count(&ModelStats::gate_up_replays);
    }
  }
  if (!gate_up.defined()) {
    gate_up = project_group({&b.gate_proj, &b.up_proj}, x, pass, /*concat_b=*/true, /*output_unused=*/false,
                            x_widened);
    if (gate_up.defined() && stash && !stash->replay && stash->keep_gate_up) stash->gate_up = gate_up;
  }
  if (gate_up.defined()) {
    // down_proj keeps gate_up, not the SwiGLU output (recomputed in its backward pass): I elements a token less.
    if (at::Tensor y = swiglu_linear(b.down_proj, gate_up, pass, pass.output_unused); y.defined()) return y;
    return down(swiglu_packed(gate_up));
  }
  // gate before up, as transformers calls them: with LoRA dropout each draws its mask in that order (an argument
  // list would leave the order to the compiler).
  const at::Tensor gate = b.gate_proj.forward(x, pass);
  const at::Tensor up = b.up_proj.forward(x, pass);
  return down(swiglu_fused(gate, up));
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const at::Tensor& positions) const {
  QT_CHECK(inputs_embeds.dim() == 3 && inputs_embeds.size(2) == config.hidden_size, ErrorKind::Internal,
           "forward_hidden: expected [batch, seq, hidden] embeddings");
  const int64_t B = inputs_embeds.size(0), S = inputs_embeds.size(1);
  const at::Device device = inputs_embeds.device();
  at::Tensor pos = positions.defined()
                       ? positions
                       : at::arange(S, at::TensorOptions().dtype(at::kLong).device(device)).expand({B, S});
  if (!config.sliding_window || S <= *config.sliding_window) return run_blocks(inputs_embeds, pos, AttentionMask{});
  // A window shorter than the rows: each row one document for flash attention's window, else a dense mask.
  AttentionMask varlen = varlen_mask(at::zeros({B, S}, at::TensorOptions().dtype(at::kInt)), device,
                                     inputs_embeds.scalar_type());
  if (varlen.cu_seqlens.defined()) return run_blocks(inputs_embeds, pos, varlen);
  return run_blocks(inputs_embeds, pos, AttentionMask{window_mask(/*mask=*/{}, S, device), {}, 0, -1});
}

at::Tensor LlamaModel::run_blocks(const at::Tensor& inputs_embeds, const at::Tensor& positions,
                                  const AttentionMask& mask) const {
  // Rows of one whole document padded at their end for cuDNN (plan.row_multiple): zero embeddings at position 0
  // (finite through every block; no real token attends to them), the outputs cut back to the row.
  const int64_t S = inputs_embeds.size(1), run_seq = padded_row_length(S, plan.row_multiple);
  if (run_seq != S && !mask.dense.defined() && !mask.cu_seqlens.defined()) {
    const at::Tensor h = at::constant_pad_nd(inputs_embeds, {0, 0, 0, run_seq - S});
    const at::Tensor pos = at::constant_pad_nd(positions, {0, run_seq - S});
    if (stats) ++stats->padded_runs;
    return run_blocks_as_they_are(h, pos, mask).narrow(1, 0, S);
  }
  return run_blocks_as_they_are(inputs_embeds, positions, mask);
}

at::Tensor LlamaModel::run_blocks_as_they_are(const at::Tensor& inputs_embeds, const at::Tensor& positions,
                                              const AttentionMask& mask) const {
  at::Tensor freq = inv_freq;
  if (config.rope.type == RopeType::Dynamic) {
    // transformers' dynamic_rope_update: the frequencies follow the longest position of the batch
    // (max(position_ids) + 1) once it exceeds max_position_embeddings. A fresh computation per call, as a model
    // that has seen no longer sequence before.
    const int64_t seq_len = positions.max().item<int64_t>() + 1;
    if (seq_len > config.max_position_embeddings)
      freq = rope_dynamic_inv_freq(config.rope, config.head_dim, seq_len, config.max_position_embeddings);
  }
  auto [cos, sin] = rope_cos_sin(freq, positions, inputs_embeds.scalar_type(), config.rope.attention_factor);
  at::Tensor h = inputs_embeds;
  const bool checkpoint = plan.checkpointing && at::GradMode::is_enabled();
  // The checkpoint function records a backward node only when an input requires grad; with frozen embeddings the
  // first block's input does not, and the LoRA weights inside the blocks would get no gradient. An empty leaf that
  // requires grad goes in beside it: a leaf made of the embedding output itself would hold those [tokens, hidden]
  // bytes through the step (its gradient accumulator keeps it) after the block's input went to the host.
  const at::Tensor anchor = checkpoint && !h.requires_grad()
                                ? at::empty({0}, h.options()).requires_grad_(true)
                                : at::Tensor();
  QT_CHECK(!block_hooks || ((checkpoint && plan.blocks_without_checkpointing == 0) || !at::GradMode::is_enabled()),
           ErrorKind::Internal,
           "sharded blocks record for autograd only with checkpointing (their weights are freed after forward)");
  // The last plan.blocks_without_checkpointing blocks keep their activations (no recomputation).
  const size_t checkpointed = checkpoint ? layers.size() - std::min<size_t>(layers.size(), static_cast<size_t>(std::max<int64_t>(0, plan.blocks_without_checkpointing))) : 0;
  const Pass pass = base_pass();
  if (pass.factors && pass.refresh_factors) pass.factors->refresh(pass.stats);
  // Blocks that keep their activations hand their output on unsummed (x, y) where they ran the fused add and norm:
  // the next block's input norm (or the final norm) adds it in its own kernel, one add a block less each way.
  std::optional<Residual> carried;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (block_hooks) block_hooks->before_block(i, /*backward=*/false);
    if (i < checkpointed) {  // (the checkpointed blocks come first: nothing is carried into them)
      h = checkpointed_block(*this, i, h, cos, sin, mask, i == 0 ? anchor : at::Tensor());
    } else {
      Residual next;
      h = block_forward_residual(i, carried ? &*carried : nullptr, h, cos, sin, mask, pass,
                                 pass.fused_add_norm ? &next : nullptr);
      carried.reset();
      if (!h.defined()) carried = std::move(next);
    }
    if (block_hooks) block_hooks->after_block(i, /*backward=*/false);
  }
  if (carried) return add_rms_norm_fused(carried->x, carried->y, norm, config.rms_norm_eps)[1];
  return rms_norm(h, norm, config.rms_norm_eps);
}

at::Tensor LlamaModel::block_forward(size_t layer, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                                     const AttentionMask& mask, const Pass& pass) const {
  return block_forward_residual(layer, nullptr, h, cos, sin, mask, pass, nullptr);
}

at::Tensor LlamaModel::block_forward_residual(size_t layer, const Residual* in, const at::Tensor& h_in,
                                              const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                                              const Pass& pass, Residual* out) const {
  const LlamaBlock& b = layers[layer];
  // The norms write into the first columns of the q / k / v and gate / up groups' concatenated inputs
  // (Pass::norm_into_concat), except where keep_qkv's recomputation projects nothing.
  const at::Tensor& like = in ? in->x : h_in;
  const bool replay_qkv = pass.stash && pass.stash->replay &&
                          (b.q_norm.defined() ? pass.stash->qkv.defined() : pass.stash->q.defined());
  const int64_t qkv_spare =
      pass.norm_into_concat && !replay_qkv ? concat_input_spare({&b.q_proj, &b.k_proj, &b.v_proj}, like) : 0;
  at::Tensor h, normed;
  if (in) {
    auto sum = add_rms_norm_fused(in->x, in->y, b.input_layernorm, config.rms_norm_eps, qkv_spare);
    h = std::move(sum[0]);
    normed = std::move(sum[1]);
  } else {
    h = h_in;
    normed = rms_norm_fused(h, b.input_layernorm, config.rms_norm_eps, qkv_spare);
  }
  const at::Tensor attn = attention(b, normed, cos, sin, mask, pass, qkv_spare > 0);
  auto dropout = [](const Linear& l) { return l.training && l.lora && l.lora->dropout > 0; };
  // (Without a graph too: a checkpointed block's forward pass runs with none, and a whole row's MLP there took
  // 3 I a token at once, 10 GB at 117,760 tokens of the 8B shape.)
  const bool chunked = plan.mlp_chunk_tokens > 0 && h.numel() / h.size(-1) > plan.mlp_chunk_tokens &&
                       !dropout(b.gate_proj) && !dropout(b.up_proj) && !dropout(b.down_proj);
  // The attention residual and the MLP's input norm in one kernel, where the keep ladder neither records nor
  // replays the residual and the MLP runs whole (Pass::fused_add_norm).
  if (pass.fused_add_norm && !chunked && !(pass.stash && pass.stash->out.defined())) {
    const int64_t mlp_spare =
        pass.norm_into_concat ? concat_input_spare({&b.gate_proj, &b.up_proj}, h) : 0;
    const auto [x, n] = add_rms_norm_fused(h, attn, b.post_attention_layernorm, config.rms_norm_eps, mlp_spare);
    const at::Tensor y = mlp(b, n, pass, mlp_spare > 0);
    if (out && !pass.output_unused) {
      out->x = x;
      out->y = y;
      pass.count(&ModelStats::residuals_carried);
      return at::Tensor();
    }
    return pass.output_unused ? unused_sum(x, y) : x + y;
  }
  at::Tensor x = h + attn;
  if (AttentionStash* stash = pass.stash; stash && stash->out.defined()) {
    if (stash->replay && stash->residual.defined()) {
      x = keep_value(x, stash->residual.detach());
      pass.count(&ModelStats::residual_replays);
    } else if (!stash->replay && stash->keep_residual) {
      stash->residual = x;
    }
  }
  if (chunked) return chunked_mlp_residual(*this, layer, x, plan.mlp_chunk_tokens, pass);
  return mlp_residual(layer, x, pass);
}

at::Tensor LlamaModel::mlp_residual(size_t layer, const at::Tensor& x, const Pass& pass) const {
  const LlamaBlock& b = layers[layer];
  const at::Tensor y = mlp(b, rms_norm(x, b.post_attention_layernorm, config.rms_norm_eps), pass);
  return pass.output_unused ? unused_sum(x, y) : x + y;
}

at::Tensor LlamaModel::forward_hidden(const at::Tensor& inputs_embeds, const Batch& batch) const {
  if (!batch.doc_ids.defined()) return forward_hidden(inputs_embeds, batch.positions);
  // One whole document in every row, no window to apply: plain causal attention, the call cuDNN's kernel takes
  // (it has no varlen path here).
  const int64_t S = inputs_embeds.size(1);
  if (plan.attention == AttentionKernel::Cudnn && inputs_embeds.is_cuda() &&
      (!config.sliding_window || S <= *config.sliding_window) && (batch.doc_ids == 0).all().item<bool>() &&
      cudnn_admits(inputs_embeds.size(0), padded_row_length(S, plan.row_multiple)))
    return forward_hidden(inputs_embeds, to_device_async(batch.positions, inputs_embeds.device()));
  AttentionMask varlen = varlen_mask(batch.doc_ids, inputs_embeds.device(), inputs_embeds.scalar_type());
  if (varlen.cu_seqlens.defined())
    return run_blocks(inputs_embeds, to_device_async(batch.positions, inputs_embeds.device()), varlen);
  // Block-diagonal causal mask [B, 1, S, S]: token i sees token j <= i of its own document. Padding (doc -1)
  // sees only itself, so that no softmax row is empty (its outputs carry no target).
  at::Tensor doc = to_device_async(batch.doc_ids, inputs_embeds.device());
  at::Tensor same = doc.unsqueeze(2) == doc.unsqueeze(1);
  at::Tensor causal = at::ones({S, S}, at::TensorOptions().dtype(at::kBool).device(doc.device())).tril();
  at::Tensor eye = at::eye(S, at::TensorOptions().dtype(at::kBool).device(doc.device()));
  at::Tensor mask = ((same & causal) & (doc >= 0).unsqueeze(2)) | eye;
  return run_blocks(inputs_embeds, to_device_async(batch.positions, inputs_embeds.device()),
                    AttentionMask{window_mask(mask.unsqueeze(1), S, inputs_embeds.device()), {}, 0, -1});
}

// With lm_head on the host, each call copies it over (evaluation and generation; training's loss streams it instead).
at::Tensor LlamaModel::logits(const at::Tensor& hidden) const {
  return at::linear(hidden, lm_head_weight().to(hidden.device()));
}

std::vector<ShardTensor> LlamaModel::block_shard_tensors(size_t layer) {
  LlamaBlock& b = layers.at(layer);
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  using R = ShardTensor::Released;
  std::vector<ShardTensor> out{{p + "input_layernorm.weight", &b.input_layernorm, false, R::Undefined},
                               {p + "post_attention_layernorm.weight", &b.post_attention_layernorm, false, R::Undefined}};
  const std::pair<const char*, Linear*> linears[] = {
      {"self_attn.q_proj", &b.q_proj}, {"self_attn.k_proj", &b.k_proj}, {"self_attn.v_proj", &b.v_proj},
      {"self_attn.o_proj", &b.o_proj}, {"mlp.gate_proj", &b.gate_proj}, {"mlp.up_proj", &b.up_proj},
      {"mlp.down_proj", &b.down_proj}};
  for (const auto& [suffix, l] : linears) {
    const std::string name = p + suffix;
    if (l->quantized()) {
      l->nf4 = std::make_shared<Nf4Weight>(*l->nf4);
      auto& d = l->nf4->data;
      out.push_back({name + ".weight", &d.packed, false, R::Undefined});
      out.push_back({name + ".weight.absmax", &d.absmax_q, false, R::Undefined});
      out.push_back({name + ".weight.nested_absmax", &d.nested_absmax, false, R::Undefined});
      out.push_back({name + ".weight.nested_quant_map", &d.nested_map, false, R::Undefined});
      out.push_back({name + ".weight.quant_map", &d.quant_map, false, R::Undefined});
    } else {
      out.push_back({name + ".weight", &l->weight, false, R::Meta});
    }
    if (l->bias.defined()) out.push_back({name + ".bias", &l->bias, false, R::Meta});
    if (l->lora) {
      l->lora = std::make_shared<LoraAdapter>(*l->lora);
      out.push_back({peft_lora_key(name, 'A'), &l->lora->A, true, R::Undefined});
      out.push_back({peft_lora_key(name, 'B'), &l->lora->B, true, R::Undefined});
      if (l->lora->dora()) out.push_back({peft_dora_key(name), &l->lora->magnitude, true, R::Meta});
    }
  }
  return out;
}

ShardTensor LlamaModel::embeddings_shard_tensor() {
  return {"model.embed_tokens.weight", &embed_tokens, false, ShardTensor::Released::EmptyRows};
}

ShardTensor LlamaModel::lm_head_shard_tensor() {
  return {"lm_head.weight", &lm_head, false, ShardTensor::Released::EmptyRows};
}

std::vector<std::pair<std::string, at::Tensor*>> LlamaModel::named_tensors() {
  std::vector<std::pair<std::string, at::Tensor*>> out;
  out.emplace_back("model.embed_tokens.weight", &embed_tokens);
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& b = layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "input_layernorm.weight", &b.input_layernorm);
    out.emplace_back(p + "post_attention_layernorm.weight", &b.post_attention_layernorm);
    if (config.qk_norm) {
      out.emplace_back(p + "self_attn.q_norm.weight", &b.q_norm);
      out.emplace_back(p + "self_attn.k_norm.weight", &b.k_norm);
    }
  }
  for_each_linear([&](const std::string& name, Linear& l) {
    if (!l.quantized()) out.emplace_back(name + ".weight", &l.weight);
    if (config.linear_has_bias(name)) out.emplace_back(name + ".bias", &l.bias);
  });
  out.emplace_back("model.norm.weight", &norm);
  if (!config.tie_word_embeddings) out.emplace_back("lm_head.weight", &lm_head);
  return out;
}

}  // namespace qt
