#include "lib/train/dpo.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "lib/core/error.h"
#include "lib/kernels/fused_ops.h"
#include "lib/model/peft_adapter.h"

namespace qt {

namespace {

const std::vector<std::string> kDpoLossTypes = {"sigmoid",   "robust",   "hinge",    "ipo",      "exo_pair",
                                                "nca_pair",  "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                                                "discopop",  "sft",      "sigmoid_norm"};

bool has_type(const DpoSection& c, const char* name) {
  return std::find(c.loss_types.begin(), c.loss_types.end(), name) != c.loss_types.end();
}

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? (i + 1 == names.size() ? " or " : ", ") : "") + names[i];
  return s;
}

}  // namespace

DpoSection DpoSection::from_json(const Json& section, const std::string& file) {
  reject_unknown_keys(section, {"loss_type", "loss_weights", "beta", "label_smoothing", "discopop_tau"}, file, "dpo.",
                      ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "dpo."};
  DpoSection c;
  if (r.has("loss_type")) {
    const Json& t = section.at("loss_type");
    c.loss_types.clear();
    if (t.is_string()) {
      c.loss_types.push_back(t.get<std::string>());
    } else if (t.is_array() && !t.empty()) {
      for (const Json& e : t) {
        if (!e.is_string()) fail_key(ErrorKind::Config, file, "dpo.loss_type", "expected a name or a list of names");
        c.loss_types.push_back(e.get<std::string>());
      }
    } else {
      fail_key(ErrorKind::Config, file, "dpo.loss_type", "expected a name or a non-empty list of names");
    }
  }
  for (const std::string& t : c.loss_types) {
    if (t == "aot" || t == "aot_unpaired")
      fail_key(ErrorKind::Config, file, "dpo.loss_type",
               "\"" + t + "\" sorts the log-ratios across each micro-batch, which packed micro-batches of varying "
               "pair counts would change: not supported");
    if (std::find(kDpoLossTypes.begin(), kDpoLossTypes.end(), t) == kDpoLossTypes.end())
      fail_key(ErrorKind::Config, file, "dpo.loss_type",
               "\"" + t + "\": expected " + joined(kDpoLossTypes) + " (TRL's names), or a list of them");
    if (std::count(c.loss_types.begin(), c.loss_types.end(), t) > 1)
      fail_key(ErrorKind::Config, file, "dpo.loss_type", "\"" + t + "\" is listed twice");
  }
  if (r.has("loss_weights")) {
    const Json& w = section.at("loss_weights");
    if (!w.is_array() || w.size() != c.loss_types.size())
      fail_key(ErrorKind::Config, file, "dpo.loss_weights",
               "expected a list of " + std::to_string(c.loss_types.size()) + " numbers, one a dpo.loss_type");
    for (const Json& e : w) {
      if (!e.is_number() || !std::isfinite(e.get<double>()))
        fail_key(ErrorKind::Config, file, "dpo.loss_weights", "expected finite numbers");
      c.loss_weights.push_back(e.get<double>());
    }
  }
  c.beta = r.get_double("beta", c.beta);
  if (!(c.beta > 0 && c.beta < 1e6)) fail_key(ErrorKind::Config, file, "dpo.beta", "must be > 0 (TRL's default: 0.1)");
  c.label_smoothing = r.get_double("label_smoothing", c.label_smoothing);
  if (!(c.label_smoothing >= 0 && c.label_smoothing < 0.5))
    fail_key(ErrorKind::Config, file, "dpo.label_smoothing", "must be in [0, 0.5) (0: off)");
  if (c.label_smoothing > 0 && !has_type(c, "robust") && !has_type(c, "exo_pair"))
    fail_key(ErrorKind::Config, file, "dpo.label_smoothing",
             "is read by dpo.loss_type \"robust\" and \"exo_pair\" (TRL's \"" + c.describe() + "\" ignores it)");
  if (has_type(c, "exo_pair") && c.label_smoothing == 0)
    fail_key(ErrorKind::Config, file, "dpo.label_smoothing",
             "dpo.loss_type \"exo_pair\" needs its epsilon > 0 (TRL suggests 1e-3); at 0 its loss is infinite");
  c.discopop_tau = r.get_double("discopop_tau", c.discopop_tau);
  if (!(c.discopop_tau > 0)) fail_key(ErrorKind::Config, file, "dpo.discopop_tau", "must be > 0 (TRL's default: 0.05)");
  return c;
}

