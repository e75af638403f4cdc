#pragma once
// One micro-batch as the model and the loss consume it (a vocabulary type of floor 0, so that lib/data, which
// builds it by packing or padding, and lib/model, which reads it, need not import each other). Read by
// lib/model (positions, document boundaries) and lib/train (targets, token counts).
#include <ATen/core/Tensor.h>

namespace qt {

struct Batch {
  at::Tensor input_ids;  // [B, S] int64
  // Next-token targets aligned with input_ids: targets[b, t] is the id the model should predict after seeing
  // input_ids[b, ..t], or -100 where there is no target (prompt tokens, padding, the last token of a document).
  at::Tensor targets;    // [B, S] int64
  // Position of each token within its document (RoPE): restarts at 0 at each packed document.
  at::Tensor positions;  // [B, S] int64
  // Document index of each token within its row (0, 1, 2, ... for packed rows; -1 for padding). Attention never
  // crosses documents. Undefined means one causal document per row.
  at::Tensor doc_ids;    // [B, S] int32
  int64_t num_targets = 0;  // count of targets != -100
  int64_t num_tokens = 0;   // input tokens of documents (padding not counted)
  // Preference pairs (train.objective "dpo"): each is two documents of its row, chosen then rejected (doc_ids 2k and
  // 2k + 1 where every example of the row is a pair). 0: none.
  int64_t num_pairs = 0;
  // KTO's records (Example::label), laid as pairs (the record's sequence, then its KL sequence): each pair's label in
  // the pairs' order, [num_pairs] fp32 on the CPU, 1 desirable and 0 undesirable. Undefined otherwise.
  at::Tensor pair_labels;
};

}  // namespace qt
