#include "lib/train/dpo.h"

#include <ATen/ATen.h>

#include "lib/core/error.h"
#include "lib/model/peft_adapter.h"

namespace qt {

DpoSection DpoSection::from_json(const Json& section, const std::string& file) {
  reject_unknown_keys(section, {"loss_type", "beta", "label_smoothing"}, file, "dpo.", ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "dpo."};
  DpoSection c;
  c.loss_type = r.get_string("loss_type", c.loss_type);
  if (c.loss_type != "sigmoid" && c.loss_type != "robust" && c.loss_type != "hinge" && c.loss_type != "ipo")
    fail_key(ErrorKind::Config, file, "dpo.loss_type",
             "\"" + c.loss_type + "\": expected \"sigmoid\" (DPO), \"robust\", \"hinge\" or \"ipo\" (TRL's names)");
  c.beta = r.get_double("beta", c.beta);
  if (!(c.beta > 0 && c.beta < 1e6)) fail_key(ErrorKind::Config, file, "dpo.beta", "must be > 0 (TRL's default: 0.1)");
  c.label_smoothing = r.get_double("label_smoothing", c.label_smoothing);
  if (!(c.label_smoothing >= 0 && c.label_smoothing < 0.5))
    fail_key(ErrorKind::Config, file, "dpo.label_smoothing", "must be in [0, 0.5) (0: off)");
  if (c.label_smoothing > 0 && c.loss_type != "robust")
    fail_key(ErrorKind::Config, file, "dpo.label_smoothing",
             "is read by dpo.loss_type \"robust\" (TRL's \"" + c.loss_type + "\" loss ignores it)");
  return c;
}

Json DpoSection::to_json() const {
  return Json{{"loss_type", loss_type}, {"beta", beta}, {"label_smoothing", label_smoothing}};
}

at::Tensor pair_sequences(const Batch& b) {
  const at::Tensor docs = b.doc_ids.to(at::kCPU, at::kInt).contiguous();
  QT_CHECK(docs.dim() == 2, ErrorKind::Internal, "pair_sequences: a micro-batch of pairs needs its doc_ids");
  const int64_t rows = docs.size(0), cols = docs.size(1);
  at::Tensor out = at::empty({rows * cols}, at::kLong);
  const int32_t* d = docs.data_ptr<int32_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t pad = 2 * b.num_pairs;
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    int32_t most = -1;
    for (int64_t t = 0; t < cols; ++t) {
      const int32_t doc = d[r * cols + t];
      o[r * cols + t] = doc < 0 ? pad : offset + doc;
      most = std::max(most, doc);
    }
    offset += most + 1;
  }
  QT_CHECK(offset == pad, ErrorKind::Internal,
           "pair_sequences: " + std::to_string(offset) + " documents for " + std::to_string(b.num_pairs) + " pairs");
  return out;
}

at::Tensor sequence_logps(const at::Tensor& token_losses, const at::Tensor& sequences, int64_t pairs) {
  const at::Tensor idx = sequences.to(token_losses.device(), /*non_blocking=*/true);
  at::Tensor sums = at::zeros({2 * pairs + 1}, token_losses.options().dtype(at::kFloat));
  sums = sums.index_add(0, idx, token_losses.reshape({-1}).to(at::kFloat));
  return -sums.narrow(0, 0, 2 * pairs);
}

at::Tensor sequence_targets(const Batch& b, const at::Tensor& sequences, const at::Device& device) {
  const int64_t pairs = b.num_pairs;
  at::Tensor counts = at::zeros({2 * pairs + 1}, at::kFloat);
  counts.index_add_(0, sequences, b.targets.reshape({-1}).ne(-100).to(at::kFloat));
  return counts.narrow(0, 0, 2 * pairs).to(device);
}

