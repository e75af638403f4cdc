#pragma once
// Mean token cross-entropy of a causal LM over documents, each run alone (no packing), next-token targets.
#include <cstdint>
#include <vector>

#include "lib/model/llama.h"

namespace qt {

struct EvalResult {
  double loss_sum = 0;  // summed over predicted tokens, in fp64
  int64_t tokens = 0;   // predicted tokens (a document of n tokens predicts n - 1)
  int64_t documents = 0;
  int64_t truncated = 0;  // documents cut to max_seq_len
  double mean_loss() const { return tokens ? loss_sum / static_cast<double>(tokens) : 0.0; }
  double perplexity() const;
};

// `documents` hold token ids (BOS/EOS already applied). Each is truncated to max_seq_len (counted).
EvalResult evaluate_loss(const LlamaModel& model, const std::vector<std::vector<int32_t>>& documents,
                         int64_t max_seq_len);

}  // namespace qt
