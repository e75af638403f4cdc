#pragma once
// Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) as TRL's DPOTrainer computes it
// (trl 1.16): for each pair, the summed log-probabilities of the chosen and the rejected completion under the policy
// (the model with its adapters) and under the reference (the model as training starts: the base for fresh adapters,
// base + lora.init_from's adapter otherwise, as TRL's reference of a PEFT model), and
//   delta = (chosen - ref_chosen) - (rejected - ref_rejected)
//   loss  = sigmoid: -log sigmoid(beta delta)             robust: (-(1 - ls) log sigmoid(beta delta)
//           hinge:   relu(1 - beta delta)                          + ls log sigmoid(-beta delta)) / (1 - 2 ls)
//           ipo:     (delta' - 1 / (2 beta))^2, delta' with each log-ratio divided by its completion's tokens,
// its mean over the pairs of a step. A pair is one Example holding both sequences (Example::second), laid by the
// packer as two documents of a row: chosen, then rejected.
#include <ATen/core/Tensor.h>

#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/batch.h"
#include "lib/core/json.h"
#include "lib/model/llama.h"
#include "lib/model/qlora_linear.h"

namespace qt {

struct DpoSection {
  // TRL's loss_type, one name or several whose losses are summed (loss_weights: each one's weight, default 1; RPO is
  // ["sigmoid", "sft"] with weights [1, alpha]): sigmoid (DPO), robust, hinge, ipo, exo_pair, nca_pair, bco_pair,
  // sppo_hard, apo_zero, apo_down, discopop, sft (the chosen answers' NLL, a token mean) or sigmoid_norm.
  std::vector<std::string> loss_types = {"sigmoid"};
  std::vector<double> loss_weights;  // empty: 1 each
  double beta = 0.1;                 // TRL's beta: the strength of the pull towards the reference
  // robust: the chance a pair's preference is flipped, in [0, 0.5); exo_pair: its epsilon, in (0, 0.5)
  double label_smoothing = 0.0;
  double discopop_tau = 0.05;        // discopop: its temperature

  // The "dpo" section {loss_type, loss_weights, beta, label_smoothing, discopop_tau}; unknown keys and values out
  // of range are qt::Error(Config) naming `file` and the key.
  static DpoSection from_json(const Json& section, const std::string& file);
  Json to_json() const;
  bool needs_lengths() const;  // a loss type reading each sequence's completion tokens (sequence_targets)
  std::string describe() const;  // "sigmoid", "sigmoid + 0.5 x sft"
};

// The sequence of each token of a micro-batch of pairs, [B * S] int64 on the CPU: each row's documents numbered on
// from the rows before it (a pair's chosen even, its rejected the next odd number), padding 2 * b.num_pairs.
at::Tensor pair_sequences(const Batch& b);

// Each sequence's summed log-probability of its targets, [2 * pairs] fp32: minus the sum of `token_losses` ([B * S],
// the cross-entropy of each token, 0 where it has no target) over the sequence's tokens. Differentiable.
at::Tensor sequence_logps(const at::Tensor& token_losses, const at::Tensor& sequences, int64_t pairs);

// Each sequence's targets (its completion's tokens), [2 * pairs] fp32 on `device`: ipo's lengths.
at::Tensor sequence_targets(const Batch& b, const at::Tensor& sequences, const at::Device& device);
// The same count of `targets` ([B, S] on the CPU, -100 where none), for targets other than the batch's (ORPO's).
at::Tensor sequence_targets(const at::Tensor& targets, const at::Tensor& sequences, int64_t pairs,
                            const at::Device& device);

// DPO's reference: the model as training starts. Fresh adapters (B = 0) are the base, so they are left out for the
// pass; adapters from `init_from` (lora.init_from) are that directory's, read again here so that a resumed run
// compares with the same reference, kept frozen beside the trained ones and swapped in for the pass.
class ReferenceAdapters {
 public:
  ReferenceAdapters(LlamaModel& model, const std::string& init_from);
  const std::string& describe() const { return describe_; }

