#include "lib/model/block_checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/error.h"
#include "lib/kernels/attention_core.h"
#include "lib/model/activation_offload.h"

namespace qt {
namespace {

// `value` in place of `graph`'s value: the gradient goes to graph as it is. For a recomputation that builds a
// tensor's graph for the backward pass but takes its value from the forward pass (keep_residual).
struct KeepValueFn : public torch::autograd::Function<KeepValueFn> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& graph, const at::Tensor& value) {
    (void)graph;
    return value;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};
// a + b for the graph alone (a recomputation's block output, never read): the gradient goes to both as it is, the
// value is unwritten_output's (no [tokens, hidden] bytes held through the block's backward pass).
struct UnusedSumFn : public torch::autograd::Function<UnusedSumFn> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& a, const at::Tensor& b) {
    QT_CHECK(a.sizes() == b.sizes(), ErrorKind::Internal, "unused_sum: the two sides differ in shape");
    return unwritten_output(a.sizes(), a.options());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], grads[0]};
  }
};
// The tensors the keep ladder keeps in a stash beside the attention output (its softmax statistics; keep_qkv's
// and keep_residual's), with the keys BlockCheckpointFn saves them under (offloaded with the output).
std::array<std::pair<const char*, at::Tensor*>, 6> kept_extras(AttentionStash& s) {
  return {{{"attn_lse", &s.lse}, {"attn_q", &s.q}, {"attn_k", &s.k}, {"attn_v", &s.v}, {"attn_qkv", &s.qkv},
           {"attn_residual", &s.residual}}};
}

