#pragma once
// `qlora-train bench`: our trainer on a model of random weights (a named shape or a directory's config.json) for
// a few steps of random tokens, timed as scripts/bench.py times the peers: the median step after warm-up,
// batch x seq tokens per step, the peak GPU memory, and the MFU of model FLOPs (issue 27) against the bf16 matrix
// rate measured on the device in the same process.
#include <cstdint>
#include <string>
#include <vector>

#include "lib/core/json.h"
#include "lib/model/llama_config.h"

namespace qt {

struct BenchOptions {
  std::string shape;  // a named shape (random_init.h), or
  std::string model;  // a model directory whose config.json gives the shape
  int64_t batch = 1;
  int64_t seq = 2048;
  int64_t doc_tokens = 0;  // > 0: packed rows of documents of about this median length (SFT-like); 0: one a row
  int64_t steps = 8;   // timed steps
  int64_t warmup = 3;  // untimed steps first
  std::string device = "cuda";
  std::string out;     // working directory (data, config, run); created
  std::vector<std::string> overrides;  // --set key=value for the run config
  std::string log_level;               // --log-level as given (empty: not given): it wins over logging.level
  // --generate N: time generation instead of training (run_generate_bench).
  int64_t generate = 0;        // prompts
  int64_t prompt_tokens = 200;  // their median length (log-normal, as --doc-tokens' documents)
  int64_t max_new_tokens = 32;
  int64_t uncached = 4;        // of them also generated one at a time without the cache (the reference's cost)
};

// Model FLOPs per token, what QLoRA training needs whatever the plan (issue 27): 4 N + 6 L S q. N the parameters of
// the block linears and lm_head (forward 2 N, input gradient 2 N; the frozen base has no weight gradient), L layers,
// S the attention span, q the attention width (heads x head_dim): causal attention's forward (2 S q) and backward
// (4 S q). S is the row length for one document a row; for packed rows, where a token attends within its own
// document, the documents' token-weighted mean length (sum of squared lengths over tokens: the FLOPs of causal
// attention per document, per token). Recomputation is a plan's cost, never counted; the same formula serves the
// peers (scripts/bench.py).
double model_flops_per_token(const LlamaConfig& config, double attention_span);

// Runs the benchmark and returns {model, batch, seq, steps, step_s, tokens_per_s, peak_gib and reserved_peak_gib
// (CUDA: the caching allocator's peaks, allocated and held), model_flops_per_token,
// matrix_tflops and mfu (CUDA; null on the CPU)}.
Json run_bench(const BenchOptions& options);

// `bench --generate N`: N random prompts (median --prompt-tokens) greedily continued by --max-new-tokens tokens on a
// random NF4 model with a fresh LoRA adapter on every block linear (r 16), as the exact-match metric generates:
// together through the key / value cache in batches of at most --batch x --seq cached tokens (generate_batch), and
// the first --uncached of them one at a time recomputing the whole sequence (generate_tokens_uncached). Returns
// {model, prompts, prompt_tokens_mean, max_new_tokens, batch_tokens, cached_s, uncached_s_per_prompt,
// cached_s_per_prompt, speedup, same_tokens (of the uncached prompts, those whose tokens are the batch's),
// peak_gib}.
Json run_generate_bench(const BenchOptions& options);

}  // namespace qt
