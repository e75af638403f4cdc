#pragma once
// Per-block activation checkpointing (plan.checkpointing), with what the plan keeps beside each block's input (the
// keep ladder) and the activation offload, and the MLP over chunks of tokens (plan.mlp_chunk_tokens).
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#include "lib/model/llama.h"
#include "lib/model/pass.h"

namespace qt {

// Block `layer` of `model` on h, checkpointed: the forward pass records nothing but the input (and the keep
// ladder's tensors; offloaded to the host with plan.offload), the backward pass recomputes the block and goes back
// through it. `anchor`: defined (an empty leaf that requires grad) where h does not require grad (the first block
// over frozen embeddings), so that the node is recorded; h then gets no gradient.
at::Tensor checkpointed_block(const LlamaModel& model, size_t layer, const at::Tensor& h, const at::Tensor& cos,
                              const at::Tensor& sin, const AttentionMask& mask, const at::Tensor& anchor = {});

// x + mlp(post_attention_layernorm(x)) of block `layer` over chunks of `chunk` tokens: the MLP's [tokens,
// intermediate] activations and their gradients exist for one chunk at a time (one more MLP forward per step).
// Without grad mode (a checkpointed block's forward pass, evaluation) the chunks alone, no node.
at::Tensor chunked_mlp_residual(const LlamaModel& model, size_t layer, const at::Tensor& x, int64_t chunk,
                                const Pass& pass);

// `value` in place of `graph`'s value, the gradient going to graph as it is: a recomputation that builds a
// tensor's graph for the backward pass but takes its value from the forward pass (keep "residual").
at::Tensor keep_value(const at::Tensor& graph, const at::Tensor& value);

// a + b where the sum's value is never read (a checkpointed block's recomputation): its graph, gradients to both
// sides, over unwritten_output (one element) instead of [tokens, hidden] bytes held through the backward pass.
at::Tensor unused_sum(const at::Tensor& a, const at::Tensor& b);

}  // namespace qt
