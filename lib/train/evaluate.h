#pragma once
// Mean token cross-entropy of a causal LM over tokenized records, each run alone (no packing), over the same
// targets as training: token i (i >= 1) of a record is predicted from the tokens before it where its loss mask
// says so (answers and their end-of-turn token; every token of a text record; prompts too with train_on_prompt).
#include <cstdint>
#include <vector>

#include "lib/data/example.h"
#include "lib/model/llama.h"
#include "lib/train/dpo.h"

namespace qt {

struct EvalResult {
  double loss_sum = 0;  // summed over predicted tokens, in fp64
  int64_t tokens = 0;   // predicted (target) tokens
  int64_t documents = 0;
  int64_t truncated = 0;  // documents cut to max_seq_len
  double mean_loss() const { return tokens ? loss_sum / static_cast<double>(tokens) : 0.0; }
  double perplexity() const;
};

// `documents` hold token ids (BOS/EOS already applied) and loss masks, as lib/data/records.h makes them for
// training. Each is cut to its first max_seq_len tokens (counted), as training cuts held-out records.
EvalResult evaluate_loss(const LlamaModel& model, const std::vector<Example>& documents, int64_t max_seq_len);

// DPO's loss over preference pairs (Example::second), each pair alone (its two sequences side by side in one row,
// each cut to max_seq_len tokens, counted), against `reference`, as training's held-out
// evaluation computes it; or CPO's, reference-free (`reference` null; its NLL term a pair's own token mean). A pair with a sequence left without a target is skipped (not counted in `pairs`).
struct DpoEvalResult {
  int64_t pairs = 0;
  int64_t truncated = 0;
  std::vector<double> sums;  // the loss, then dpo_stat_names()' statistics, summed over the pairs
  double mean(size_t i) const { return pairs ? sums.at(i) / static_cast<double>(pairs) : 0.0; }
};
DpoEvalResult evaluate_dpo(LlamaModel& model, ReferenceAdapters* reference, std::vector<Example> pairs,
                           int64_t max_seq_len, const PreferenceObjective& pref);

}  // namespace qt