  // While alive, the model computes the reference.
  class Scope {
   public:
    explicit Scope(ReferenceAdapters& r);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ReferenceAdapters& r_;
  };

 private:
  void swap();
  LlamaModel& model_;
  // for_each_linear's order, null where a linear has none (all null: fresh adapters); swapped with the model's
  std::vector<std::shared_ptr<LoraAdapter>> frozen_;
  // init_from's: the compute-dtype factors of the frozen adapters, swapped with the model's cache (each pass finds
  // its own factors current instead of making them again at every switch)
  std::shared_ptr<LoraFactorCache> factors_;
  std::string describe_;
};

// A micro-batch of pairs cut in two micro-batches of one sequence each: `first` holds each row's first sequences (a
// pair's chosen, a KTO record's own), `second` the others (KTO's KL sequences), each in its row of `b`, in order,
// with their positions, targets and labels; rows as long as their longest, rounded up to a multiple of 64 (at most
// half of b's, or their longest). first_sequences / second_sequences: pair_sequences' numbering of b for their
// tokens (a pair's first 2k, its second 2k + 1, padding 2 * pairs), so that sequence_logps of either gives
// [2 * pairs] with the other's slots 0.
struct PairHalves {
  Batch first, second;
  at::Tensor first_sequences, second_sequences;
};
PairHalves split_pairs(const Batch& b);

// The statistics of a set of pairs that the trainer logs, as sums over the pairs (TRL's names without "/": means
// once divided by the pairs).
const std::vector<std::string>& dpo_stat_names();

struct DpoTerms {
  at::Tensor loss_sum;  // fp32 scalar, the loss summed over the pairs; differentiable through `policy`
  // [1 + dpo_stat_names().size()] fp32, no gradient: the loss sum, then each statistic summed over the pairs
  at::Tensor sums;
};

// policy, reference: [2 * pairs] from sequence_logps (chosen at even indices); lengths: sequence_targets (where
// config.needs_lengths()). Each loss type's losses summed over the pairs, weighted; "sft" counts the micro-batch's
// token mean once a pair, as TRL expands it.
DpoTerms dpo_terms(const at::Tensor& policy, const at::Tensor& reference, const DpoSection& config,
                   const at::Tensor& lengths = {});

// Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417) as TRL's CPOTrainer computes it (trl 1.16,
// trl.experimental.cpo): reference-free, on the policy's log-probabilities alone (summed over a completion's tokens;
// for ipo and simpo their mean), z = chosen - rejected:
//   sigmoid: -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z)      hinge: relu(1 - beta z)
//   simpo:   the same as sigmoid at z - simpo_gamma / beta (SimPO, Meng et al., 2024)
//   ipo:     (z - 1 / (2 beta))^2
// plus cpo_alpha x the chosen completions' NLL (the micro-batch's token mean). With alpha != 0 (AlphaPO) each
// log-probability p becomes (1 - exp(-alpha p)) / alpha first. "alphapo" is TRL's shorthand for simpo with cpo_alpha 0.
struct CpoSection {
  std::string loss_type = "sigmoid";  // sigmoid, hinge, ipo or simpo
  double beta = 0.1;
  double label_smoothing = 0.0;  // sigmoid and simpo: in [0, 0.5)
  double cpo_alpha = 1.0;        // the weight of the chosen completions' NLL
  double simpo_gamma = 0.5;      // simpo: the target reward margin
  double alpha = 0.0;            // AlphaPO's reward shape (0: the log-probabilities as they are)