Json DpoSection::to_json() const {
  return Json{{"loss_type", loss_types.size() == 1 ? Json(loss_types[0]) : Json(loss_types)},
              {"loss_weights", loss_weights.empty() ? Json(nullptr) : Json(loss_weights)},
              {"beta", beta},
              {"label_smoothing", label_smoothing},
              {"discopop_tau", discopop_tau}};
}

bool DpoSection::needs_lengths() const {
  return has_type(*this, "ipo") || has_type(*this, "sigmoid_norm") || has_type(*this, "sft");
}

std::string DpoSection::describe() const {
  std::string s;
  for (size_t i = 0; i < loss_types.size(); ++i) {
    if (i) s += " + ";
    if (!loss_weights.empty() && loss_weights[i] != 1.0) {
      char w[32];
      std::snprintf(w, sizeof w, "%g x ", loss_weights[i]);
      s += w;
    }
    s += loss_types[i];
  }
  return s;
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

PairHalves split_pairs(const Batch& b) {
  const at::Tensor docs = b.doc_ids.to(at::kCPU, at::kInt).contiguous();
  QT_CHECK(docs.dim() == 2, ErrorKind::Internal, "split_pairs: a micro-batch of pairs needs its doc_ids");
  const at::Tensor ids = b.input_ids.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor targets = b.targets.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor positions = b.positions.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor sequences = pair_sequences(b);
  const int64_t rows = docs.size(0), cols = docs.size(1);
  const int32_t* d = docs.data_ptr<int32_t>();
  // Each half's tokens of each row, as indices into b's [rows * cols] tokens.
  std::vector<std::vector<std::vector<int64_t>>> taken(2, std::vector<std::vector<int64_t>>(rows));
  int64_t longest[2] = {1, 1};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < cols; ++t)
      if (d[r * cols + t] >= 0) taken[d[r * cols + t] % 2][r].push_back(r * cols + t);
    for (int h = 0; h < 2; ++h) longest[h] = std::max<int64_t>(longest[h], taken[h][r].size());
  }
  const int64_t pad_id = rows * cols > 0 ? ids.data_ptr<int64_t>()[rows * cols - 1] : 0;  // (any id: no target)
  PairHalves out;
  for (int h = 0; h < 2; ++h) {
    // (within half of b's row where the half fits it: KTO's packed rows, which the plan counts at half a row)
    const int64_t S = std::min((longest[h] + 63) / 64 * 64, std::max(longest[h], cols / 2));
    Batch& x = h == 0 ? out.first : out.second;
    x.input_ids = at::full({rows, S}, pad_id, at::kLong);
    x.targets = at::full({rows, S}, -100, at::kLong);
    x.positions = at::zeros({rows, S}, at::kLong);
    x.doc_ids = at::full({rows, S}, -1, at::kInt);
    at::Tensor seqs = at::full({rows * S}, 2 * b.num_pairs, at::kLong);
    const int64_t *ids_in = ids.data_ptr<int64_t>(), *tgt_in = targets.data_ptr<int64_t>(),
                  *pos_in = positions.data_ptr<int64_t>(), *seq_in = sequences.data_ptr<int64_t>();
    int64_t *ids_out = x.input_ids.data_ptr<int64_t>(), *tgt_out = x.targets.data_ptr<int64_t>(),
            *pos_out = x.positions.data_ptr<int64_t>(), *seq_out = seqs.data_ptr<int64_t>();
    int32_t* doc_out = x.doc_ids.data_ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (size_t k = 0; k < taken[h][r].size(); ++k) {
        const int64_t from = taken[h][r][k], to = r * S + static_cast<int64_t>(k);
        ids_out[to] = ids_in[from];
        tgt_out[to] = tgt_in[from];
        pos_out[to] = pos_in[from];
        doc_out[to] = d[from] / 2;
        seq_out[to] = seq_in[from];
      }
    }
    x.num_targets = x.targets.ne(-100).sum().item<int64_t>();
    x.num_tokens = x.doc_ids.ge(0).sum().item<int64_t>();
    x.num_pairs = b.num_pairs;
    x.pair_labels = b.pair_labels;
    (h == 0 ? out.first_sequences : out.second_sequences) = seqs;
  }
  return out;
}