ReferenceAdapters::ReferenceAdapters(LlamaModel& model, const std::string& init_from) : model_(model) {
  if (init_from.empty()) {
    // Fresh adapters (B = 0; DoRA's magnitudes the rows' norms) compute the base: left out for the pass, so that
    // the base runs without their rank-r work.
    model_.for_each_linear([&](const std::string&, Linear&) { frozen_.push_back(nullptr); });
    describe_ = "the base model (the fresh adapters left out)";
    return;
  }
  // load_peft_adapter attaches new adapters: those are kept frozen, the trained ones put back.
  std::vector<std::shared_ptr<LoraAdapter>> trained;
  model_.for_each_linear([&](const std::string&, Linear& l) { trained.push_back(l.lora); });
  try {
    load_peft_adapter(model_, init_from);
  } catch (...) {
    size_t i = 0;
    model_.for_each_linear([&](const std::string&, Linear& l) { l.lora = trained[i++]; });
    throw;
  }
  factors_ = std::make_shared<LoraFactorCache>();
  size_t i = 0;
  model_.for_each_linear([&](const std::string&, Linear& l) {
    if (l.lora) {
      l.lora->A = l.lora->A.detach().requires_grad_(false);
      l.lora->B = l.lora->B.detach().requires_grad_(false);
      if (l.lora->dora()) l.lora->magnitude = l.lora->magnitude.detach().requires_grad_(false);
      l.lora->dropout = 0.0;
    }
    frozen_.push_back(std::move(l.lora));
    l.lora = trained[i++];
  });
  describe_ = "the base model with lora.init_from's adapter (" + init_from + "), as training starts";
}

void ReferenceAdapters::swap() {
  size_t i = 0;
  model_.for_each_linear([&](const std::string&, Linear& l) { std::swap(l.lora, frozen_[i++]); });
  if (factors_) std::swap(model_.lora_factor_cache, factors_);
}

ReferenceAdapters::Scope::Scope(ReferenceAdapters& r) : r_(r) { r_.swap(); }

ReferenceAdapters::Scope::~Scope() { r_.swap(); }

const std::vector<std::string>& dpo_stat_names() {
  static const std::vector<std::string> names = {"rewards_chosen", "rewards_rejected", "rewards_accuracy",
                                                 "rewards_margin", "logps_chosen",     "logps_rejected"};
  return names;
}

DpoTerms dpo_terms(const at::Tensor& policy, const at::Tensor& reference, const DpoSection& c,
                   const at::Tensor& lengths) {
  const at::Tensor p = policy.reshape({-1, 2}), ref = reference.reshape({-1, 2}).detach();
  const at::Tensor pc = p.select(1, 0), pr = p.select(1, 1);
  const at::Tensor chosen_ratio = pc - ref.select(1, 0), rejected_ratio = pr - ref.select(1, 1);
  const at::Tensor delta = chosen_ratio - rejected_ratio;
  at::Tensor losses;
  if (c.loss_type == "sigmoid") {
    losses = -at::log_sigmoid(delta * c.beta);
  } else if (c.loss_type == "robust") {
    const double ls = c.label_smoothing;
    losses = (at::log_sigmoid(delta * c.beta) * -(1.0 - ls) + at::log_sigmoid(delta * -c.beta) * ls) / (1.0 - 2.0 * ls);
  } else if (c.loss_type == "hinge") {
    losses = at::relu(1.0 - delta * c.beta);
  } else {
    QT_CHECK(c.loss_type == "ipo" && lengths.defined(), ErrorKind::Internal, "dpo_terms: ipo needs the lengths");
    const at::Tensor n = lengths.reshape({-1, 2}).clamp_min(1.0);
    const at::Tensor d = chosen_ratio / n.select(1, 0) - rejected_ratio / n.select(1, 1);
    losses = (d - 1.0 / (2.0 * c.beta)).square();
  }
  DpoTerms t;
  t.loss_sum = losses.sum();
  // TRL's metrics: rewards beta * log-ratio; accuracy chosen reward > rejected reward; margin their difference.
  const at::Tensor rc = chosen_ratio.detach() * c.beta, rr = rejected_ratio.detach() * c.beta;
  t.sums = at::stack({t.loss_sum.detach(), rc.sum(), rr.sum(), rc.gt(rr).to(at::kFloat).sum(), (rc - rr).sum(),
                      pc.detach().sum(), pr.detach().sum()});
  return t;
}

}  // namespace qt