  // The "cpo" section {loss_type, beta, label_smoothing, cpo_alpha, simpo_gamma, alpha}; unknown keys and values out
  // of range are qt::Error(Config) naming `file` and the key.
  static CpoSection from_json(const Json& section, const std::string& file);
  Json to_json() const;
  bool average_logps() const { return loss_type == "ipo" || loss_type == "simpo"; }
  bool needs_lengths() const { return average_logps() || cpo_alpha != 0; }
  std::string describe() const;  // "simpo", "sigmoid + 1 x NLL"
};

// policy: [2 * pairs] from sequence_logps; lengths: sequence_targets (where config.needs_lengths()). The same sums as
// dpo_terms, with CPO's rewards (beta x the policy's log-probabilities, after AlphaPO's shape) in the statistics.
DpoTerms cpo_terms(const at::Tensor& policy, const CpoSection& config, const at::Tensor& lengths = {});

// Odds Ratio Preference Optimization (Hong et al., 2024, arXiv:2403.07691) as TRL's ORPOTrainer computes it (trl
// 1.16, trl.experimental.orpo): reference-free, on the policy's log-probabilities' mean over each completion's tokens
// (lc, lr), log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr))), and
//   loss = NLL - beta log sigmoid(log_odds)
// where NLL is the chosen sequences' cross-entropy over all their tokens, the prompt's included (TRL's: the labels
// are the whole sequence), a micro-batch's token mean.
struct OrpoSection {
  double beta = 0.1;  // TRL's beta (the paper's lambda): the odds ratio term's weight

  // The "orpo" section {beta}; unknown keys and values out of range are qt::Error(Config) naming `file` and the key.
  static OrpoSection from_json(const Json& section, const std::string& file);
  Json to_json() const { return Json{{"beta", beta}}; }
};

// policy: [2 * pairs] completion log-probability sums; lengths: their tokens; nll: the chosen sequences' mean
// cross-entropy over all their tokens (the micro-batch's). Statistics as cpo_terms' (rewards beta x the means).
DpoTerms orpo_terms(const at::Tensor& policy, const OrpoSection& config, const at::Tensor& lengths,
                    const at::Tensor& nll);

// Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306) as TRL's KTOTrainer computes it (trl
// 1.16): unpaired records, each one completion labelled desirable or undesirable (Example::label), laid as pairs by
// kto_pairs: the record's sequence, then its KL sequence (its prompt before another record's completion). With r a
// record's log-ratio (policy - reference, its completion's summed log-probabilities) and the KL baseline
//   kl = max(0, the mean over the micro-batch's KL sequences of policy - reference)   (no gradient; over the ranks)
//   kto:               desirable 1 - sigmoid(beta (r - kl)),   undesirable 1 - sigmoid(beta (kl - r))
//   apo_zero_unpaired: desirable 1 - sigmoid(beta r),          undesirable sigmoid(beta r)         (no KL sequences)
// each weighted by desirable_weight or undesirable_weight, the loss their mean over the records of a step. The
// reference is DPO's (ReferenceAdapters).
struct KtoSection {
  std::string loss_type = "kto";  // kto or apo_zero_unpaired
  double beta = 0.1;
  double desirable_weight = 1.0;
  double undesirable_weight = 1.0;
  // The records whose completions rotate to make the KL sequences (TRL: per_device_train_batch_size); 0:
  // train.micro_batch_size where that is 2 or more, else 8.
  int64_t kl_group_size = 0;

