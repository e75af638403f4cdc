#pragma once
// Autoregressive generation for `qlora-train generate`: greedy decoding (temperature 0), or temperature plus
// nucleus (top-p) sampling (Holtzman et al., 2019, arXiv:1904.09751) as transformers' TemperatureLogitsWarper and
// TopPLogitsWarper apply them. Several prompts go through at once (generate_batch: the exact-match metric's
// records), each step's keys and values kept in a cache (KvCache), so that a new token runs one position through
// the model instead of the whole sequence. generate_tokens_uncached recomputes the whole sequence at every step:
// the reference the cached path is held to, and the path of dynamic RoPE (whose frequencies follow the longest
// position, so that the cached keys' rotation would go stale).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "lib/model/llama.h"

namespace qt {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // 0: greedy (argmax, the lowest id on ties, as torch.argmax)
  double top_p = 1.0;        // keep the smallest set of most likely tokens whose probability reaches top_p
  uint64_t seed = 0;         // sampling only
  std::vector<int32_t> stop_ids;  // EOS / end-of-turn ids; generation stops after emitting one
  int64_t max_seq_len = 0;   // > 0: stop before the whole sequence exceeds it (the model's context)
  // CUDA: each batch's decoding steps replayed from a CUDA graph (Decoder); false: Decoder's steps eagerly. The exact
  // match (lib/train/exact_match.h) decodes eagerly: a few steps a batch, which pay the capture more than the replays
  // save, and no graph memory pool held beside a training plan's budget.
  bool cuda_graph = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens, the stop token included when one ended generation
  bool stopped = false;         // ended by a stop id (else by max_new_tokens or max_seq_len)
};

// Throws qt::Error(Usage) for an empty prompt, temperature < 0, top_p outside (0, 1] or max_new_tokens < 0.
// generate_batch of the one prompt: through the cache where it applies (kv_cache_applies; QT_GENERATE_CACHE=0:
// never, for A/Bs), else generate_tokens_uncached.
GenerateResult generate_tokens(const LlamaModel& model, const std::vector<int32_t>& prompt,
                               const GenerateOptions& options);
GenerateResult generate_tokens_uncached(const LlamaModel& model, const std::vector<int32_t>& prompt,
                                        const GenerateOptions& options);

// Every prompt's generation (in the prompts' order; sampling: each row from its own generator seeded with
// options.seed, so that a row's tokens do not depend on the other prompts), the prompts run together in batches of at most `batch_tokens`
// cached tokens (rows times the longest prompt plus max_new_tokens; at least one prompt a batch), shortest prompts
// first, left-padded to the batch's longest prompt. Each row as generate_tokens would generate it alone, up to the rounding of batched products (greedy: the
// same tokens but at near ties).
std::vector<GenerateResult> generate_batch(const LlamaModel& model, const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& options, int64_t batch_tokens = 8192);

// Whether generation may cache keys and values for this model: not under dynamic RoPE.
bool kv_cache_applies(const LlamaModel& model);

// Each block's keys (rotated) and values of the tokens run so far, [B, capacity, kv heads, head_dim] in the model's
// dtype and device (zeros where not yet written: Decoder reads every column, masked), and which columns hold a token
// (false: left padding, or not yet written).
struct KvCache {
  std::vector<at::Tensor> k, v;
  at::Tensor valid;     // [B, capacity] bool
  int64_t length = 0;   // columns written
  int64_t capacity = 0;
  // The LoRA factors in the compute dtype for these passes where the model's plan keeps none (made at the first
  // step, read by the others, gone with the cache); null: the model's own cache.
  std::shared_ptr<LoraFactorCache> factors;
};
KvCache make_kv_cache(const LlamaModel& model, int64_t batch, int64_t capacity);

// Runs `ids` [B, S] (`positions` [B, S] their RoPE positions; `valid` [B, S] bool, false for left padding) after the
// cache's `length` columns: writes their keys and values there and returns the hidden states after the final norm
// [B, S, H]. A token attends to the valid columns up to its own (Mistral's window counted in columns, which is
// positions where padding only leads a row); a padding token to itself alone. No gradient is recorded.
at::Tensor forward_cached(const LlamaModel& model, KvCache& cache, const at::Tensor& ids, const at::Tensor& positions,
                          const at::Tensor& valid);

// A batch's decoding steps, one new token a row at the cache's next column, at fixed shapes: every input in one
// device tensor written before the step, the keys and values written at a column the device reads, and attention over
// the cache's whole capacity with the columns not yet written masked out. What forward_cached computes for one
// token a row, without reading anything back to the host (forward_cached's steps at 8B on an H100 took 56 ms against
// 17 ms for these: its launches waited on the host's masks and positions). On CUDA the first step runs as it is and
// is then captured in a CUDA graph, which the later steps replay (a step at 8B 15.6 ms, at 1B 3.2 ms against 9.4
// eagerly; QT_GENERATE_GRAPHS=eager leaves the graph out, =0 decodes through forward_cached). The graph is left out
// (graphed() false) on the CPU, where blocks have hooks (weights streamed, activations offloaded), embeddings on the
// host or LoRA dropout active; a capture that fails leaves it out for the rest of the process, with a warning, and
// its step's result stands.
class Decoder {
 public:
  // graph false: the steps eagerly on CUDA too (GenerateOptions::cuda_graph).
  Decoder(const LlamaModel& model, KvCache& cache, bool graph = true);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;
  // Runs `ids` (their RoPE `positions`; `valid` 0 for a row that runs on as padding, which then sees itself alone),
  // one a row, at column cache.length, and advances it. Returns the hidden states after the final norm [B, 1, H];
  // on CUDA graphs the same tensor every step, overwritten by the next.
  at::Tensor step(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions,
                  const std::vector<uint8_t>& valid);
  bool graphed() const;            // the steps after the first replay a CUDA graph
  double capture_seconds() const;  // graphed: the first step and its capture, synchronized

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Whether generate_batch decodes through Decoder here: always but on CUDA with QT_GENERATE_GRAPHS=0 (forward_cached).
bool decoder_applies(const LlamaModel& model);

// One decoding step on a [V] logits row: the next token id under `options` (exposed for tests).
int64_t choose_next_token(const at::Tensor& logits, const GenerateOptions& options, at::Generator& gen);

}  // namespace qt