at::Tensor sequence_logps(const at::Tensor& token_losses, const at::Tensor& sequences, int64_t pairs) {
  const at::Tensor idx = sequences.to(token_losses.device(), /*non_blocking=*/true);
  at::Tensor sums = at::zeros({2 * pairs + 1}, token_losses.options().dtype(at::kFloat));
  sums = sums.index_add(0, idx, token_losses.reshape({-1}).to(at::kFloat));
  return -sums.narrow(0, 0, 2 * pairs);
}

at::Tensor sequence_targets(const Batch& b, const at::Tensor& sequences, const at::Device& device) {
  return sequence_targets(b.targets, sequences, b.num_pairs, device);
}

at::Tensor sequence_targets(const at::Tensor& targets, const at::Tensor& sequences, int64_t pairs,
                            const at::Device& device) {
  at::Tensor counts = at::zeros({2 * pairs + 1}, at::kFloat);
  counts.index_add_(0, sequences, targets.reshape({-1}).ne(-100).to(at::kFloat));
  // (through pinned memory, without waiting for the device: a step's queueing syncs nowhere)
  return to_device_async(counts.narrow(0, 0, 2 * pairs).contiguous(), device);
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
  const double b = c.beta;
  QT_CHECK(!c.needs_lengths() || lengths.defined(), ErrorKind::Internal, "dpo_terms: " + c.describe() +
           " needs the lengths");
  const at::Tensor n = c.needs_lengths() ? lengths.reshape({-1, 2}).clamp_min(1.0) : at::Tensor();
  at::Tensor loss_sum;
  for (size_t i = 0; i < c.loss_types.size(); ++i) {
    const std::string& type = c.loss_types[i];
    at::Tensor losses;  // [pairs] (TRL's per_sequence_loss)
    if (type == "sigmoid") {
      losses = -at::log_sigmoid(delta * b);
    } else if (type == "robust") {
      const double ls = c.label_smoothing;
      losses = (at::log_sigmoid(delta * b) * -(1.0 - ls) + at::log_sigmoid(delta * -b) * ls) / (1.0 - 2.0 * ls);
    } else if (type == "hinge") {
      losses = at::relu(1.0 - delta * b);
    } else if (type == "ipo" || type == "sigmoid_norm") {  // each log-ratio over its completion's tokens
      const at::Tensor d = chosen_ratio / n.select(1, 0) - rejected_ratio / n.select(1, 1);
      losses = type == "ipo" ? (d - 1.0 / (2.0 * b)).square() : -at::log_sigmoid(d * b);
    } else if (type == "exo_pair") {
      const double eps = c.label_smoothing;
      const at::Tensor z = delta * b;
      losses = at::sigmoid(z) * (at::log_sigmoid(z) - std::log1p(-eps)) +
               at::sigmoid(-z) * (at::log_sigmoid(-z) - std::log(eps));
    } else if (type == "nca_pair") {
      const at::Tensor rc = chosen_ratio * b, rr = rejected_ratio * b;
      losses = -at::log_sigmoid(rc) - 0.5 * at::log_sigmoid(-rc) - 0.5 * at::log_sigmoid(-rr);
    } else if (type == "bco_pair") {
      losses = -at::log_sigmoid(chosen_ratio * b) - at::log_sigmoid(rejected_ratio * -b);
    } else if (type == "sppo_hard") {
      losses = (chosen_ratio - 0.5 / b).square() + (rejected_ratio + 0.5 / b).square();
    } else if (type == "apo_zero") {
      losses = (1.0 - at::sigmoid(chosen_ratio * b)) + at::sigmoid(rejected_ratio * b);
    } else if (type == "apo_down") {
      losses = at::sigmoid(chosen_ratio * b) + (1.0 - at::sigmoid(delta * b));
    } else if (type == "discopop") {
      const at::Tensor z = delta * b, mix = at::sigmoid(z / c.discopop_tau);
      losses = -at::log_sigmoid(z) * (1.0 - mix) + at::exp(-z) * mix;
    } else {
      QT_CHECK(type == "sft", ErrorKind::Internal, "dpo_terms: loss type " + type);
      // The chosen answers' tokens' mean NLL over the micro-batch, once a pair.
      losses = (-pc.sum() / n.select(1, 0).sum()).expand({pc.size(0)});
    }
    const double w = c.loss_weights.empty() ? 1.0 : c.loss_weights[i];
    const at::Tensor term = w == 1.0 ? losses.sum() : losses.sum() * w;
    loss_sum = loss_sum.defined() ? loss_sum + term : term;
  }
  DpoTerms t;
  t.loss_sum = loss_sum;
  // TRL's metrics: rewards beta * log-ratio; accuracy chosen reward > rejected reward; margin their difference.
  const at::Tensor rc = chosen_ratio.detach() * c.beta, rr = rejected_ratio.detach() * c.beta;
  t.sums = at::stack({t.loss_sum.detach(), rc.sum(), rr.sum(), rc.gt(rr).to(at::kFloat).sum(), (rc - rr).sum(),
                      pc.detach().sum(), pr.detach().sum()});
  return t;
}