  // The "kto" section {loss_type, beta, desirable_weight, undesirable_weight, kl_group_size}; unknown keys and
  // values out of range are qt::Error(Config) naming `file` and the key.
  static KtoSection from_json(const Json& section, const std::string& file);
  Json to_json() const;
  bool kl() const { return loss_type == "kto"; }
  int64_t group(int64_t micro_batch_size) const {
    return kl_group_size > 0 ? kl_group_size : micro_batch_size >= 2 ? micro_batch_size : 8;
  }
  std::string describe() const;  // "kto", "kto, undesirable weight 1.5"
};

// The KL baseline's part from one micro-batch: the mean over its KL sequences (odd indices of policy and reference,
// [2 * records]) of policy - reference, an fp32 scalar without gradient (before the mean over ranks and the clamp).
at::Tensor kto_kl(const at::Tensor& policy, const at::Tensor& reference);

// policy, reference: [2 * records] from sequence_logps (even: the records' sequences, odd: their KL sequences);
// labels: [records] 1 (desirable) or 0, on policy's device; kl: the baseline (an fp32 scalar, 0 without a KL term).
// The loss summed over the records; sums: [loss, kl x records, rewards and log-probabilities of the desirable
// records summed, likewise the undesirable ones', the count of each] (PreferenceObjective::statistics reads them).
DpoTerms kto_terms(const at::Tensor& policy, const at::Tensor& reference, const at::Tensor& labels,
                   const at::Tensor& kl, const KtoSection& config);

// KTO's held-out records (training's evaluation, `qlora-train eval`): the KL baseline is the mean over ALL the
// held-out KL sequences (not a micro-batch's: a held-out loss that does not depend on how the set is cut into
// micro-batches or ranks), so each micro-batch's log-probabilities are kept until it is known.
class KtoHeldOut {
 public:
  // policy, reference: [2 * records] (sequence_logps); labels: Batch::pair_labels (any device).
  void add(const at::Tensor& policy, const at::Tensor& reference, const at::Tensor& labels);
  // [the KL sequences' policy - reference summed, their count] in fp64 on the CPU: added up over the ranks by the
  // caller where there are several.
  at::Tensor kl_sums() const;
  // Every record's terms against the baseline max(0, sums[0] / sums[1]) (0 without a KL term), summed.
  DpoTerms terms(const at::Tensor& sums, const KtoSection& config) const;

 private:
  std::vector<at::Tensor> policy_, reference_, labels_;
};

// A run's preference objective: DPO or KTO (against its reference), CPO or ORPO (reference-free); empty for SFT.
struct PreferenceObjective {
  const DpoSection* dpo = nullptr;
  const CpoSection* cpo = nullptr;
  const OrpoSection* orpo = nullptr;
  const KtoSection* kto = nullptr;
  explicit operator bool() const { return dpo || cpo || orpo || kto; }
  bool needs_reference() const { return dpo != nullptr || kto != nullptr; }
  bool needs_lengths() const { return dpo ? dpo->needs_lengths() : cpo ? cpo->needs_lengths() : orpo != nullptr; }
  // ORPO: the chosen sequences' NLL over their prompts' tokens too
  bool needs_prompt_nll() const { return orpo != nullptr; }
  const char* name() const { return dpo ? "DPO" : cpo ? "CPO" : orpo ? "ORPO" : "KTO"; }
  std::string describe() const;
  // reference: undefined for CPO and ORPO; nll: ORPO's (needs_prompt_nll). Not KTO's (kto_terms).
  DpoTerms terms(const at::Tensor& policy, const at::Tensor& reference, const at::Tensor& lengths,
                 const at::Tensor& nll = {}) const {
    if (dpo) return dpo_terms(policy, reference, *dpo, lengths);
    if (cpo) return cpo_terms(policy, *cpo, lengths);
    return orpo_terms(policy, *orpo, lengths, nll);
  }
  // The length of DpoTerms::sums, and the statistics logged from them once added up over a step's micro-batches and
  // ranks (or a held-out set's) holding `pairs` pairs (KTO: records): (name, value), the loss left out; KTO leaves
  // out the desirable records' statistics (and the margin) where there is none, and likewise the undesirable ones'.
  int64_t sums_size() const;
  std::vector<std::pair<std::string, double>> statistics(const std::vector<double>& sums, double pairs) const;
};

// ORPO's targets: `targets` ([B, S], the completions' next tokens, -100 elsewhere) with every other next token of a
// chosen sequence (even `sequences`, [B * S]) added, its prompt's: TRL's labels of the whole chosen sequence.
at::Tensor whole_chosen_targets(const at::Tensor& input_ids, const at::Tensor& targets, const at::Tensor& sequences,
                                int64_t pairs);

}  // namespace qt