// Per-block activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"), the
// reentrant form: forward runs the block without recording; backward re-runs it with recording on the saved
// input and back-propagates through that, which also accumulates the gradients of the block's LoRA weights.
// RNG state (LoRA dropout) is saved and restored so that the recomputation draws the same masks.
struct BlockCheckpointFn : public torch::autograd::Function<BlockCheckpointFn> {
  // cos, sin and the mask carry no gradient: they travel in saved_data, not as inputs (the mask may be undefined).
  // aux: cos, sin, the dense mask, cu_seqlens (either mask may be undefined); ints: max_seqlen, window.
  // anchor: an empty leaf that requires grad where h does not (BlockCheckpointFn records a node only then).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& anchor,
                            int64_t model_ptr, int64_t layer, const std::vector<at::Tensor>& aux, int64_t max_seqlen,
                            int64_t window) {
    (void)anchor;
    const auto* model = reinterpret_cast<const LlamaModel*>(model_ptr);
    ctx->saved_data["model"] = model_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["cpu_rng"] = at::detail::getDefaultCPUGenerator().get_state();
    if (h.is_cuda()) ctx->saved_data["cuda_rng"] = at::cuda::detail::getDefaultCUDAGenerator(h.get_device()).get_state();
    if (model->plan.offload && h.is_cuda()) {
      ctx->saved_data["host"] = model->offload->to_host(h);
    } else {
      ctx->save_for_backward({h});
    }
    ctx->saved_data["cos"] = aux[0];
    ctx->saved_data["sin"] = aux[1];
    if (aux[2].defined()) ctx->saved_data["mask"] = aux[2];
    if (aux[3].defined()) ctx->saved_data["cu_seqlens"] = aux[3];
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["window"] = window;
    // keep_attention: the attention output and log-sum-exp of this pass are kept (the output offloaded with the
    // block input) and replayed in the recomputation.
    AttentionStash stash;
    stash.keep_qkv = model->plan.keeps(KeepLevel::Qkv);
    stash.keep_residual = model->plan.keeps(KeepLevel::Residual);
    stash.keep_gate_up = model->plan.keeps_gate_up(layer, static_cast<int64_t>(model->layers.size()));
    Pass pass = model->base_pass();
    if (model->plan.keeps(KeepLevel::Attention)) pass.stash = &stash;
    at::Tensor out = model->block_forward(static_cast<size_t>(layer), h, aux[0], aux[1],
                                          AttentionMask{aux[2], aux[3], max_seqlen, window}, pass);
    // The offloaded tensors, fetched back together a block ahead in the backward pass.
    const bool host = ctx->saved_data.count("host") > 0;
    std::vector<at::Tensor> hosts;
    if (host) hosts.push_back(ctx->saved_data["host"].toTensor());
    auto keep = [&](const std::string& key, const at::Tensor& t, int64_t lag = 0) {
      if (!host) {
        ctx->saved_data[key] = t;
        return;
      }
      hosts.push_back(model->offload->to_host(t, lag));
      ctx->saved_data[key + "_host"] = hosts.back();
    };
    if (stash.out.defined()) {
      keep("attn_out", stash.out);
      ctx->saved_data["attn_seed"] = stash.seed;
      ctx->saved_data["attn_offset"] = stash.offset;
      ctx->saved_data["attn_cum_q"] = stash.cum_q;
      ctx->saved_data["attn_cum_k"] = stash.cum_k;
      // The softmax statistics, keep_qkv's and keep_residual's tensors: kept (offloaded) the same way.
      for (auto [key, t] : kept_extras(stash))
        if (t->defined()) keep(key, *t);
    }
    // The gate / up output stays on the device (gate_up_kept_blocks: no PCIe copy of 2 I a token), for rows of one
    // whole document and packed rows alike, or goes to the host with the rest (gate_up_offloaded_blocks; its copy,
    // longer than a block's compute at long rows, waited for a block later than theirs).
    if (stash.gate_up.defined()) {
      if (model->plan.offloads_gate_up(layer, static_cast<int64_t>(model->layers.size())))
        keep("mlp_gate_up", stash.gate_up, /*lag=*/1);
      else
        ctx->saved_data["mlp_gate_up"] = stash.gate_up;
    }
    if (host) model->offload->note(layer, std::move(hosts));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    const auto layer = static_cast<size_t>(ctx->saved_data["layer"].toInt());
    if (model->block_hooks) model->block_hooks->before_block(layer, /*backward=*/true);
    at::Tensor x;
    // (The first block over frozen embeddings: no gradient for its input, so none computed.)
    const bool input_grad = ctx->needs_input_grad(0);
    ActivationOffload& prefetch = *model->offload;
    if (ctx->saved_data.count("host")) {
      x = prefetch.take(ctx->saved_data["host"].toTensor(), grads[0].device()).requires_grad_(input_grad);
      // The next block back (the layer before this one) copies its input in while this block recomputes.
      if (layer > 0) prefetch.start(static_cast<int64_t>(layer) - 1, grads[0].device());
    } else {
      x = ctx->get_saved_variables()[0].detach().requires_grad_(input_grad);
    }
    at::Tensor out;
    {
      auto cpu_gen = at::detail::getDefaultCPUGenerator();
      at::Tensor cpu_now = cpu_gen.get_state();
      cpu_gen.set_state(ctx->saved_data["cpu_rng"].toTensor());
      std::optional<at::Generator> cuda_gen;
      at::Tensor cuda_now;
      if (x.is_cuda()) {
        cuda_gen = at::cuda::detail::getDefaultCUDAGenerator(x.get_device());
        cuda_now = cuda_gen->get_state();
        cuda_gen->set_state(ctx->saved_data["cuda_rng"].toTensor());
      }
      at::AutoGradMode enable(true);
      auto saved_tensor = [&](const char* key) {
        return ctx->saved_data.count(key) ? ctx->saved_data[key].toTensor() : at::Tensor();
      };
      const AttentionMask mask{saved_tensor("mask"), saved_tensor("cu_seqlens"), ctx->saved_data["max_seqlen"].toInt(),
                               ctx->saved_data["window"].toInt()};
      AttentionStash replay;
      replay.replay = true;
      // A kept tensor kept on the device is handed over as an alias (detach): the attention output becomes the
      // replayed attention node's output, and autograd gives that tensor the recomputation's graph as its history.
      // Given as saved_data's own tensor, that history (the block's recomputed input and its gradient) lived as long
      // as this node's saved_data, i.e. to the end of the step: 2 H a token for every block done (fuzzing helper,
      // eleventh session). The offloaded ones are fresh copies.
      if (ctx->saved_data.count("attn_out_host")) replay.out = prefetch.take(ctx->saved_data["attn_out_host"].toTensor(), x.device());
      else if (ctx->saved_data.count("attn_out")) replay.out = ctx->saved_data["attn_out"].toTensor().detach();
      for (auto [key, t] : kept_extras(replay)) {
        const std::string host = std::string(key) + "_host";
        if (ctx->saved_data.count(host)) *t = prefetch.take(ctx->saved_data[host].toTensor(), x.device());
        else if (ctx->saved_data.count(key)) *t = ctx->saved_data[key].toTensor().detach();
      }
      // Taken out of saved_data (which lives to the end of the step): freed with this block's backward pass.
      if (ctx->saved_data.count("mlp_gate_up")) {
        replay.gate_up = ctx->saved_data["mlp_gate_up"].toTensor().detach();
        ctx->saved_data.erase("mlp_gate_up");
      } else if (ctx->saved_data.count("mlp_gate_up_host")) {
        replay.gate_up = prefetch.take(ctx->saved_data["mlp_gate_up_host"].toTensor(), x.device());
      }
      if (replay.out.defined()) {
        replay.seed = saved_tensor("attn_seed");
        replay.offset = saved_tensor("attn_offset");
        replay.cum_q = saved_tensor("attn_cum_q");
        replay.cum_k = saved_tensor("attn_cum_k");
      }
      // The recomputation for the backward below: the dequantized weights kept for it, the output not read.
      Pass pass = model->base_pass();
      pass.keep_dequantized = model->plan.keep_dequantized;
      pass.output_unused = true;
      pass.keep_swiglu = true;  // made the moment before its backward pass: kept, not computed again there
      if (replay.out.defined() || replay.gate_up.defined()) pass.stash = &replay;
      out = model->block_forward(layer, x, ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor(), mask,
                                 pass);
      cpu_gen.set_state(cpu_now);
      if (cuda_gen) cuda_gen->set_state(cuda_now);
    }
    if (out.requires_grad()) torch::autograd::backward({out}, {grads[0]});
    if (model->block_hooks) model->block_hooks->after_block(layer, /*backward=*/true);
    return {input_grad ? x.grad() : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// x + mlp(norm(x)) chunk by chunk into one output, with no graph of its own.
at::Tensor mlp_residual_by_chunks(const LlamaModel& model, size_t layer, const at::Tensor& x, int64_t chunk,
                                  const Pass& pass) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  at::Tensor out = at::empty_like(x2);
  for (int64_t s = 0; s < x2.size(0); s += chunk) {
    const int64_t n = std::min(chunk, x2.size(0) - s);
    out.narrow(0, s, n).copy_(model.mlp_residual(layer, x2.narrow(0, s, n), pass));
  }
  pass.count(&ModelStats::mlp_chunked_passes);
  return out.view(x.sizes());
}

// The post-attention half of a block, x + mlp(norm(x)), over chunks of tokens: forward keeps only x; backward
// recomputes each chunk with recording on and back-propagates it before the next, so the MLP's [tokens,
// intermediate] activations and their gradients exist for one chunk at a time (long contexts). One more MLP
// forward per step. Not used with LoRA dropout in the MLP (its masks would differ in the recomputation).
struct ChunkedMlpFn : public torch::autograd::Function<ChunkedMlpFn> {
  // pass_ptr: the Pass of the block (read in this call only). anchor: an empty leaf that requires grad where x does
  // not (the first block's recomputation over frozen embeddings with no trainable tensor in its attention): the MLP's
  // LoRA weights reach this node through the model, not as inputs, so that without it no node would be recorded.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& anchor,
                            int64_t model_ptr, int64_t layer, int64_t chunk, int64_t pass_ptr) {
    (void)anchor;
    const auto* model = reinterpret_cast<const LlamaModel*>(model_ptr);
    const Pass& pass = *reinterpret_cast<const Pass*>(pass_ptr);
    ctx->save_for_backward({x});
    ctx->saved_data["model"] = model_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["chunk"] = chunk;
    if (pass.output_unused) {  // a checkpointed block's recomputation: the backward below recomputes each chunk
      pass.count(&ModelStats::outputs_skipped);
      return unwritten_output(x.sizes(), x.options());
    }
    return mlp_residual_by_chunks(*model, static_cast<size_t>(layer), x, chunk, pass);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    const auto layer = static_cast<size_t>(ctx->saved_data["layer"].toInt());
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const at::Tensor x = ctx->get_saved_variables()[0];
    at::Tensor x2 = x.reshape({-1, x.size(-1)});
    at::Tensor dy = grads[0].reshape({-1, x.size(-1)});
    const bool input_grad = ctx->needs_input_grad(0);
    at::Tensor dx = input_grad ? at::empty_like(x2) : at::Tensor();
    Pass pass = model->base_pass();
    pass.output_unused = true;  // yc's value is not read either: down_proj's is skipped
    pass.keep_swiglu = true;    // the chunk's SwiGLU output, for the backward pass that follows at once
    for (int64_t s = 0; s < x2.size(0); s += chunk) {
      const int64_t n = std::min(chunk, x2.size(0) - s);
      at::Tensor xc = x2.narrow(0, s, n).detach().requires_grad_(input_grad);
      at::Tensor yc;
      {
        at::AutoGradMode enable(true);
        yc = model->mlp_residual(layer, xc, pass);
      }
      if (yc.requires_grad()) torch::autograd::backward({yc}, {dy.narrow(0, s, n)});
      if (input_grad) dx.narrow(0, s, n).copy_(xc.grad());
    }
    return {input_grad ? dx.view(x.sizes()) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

at::Tensor checkpointed_block(const LlamaModel& model, size_t layer, const at::Tensor& h, const at::Tensor& cos,
                              const at::Tensor& sin, const AttentionMask& mask, const at::Tensor& anchor) {
  // (An undefined tensor is no input a custom function takes: an empty one that needs no gradient stands for none.)
  return BlockCheckpointFn::apply(h, anchor.defined() ? anchor : at::empty({0}, h.options()),
                                  reinterpret_cast<int64_t>(&model), static_cast<int64_t>(layer),
                                  std::vector<at::Tensor>{cos, sin, mask.dense, mask.cu_seqlens}, mask.max_seqlen,
                                  mask.window);
}

at::Tensor chunked_mlp_residual(const LlamaModel& model, size_t layer, const at::Tensor& x, int64_t chunk,
                                const Pass& pass) {
  // With no graph to record (a checkpointed block's forward pass, evaluation): the chunks alone.
  if (!at::GradMode::is_enabled()) return mlp_residual_by_chunks(model, layer, x, chunk, pass);
  const bool anchored = !x.requires_grad();
  const at::Tensor anchor = at::empty({0}, x.options()).requires_grad_(anchored);
  return ChunkedMlpFn::apply(x, anchor, reinterpret_cast<int64_t>(&model), static_cast<int64_t>(layer), chunk,
                             reinterpret_cast<int64_t>(&pass));
}

at::Tensor keep_value(const at::Tensor& graph, const at::Tensor& value) { return KeepValueFn::apply(graph, value); }

at::Tensor unused_sum(const at::Tensor& a, const at::Tensor& b) { return UnusedSumFn::apply(a, b); }

}  // namespace qt