KtoSection KtoSection::from_json(const Json& section, const std::string& file) {
  reject_unknown_keys(section, {"loss_type", "beta", "desirable_weight", "undesirable_weight", "kl_group_size"}, file,
                      "kto.", ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "kto."};
  KtoSection c;
  c.loss_type = r.get_string("loss_type", c.loss_type);
  if (c.loss_type != "kto" && c.loss_type != "apo_zero_unpaired")
    fail_key(ErrorKind::Config, file, "kto.loss_type",
             "\"" + c.loss_type + "\": expected kto or apo_zero_unpaired (TRL's KTO names)");
  c.beta = r.get_double("beta", c.beta);
  if (!(c.beta > 0 && c.beta < 1e6)) fail_key(ErrorKind::Config, file, "kto.beta", "must be > 0 (TRL's default: 0.1)");
  for (auto [key, value] : {std::pair<const char*, double*>{"desirable_weight", &c.desirable_weight},
                            {"undesirable_weight", &c.undesirable_weight}}) {
    *value = r.get_double(key, *value);
    if (!(*value >= 0 && *value < 1e6)) fail_key(ErrorKind::Config, file, std::string("kto.") + key, "must be >= 0");
  }
  if (c.desirable_weight == 0 && c.undesirable_weight == 0)
    fail_key(ErrorKind::Config, file, "kto.desirable_weight", "and kto.undesirable_weight are both 0: nothing trains");
  c.kl_group_size = r.get_int("kl_group_size", c.kl_group_size);
  if (c.kl_group_size == 1 || c.kl_group_size < 0)
    fail_key(ErrorKind::Config, file, "kto.kl_group_size",
             "must be 2 or more (a group of one pairs each prompt with its own completion: the KL term would be the "
             "reward itself), or 0 (auto)");
  return c;
}

Json KtoSection::to_json() const {
  return Json{{"loss_type", loss_type},
              {"beta", beta},
              {"desirable_weight", desirable_weight},
              {"undesirable_weight", undesirable_weight},
              {"kl_group_size", kl_group_size}};
}

std::string KtoSection::describe() const {
  std::string s = loss_type;
  char b[96];
  if (desirable_weight != 1 || undesirable_weight != 1) {
    std::snprintf(b, sizeof b, ", weights %g desirable / %g undesirable", desirable_weight, undesirable_weight);
    s += b;
  }
  return s;
}

at::Tensor kto_kl(const at::Tensor& policy, const at::Tensor& reference) {
  const at::Tensor p = policy.detach().reshape({-1, 2}).select(1, 1);
  const at::Tensor r = reference.detach().reshape({-1, 2}).select(1, 1);
  return (p - r).mean().to(at::kFloat);
}

DpoTerms kto_terms(const at::Tensor& policy, const at::Tensor& reference, const at::Tensor& labels,
                   const at::Tensor& kl, const KtoSection& c) {
  const at::Tensor p = policy.reshape({-1, 2}).select(1, 0), ref = reference.detach().reshape({-1, 2}).select(1, 0);
  const at::Tensor ratio = p - ref;
  const at::Tensor good = labels.to(p.device(), at::kFloat), bad = 1 - good;
  const double b = c.beta;
  const at::Tensor base = c.kl() ? kl.to(ratio.scalar_type()) : at::zeros({}, ratio.options());
  const at::Tensor desirable = 1 - at::sigmoid(b * (ratio - base));
  const at::Tensor undesirable = c.kl() ? 1 - at::sigmoid(b * (base - ratio)) : at::sigmoid(b * ratio);
  DpoTerms t;
  t.loss_sum = (good * c.desirable_weight * desirable + bad * c.undesirable_weight * undesirable).sum();
  const at::Tensor rewards = b * ratio.detach(), logps = p.detach();
  t.sums = at::stack({t.loss_sum.detach(), base * static_cast<double>(p.size(0)), (rewards * good).sum(),
                      (logps * good).sum(), (rewards * bad).sum(), (logps * bad).sum(), good.sum(), bad.sum()})
               .to(at::kFloat);
  return t;
}

