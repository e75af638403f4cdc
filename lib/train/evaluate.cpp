#include "lib/train/evaluate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "lib/core/error.h"
#include "lib/data/packing.h"
#include "lib/train/train_stages.h"

namespace qt {

double EvalResult::perplexity() const { return std::exp(mean_loss()); }

EvalResult evaluate_loss(const LlamaModel& model, const std::vector<Example>& documents, int64_t max_seq_len) {
  at::NoGradGuard no_grad;
  EvalResult result;
  for (const auto& doc : documents) {
    ++result.documents;
    int64_t n = static_cast<int64_t>(doc.ids.size());
    if (n > max_seq_len) {
      n = max_seq_len;
      ++result.truncated;
    }
    // Targets as training batches them: token i predicted from position i - 1 where loss[i]; -100 elsewhere.
    std::vector<int64_t> targets(static_cast<size_t>(std::max<int64_t>(n - 1, 0)), -100);
    int64_t count = 0;
    for (int64_t i = 1; i < n; ++i)
      if (doc.loss[i]) targets[i - 1] = doc.ids[i], ++count;
    if (count == 0) continue;  // nothing to predict
    at::Tensor ids =
        at::from_blob(const_cast<int32_t*>(doc.ids.data()), {1, n}, at::kInt).to(model.device(), at::kLong);
    at::Tensor logits = model.forward(ids).squeeze(0).to(at::kFloat);
    at::Tensor t = at::from_blob(targets.data(), {n - 1}, at::kLong).to(model.device());
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(0, 0, n - 1), t, /*weight=*/{}, at::Reduction::Sum,
                                             /*ignore_index=*/-100);
    result.loss_sum += loss.item<double>();
    result.tokens += count;
  }
  return result;
}

DpoEvalResult evaluate_dpo(LlamaModel& model, ReferenceAdapters* reference, std::vector<Example> pairs,
                           int64_t max_seq_len, const PreferenceObjective& pref) {
  QT_CHECK(static_cast<bool>(pref) && (reference || !pref.needs_reference()), ErrorKind::Internal,
           "evaluate_dpo: DPO needs its reference");
  at::NoGradGuard no_grad;
  model.set_training(false);
  DpoEvalResult result;
  result.sums.assign(static_cast<size_t>(pref.sums_size()), 0.0);
  KtoHeldOut kto;  // KTO: the KL baseline over all the records, the losses once it is known
  for (Example& e : pairs) {
    QT_CHECK(e.second > 0, ErrorKind::Internal, "evaluate_dpo: a record that is not a pair");
    if (pair_longer_than(e, max_seq_len)) ++result.truncated;
    truncate_pair(e, max_seq_len);
    if (fewest_targets(e) == 0) continue;  // a sequence with nothing to compare
    const Batch b = build_batch({e}, {{0}}, BatchShape{1, 2 * max_seq_len, /*packing=*/false});
    ++result.pairs;
    if (pref.kto) {  // (each pass over one half of the row, as training's)
      const KtoLogps l = kto_logps_without_gradient(model, *reference, split_pairs(b), pref.kto->kl(),
                                                    /*records=*/true, /*fused=*/true, /*training=*/false);
      kto.add(l.policy, l.reference, b.pair_labels);
      continue;
    }
    const at::Tensor seqs = pair_sequences(b);
    const at::Tensor ref = pref.needs_reference()
                               ? reference_logps(model, *reference, b, seqs, /*fused=*/true, /*training=*/false)
                               : at::Tensor();
    const at::Tensor hidden = model.forward_hidden(model.embed(b.input_ids), b);
    const at::Tensor sums = dpo_policy_terms(model, hidden, b, seqs, ref, pref, true).sums.to(at::kCPU, at::kDouble);
    for (size_t i = 0; i < result.sums.size(); ++i) result.sums[i] += sums[static_cast<int64_t>(i)].item<double>();
  }
  if (pref.kto) {
    const at::Tensor sums = kto.terms(kto.kl_sums(), *pref.kto).sums.to(at::kDouble);
    for (size_t i = 0; i < result.sums.size(); ++i) result.sums[i] = sums[static_cast<int64_t>(i)].item<double>();
  }
  return result;
}

}  // namespace qt
