#pragma once
// One tokenized training document and what the data pipeline reports about a set of them.
#include <cstdint>
#include <string>
#include <vector>

namespace qt {

struct Example {
  std::vector<int32_t> ids;
  // 1 where the token is in the loss (predicted from the tokens before it): answers and their end-of-turn
  // token, all of a text document; 0 on prompt tokens. Same length as ids.
  std::vector<uint8_t> loss;
  // A preference pair (train.objective "dpo"): ids are prompt + chosen, then prompt + rejected from ids[second] on,
  // two documents that build_batch lays side by side in one row. 0: one document.
  int64_t second = 0;
  // KTO's unpaired records (train.objective "kto"): 1 a desirable completion, 0 an undesirable one; -1 none. Paired by
  // kto_pairs with the KL sequence (its prompt before another record's completion) as the second sequence.
  int8_t label = -1;
  int64_t line = 0;    // line of the jsonl record it came from (0: none)
  int32_t source = 0;  // which of data.train_file's files (DataConfig::train_files) it came from
};

// Each sequence of a pair keeps its first max_len tokens (TRL's max_length with truncation_mode keep_start, per
// sequence). No-op for a pair that fits or a single document.
void truncate_pair(Example& e, int64_t max_len);
// Whether a pair has a sequence longer than max_len tokens (false for a single document).
bool pair_longer_than(const Example& e, int64_t max_len);

// Next-token targets of each sequence of a pair (tokens in the loss that are not their sequence's first): the
// lesser of the two, or a single document's count; a KTO pair's first sequence's (its KL sequence is no target).
int64_t fewest_targets(const Example& e);

// KTO (TRL's KTOTrainer, trl 1.16): each labelled single example (Example::label, its prompt the tokens before its
// first loss token) made a pair whose first sequence is itself, every token from the prompt's end in the loss, and
// whose second is the KL sequence: its prompt before the completion of the example before it in its group of
// `group` consecutive examples (the group's first takes its last's; TRL's rotation of the completions within each
// batch of per_device_train_batch_size, in the data's order). kl false (apo_zero_unpaired, no KL term): the second
// sequence is the prompt's first token alone.
std::vector<Example> kto_pairs(std::vector<Example> examples, int64_t group, bool kl);

struct DataStats {
  int64_t documents = 0;
  int64_t tokens = 0;
  int64_t loss_tokens = 0;    // tokens with loss = 1 (each a target once batched, unless a document's first)
  int64_t masked_tokens = 0;  // tokens with loss = 0 (prompt)
  int64_t truncated = 0;      // documents cut to max_seq_len
  int64_t truncated_tokens = 0;

  void add(const Example& e);
  std::string summary() const;  // one line for the log
};

}  // namespace qt
