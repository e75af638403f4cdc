#pragma once
// The training recipe: load, attach adapters, step, log, evaluate, checkpoint, export. Reads like a recipe; the
// modules it calls know nothing of the loop.
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "lib/train/run_config.h"

namespace qt {

struct TrainSummary {
  int64_t steps = 0;
  double first_loss = 0;
  double last_loss = 0;
  double eval_loss = -1;  // < 0: no evaluation data
  double exact_match_before = -1;  // < 0: no exact-match evaluation configured
  double exact_match_after = -1;
  double seconds = 0;
  double tokens_per_s = 0;         // input tokens (padding not counted) per second of the training loop
  double target_tokens_per_s = 0;  // tokens in the loss per second
  std::string adapter_dir;
};

struct TrainOptions {
  std::string resume;  // "", "auto" or a checkpoint directory
  bool allow_resume_changes = false;  // --resume-allow-changes: a changed schedule length or train file resumes
  // Set by a SIGTERM/SIGINT handler: the loop checkpoints after the current step and stops.
  const std::atomic<bool>* stop_requested = nullptr;
};

TrainSummary train(const RunConfig& config, const TrainOptions& options);

// train.keep_attention "auto": keep the attention outputs (and replay them in the recomputation) where the
// attention forward is a large share of the step and the outputs go to the host with the block inputs: offload on,
// at least 4096 tokens per micro-batch (measured on an H200, docs/PERFORMANCE.md: 1.037x the step at 8B 1 x 8192,
// 1.09x at 32k; 1.009x at 2 x 2048 once cuDNN took grouped K/V as they are, 1.002x before), and the offloaded
// tensors, block inputs and attention outputs of every layer, within half of `host_bytes` (this rank's share of the
// host's physical memory). hidden and q_size: the model's hidden size and heads x head_dim; 2-byte activations.
// kept_width: the elements per token and layer kept beside them (LlamaModel::keep_qkv: (q + 2 kv heads) x
// head_dim; keep_residual: hidden), counted in the same budget.
bool keep_attention_auto(int64_t tokens, int64_t layers, int64_t hidden, int64_t q_size, bool offload,
                         uint64_t host_bytes, int64_t kept_width = 0);

// train.keep_dequantized "auto": keep the 16-bit weights of a block's recomputation for its backward pass, and the
// compute-dtype LoRA factors between forward passes, on short rows, below 8192 tokens per micro-batch, where the
// NF4 dequantization (a fixed cost per step) is the larger share of the step and the activations leave room for
// one block's 16-bit weights (measured on an H200: 1.013x the step at 8B 2 x 2048 for 0.30 GiB; at 1 x 8192
// 1.0075x for 0.30 GiB, where the memory goes to the activations; the factors: 0.12 GiB for +0.2% to +0.7%).
bool keep_dequantized_auto(int64_t tokens);

}  // namespace qt