void KtoHeldOut::add(const at::Tensor& policy, const at::Tensor& reference, const at::Tensor& labels) {
  policy_.push_back(policy.detach());
  reference_.push_back(reference.detach());
  labels_.push_back(labels);
}

at::Tensor KtoHeldOut::kl_sums() const {
  double sum = 0, count = 0;
  for (size_t i = 0; i < policy_.size(); ++i) {
    const int64_t n = policy_[i].numel() / 2;
    if (n == 0) continue;
    sum += kto_kl(policy_[i], reference_[i]).item<double>() * static_cast<double>(n);
    count += static_cast<double>(n);
  }
  return at::tensor({sum, count}, at::kDouble);
}

DpoTerms KtoHeldOut::terms(const at::Tensor& sums, const KtoSection& config) const {
  const at::Tensor s = sums.to(at::kCPU, at::kDouble);
  const double count = s[1].item<double>();
  const double kl = count > 0 ? std::max(0.0, s[0].item<double>() / count) : 0.0;
  DpoTerms total;
  total.loss_sum = at::zeros({}, at::kFloat);
  total.sums = at::zeros({8}, at::kFloat);
  for (size_t i = 0; i < policy_.size(); ++i) {
    const at::Tensor base = at::full({}, kl, policy_[i].options().dtype(at::kFloat));
    const DpoTerms t = kto_terms(policy_[i], reference_[i], labels_[i].to(policy_[i].device()), base, config);
    total.loss_sum = total.loss_sum + t.loss_sum.to(at::kCPU);
    total.sums = total.sums + t.sums.to(at::kCPU);
  }
  return total;
}

std::string PreferenceObjective::describe() const {
  char b[32];
  std::snprintf(b, sizeof b, "beta %g", orpo ? orpo->beta : kto ? kto->beta : 0.0);
  return std::string(name()) + " (" +
         (dpo ? dpo->describe() : cpo ? cpo->describe() : kto ? kto->describe() + ", " + b : std::string(b)) + ")";
}

int64_t PreferenceObjective::sums_size() const {
  return kto ? 8 : 1 + static_cast<int64_t>(dpo_stat_names().size());
}

std::vector<std::pair<std::string, double>> PreferenceObjective::statistics(const std::vector<double>& sums,
                                                                            double pairs) const {
  QT_CHECK(static_cast<int64_t>(sums.size()) == sums_size(), ErrorKind::Internal,
           "PreferenceObjective::statistics: sums of another objective");
  std::vector<std::pair<std::string, double>> out;
  if (!kto) {
    for (size_t i = 0; i < dpo_stat_names().size(); ++i) out.emplace_back(dpo_stat_names()[i], sums[i + 1] / pairs);
    return out;
  }
  const double good = sums[6], bad = sums[7];
  out.emplace_back("kl", sums[1] / pairs);
  if (good > 0) out.emplace_back("rewards_chosen", sums[2] / good);
  if (bad > 0) out.emplace_back("rewards_rejected", sums[4] / bad);
  if (good > 0 && bad > 0) out.emplace_back("rewards_margin", sums[2] / good - sums[4] / bad);
  if (good > 0) out.emplace_back("logps_chosen", sums[3] / good);
  if (bad > 0) out.emplace_back("logps_rejected", sums[5] / bad);
  return out;
}

