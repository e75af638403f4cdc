#include "lib/train/evaluate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

namespace qt {

double EvalResult::perplexity() const { return std::exp(mean_loss()); }

EvalResult evaluate_loss(const LlamaModel& model, const std::vector<std::vector<int32_t>>& documents,
                         int64_t max_seq_len) {
  at::NoGradGuard no_grad;
  EvalResult result;
  for (const auto& doc : documents) {
    ++result.documents;
    int64_t n = static_cast<int64_t>(doc.size());
    if (n > max_seq_len) {
      n = max_seq_len;
      ++result.truncated;
    }
    if (n < 2) continue;  // nothing to predict
    at::Tensor ids = at::from_blob(const_cast<int32_t*>(doc.data()), {1, n}, at::kInt).to(model.device(), at::kLong);
    at::Tensor logits = model.forward(ids).squeeze(0).to(at::kFloat);
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(0, 0, n - 1), ids.squeeze(0).narrow(0, 1, n - 1),
                                             /*weight=*/{}, at::Reduction::Sum);
    result.loss_sum += loss.item<double>();
    result.tokens += n - 1;
  }
  return result;
}

}  // namespace qt
