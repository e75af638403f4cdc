#pragma once
// Autoregressive generation for `qlora-train generate`: greedy decoding (temperature 0), or temperature plus
// nucleus (top-p) sampling (Holtzman et al., 2019, arXiv:1904.09751) as transformers' TemperatureLogitsWarper and
// TopPLogitsWarper apply them. No KV cache: each step recomputes the whole sequence, which is exact and cheap
// enough for checking a fine-tuned model on a prompt, not meant for serving.
#include <cstdint>
#include <functional>
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
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the new tokens, the stop token included when one ended generation
  bool stopped = false;         // ended by a stop id (else by max_new_tokens or max_seq_len)
};

// Throws qt::Error(Usage) for an empty prompt, temperature < 0, top_p outside (0, 1] or max_new_tokens < 0.
// `on_token` (optional) sees each new token as it is chosen.
GenerateResult generate_tokens(const LlamaModel& model, const std::vector<int32_t>& prompt,
                               const GenerateOptions& options,
                               const std::function<void(int32_t)>& on_token = nullptr);

// One decoding step on a [V] logits row: the next token id under `options` (exposed for tests).
int64_t choose_next_token(const at::Tensor& logits, const GenerateOptions& options, at::Generator& gen);

}  // namespace qt