CpoSection CpoSection::from_json(const Json& section, const std::string& file) {
  reject_unknown_keys(section, {"loss_type", "beta", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha"}, file,
                      "cpo.", ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "cpo."};
  CpoSection c;
  c.loss_type = r.get_string("loss_type", c.loss_type);
  const bool alphapo = c.loss_type == "alphapo";
  if (alphapo) {  // (TRL's CPOConfig: simpo with cpo_alpha 0)
    c.loss_type = "simpo";
    c.cpo_alpha = 0.0;
  }
  if (c.loss_type != "sigmoid" && c.loss_type != "hinge" && c.loss_type != "ipo" && c.loss_type != "simpo")
    fail_key(ErrorKind::Config, file, "cpo.loss_type",
             "\"" + c.loss_type + "\": expected sigmoid, hinge, ipo, simpo or alphapo (TRL's CPO names)");
  c.beta = r.get_double("beta", c.beta);
  if (!(c.beta > 0 && c.beta < 1e6)) fail_key(ErrorKind::Config, file, "cpo.beta", "must be > 0 (TRL's default: 0.1)");
  c.label_smoothing = r.get_double("label_smoothing", c.label_smoothing);
  if (!(c.label_smoothing >= 0 && c.label_smoothing < 0.5))
    fail_key(ErrorKind::Config, file, "cpo.label_smoothing", "must be in [0, 0.5) (0: off)");
  if (c.label_smoothing > 0 && c.loss_type != "sigmoid" && c.loss_type != "simpo")
    fail_key(ErrorKind::Config, file, "cpo.label_smoothing",
             "is read by cpo.loss_type \"sigmoid\" and \"simpo\" (TRL's \"" + c.loss_type + "\" ignores it)");
  c.cpo_alpha = r.get_double("cpo_alpha", c.cpo_alpha);
  if (!(c.cpo_alpha >= 0 && std::isfinite(c.cpo_alpha)))
    fail_key(ErrorKind::Config, file, "cpo.cpo_alpha", "must be >= 0 (TRL's default: 1; SimPO: 0)");
  if (alphapo && c.cpo_alpha != 0)
    fail_key(ErrorKind::Config, file, "cpo.cpo_alpha", "cpo.loss_type \"alphapo\" is simpo with cpo_alpha 0");
  c.simpo_gamma = r.get_double("simpo_gamma", c.simpo_gamma);
  if (!std::isfinite(c.simpo_gamma)) fail_key(ErrorKind::Config, file, "cpo.simpo_gamma", "must be finite");
  c.alpha = r.get_double("alpha", c.alpha);
  if (!(std::isfinite(c.alpha) && std::abs(c.alpha) <= 100))
    fail_key(ErrorKind::Config, file, "cpo.alpha", "must be within [-100, 100] (0: off; AlphaPO's reward shape)");
  return c;
}

Json CpoSection::to_json() const {
  return Json{{"loss_type", loss_type}, {"beta", beta},           {"label_smoothing", label_smoothing},
              {"cpo_alpha", cpo_alpha}, {"simpo_gamma", simpo_gamma}, {"alpha", alpha}};
}

std::string CpoSection::describe() const {
  std::string s = loss_type;
  if (alpha != 0) {
    char a[48];
    std::snprintf(a, sizeof a, ", AlphaPO alpha %g", alpha);
    s += a;
  }
  if (cpo_alpha != 0) {
    char w[48];
    std::snprintf(w, sizeof w, " + %g x NLL", cpo_alpha);
    s += w;
  }
  return s;
}

DpoTerms cpo_terms(const at::Tensor& policy, const CpoSection& c, const at::Tensor& lengths) {
  QT_CHECK(!c.needs_lengths() || lengths.defined(), ErrorKind::Internal, "cpo_terms: " + c.describe() +
           " needs the lengths");
  const at::Tensor p = policy.reshape({-1, 2});
  const at::Tensor n = c.needs_lengths() ? lengths.reshape({-1, 2}).clamp_min(1.0) : at::Tensor();
  // The log-probabilities the loss and the statistics read: summed, or their mean over the completion's tokens.
  const at::Tensor logps = c.average_logps() ? p / n : p;
  const at::Tensor rewards = c.alpha != 0 ? (1.0 - at::exp(logps * -c.alpha)) / c.alpha : logps;
  const at::Tensor chosen = rewards.select(1, 0), rejected = rewards.select(1, 1);
  at::Tensor z = chosen - rejected;
  const double b = c.beta, ls = c.label_smoothing;
  at::Tensor losses;
  if (c.loss_type == "sigmoid" || c.loss_type == "simpo") {
    if (c.loss_type == "simpo") z = z - c.simpo_gamma / b;
    losses = at::log_sigmoid(z * b) * -(1.0 - ls);
    if (ls > 0) losses = losses - at::log_sigmoid(z * -b) * ls;
  } else if (c.loss_type == "hinge") {
    losses = at::relu(1.0 - z * b);
  } else {
    QT_CHECK(c.loss_type == "ipo", ErrorKind::Internal, "cpo_terms: loss type " + c.loss_type);
    losses = (z - 1.0 / (2.0 * b)).square();
  }
  at::Tensor loss_sum = losses.sum();
  if (c.cpo_alpha != 0) {
    // The chosen completions' NLL, their tokens' mean over the micro-batch, once a pair (TRL adds it to the mean).
    const at::Tensor nll = -p.select(1, 0).sum() / n.select(1, 0).sum();
    loss_sum = loss_sum + nll * (c.cpo_alpha * static_cast<double>(p.size(0)));
  }
  DpoTerms t;
  t.loss_sum = loss_sum;
  const at::Tensor rc = chosen.detach() * b, rr = rejected.detach() * b;
  t.sums = at::stack({t.loss_sum.detach(), rc.sum(), rr.sum(), rc.gt(rr).to(at::kFloat).sum(), (rc - rr).sum(),
                      logps.select(1, 0).detach().sum(), logps.select(1, 1).detach().sum()});
  return t;
}

OrpoSection OrpoSection::from_json(const Json& section, const std::string& file) {
  reject_unknown_keys(section, {"beta"}, file, "orpo.", ErrorKind::Config);
  const JsonReader r{section, file, ErrorKind::Config, "orpo."};
  OrpoSection c;
  c.beta = r.get_double("beta", c.beta);
  if (!(c.beta >= 0 && c.beta < 1e6))
    fail_key(ErrorKind::Config, file, "orpo.beta", "must be >= 0 (TRL's default: 0.1; 0: the NLL alone)");
  return c;
}

DpoTerms orpo_terms(const at::Tensor& policy, const OrpoSection& c, const at::Tensor& lengths, const at::Tensor& nll) {
  QT_CHECK(lengths.defined() && nll.defined(), ErrorKind::Internal, "orpo_terms: needs the lengths and the NLL");
  const at::Tensor logps = policy.reshape({-1, 2}) / lengths.reshape({-1, 2}).clamp_min(1.0);
  const at::Tensor lc = logps.select(1, 0), lr = logps.select(1, 1);
  // log(1 - exp(x)) for x < 0, as TRL's log1mexp: log1p(-exp(x)) below -ln 2, log(-expm1(x)) above.
  const auto log1mexp = [](const at::Tensor& x) {
    return at::where(x < -0.6931471805599453, at::log1p(-at::exp(x)), at::log(-at::expm1(x)));
  };
  const at::Tensor log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr));
  const int64_t pairs = lc.size(0);
  DpoTerms t;
  t.loss_sum = nll * static_cast<double>(pairs) - at::log_sigmoid(log_odds).sum() * c.beta;
  const at::Tensor rc = lc.detach() * c.beta, rr = lr.detach() * c.beta;
  t.sums = at::stack({t.loss_sum.detach(), rc.sum(), rr.sum(), rc.gt(rr).to(at::kFloat).sum(), (rc - rr).sum(),
                      lc.detach().sum(), lr.detach().sum()});
  return t;
}

at::Tensor whole_chosen_targets(const at::Tensor& input_ids, const at::Tensor& targets, const at::Tensor& sequences,
                                int64_t pairs) {
  const int64_t B = input_ids.size(0), S = input_ids.size(1);
  const at::Tensor seq = sequences.to(at::kCPU).view({B, S});
  const at::Tensor ids = input_ids.to(at::kCPU, at::kLong);
  const at::Tensor here = seq.narrow(1, 0, S - 1), next = seq.narrow(1, 1, S - 1);
  const at::Tensor chosen_next = (here == next) & (here.remainder(2) == 0) & (here < 2 * pairs);
  at::Tensor whole = at::full({B, S}, -100, at::kLong);
  whole.narrow(1, 0, S - 1).copy_(at::where(chosen_next, ids.narrow(1, 1, S - 1), at::full({}, -100, at::kLong)));
  const at::Tensor t = targets.to(at::kCPU, at::kLong);
  return at::where(t != -100, t, whole).to(targets.device(), targets.scalar_type());
}

}  // namespace qt
