#pragma once
// The trainer's view of the data: tokenized once at start (train and held-out eval), ordered per epoch, cut into
// micro-batches; each optimizer step takes the next batch_size rows (packed or padded) of the global order, and
// rank r of N takes every N-th micro-batch of them, so the step's content does not depend on the world size.
#include <memory>
#include <string>
#include <vector>

#include "lib/core/batch.h"
#include "lib/data/data_config.h"
#include "lib/data/dataset.h"
#include "lib/data/tokenizer.h"
#include "lib/train/dpo.h"

namespace qt {

class TrainData {
 public:
  // kto (train.objective "kto"): the records are unpaired {prompt, completion, label} or preference pairs (two
  // unpaired records each), made KTO's pairs (kto_pairs) in groups of kto->group(micro_batch_size).
  TrainData(const Json& data_section, const std::string& config_file, const Tokenizer& tokenizer,
            int64_t micro_batch_size, const KtoSection* kto = nullptr);

  // Tokens a row: data.max_seq_len, twice it for preference pairs (each sequence up to data.max_seq_len).
  int64_t max_seq_len() const { return row_len_; }
  // The records are preference pairs (Example::second): train.objective "dpo" trains on them.
  bool pairs() const { return pairs_; }
  const DataConfig& config() const { return config_; }
  const Dataset& train_set() const { return *train_; }
  // Optimizer steps in one pass over the training set with `batch_size` rows per step (the last partial step
  // of an epoch counts).
  int64_t steps_per_epoch(int64_t batch_size) const;
  // The rows of one pass over the training set (the first epoch's order), counted once at load.
  int64_t epoch_rows() const { return epoch_rows_; }
  // Whether there is held-out data at all (a rank's share of it may be empty: fewer held-out batches than ranks).
  bool has_eval() const { return !eval_.empty(); }
  // This rank's micro-batches of the held-out set (empty when there is no eval data).
  std::vector<Batch> eval_batches(int rank, int world) const;
  // This rank's micro-batches of the next optimizer step of `batch_size` rows.
  std::vector<Batch> next_step(int64_t batch_size, int rank, int world);

  // Writes the held-out records (a share of data.train_file, or data.eval_file) to `path` as they were in their
  // file, one a line in file order, so that `qlora-train eval --data path` recomputes the logged eval_loss. KTO's
  // records unpaired from a preference pair are written unpaired ({prompt, completion, label} and the pair's other
  // keys), in the order they were held out in. Nothing is written when there is no held-out data.
  void write_eval_records(const std::string& path) const;

  DataPosition position() const { return iterator_->position(); }
  // Training records left out at load for holding no target token (a checkpoint's data position counts without
  // them since the ninth session).
  int64_t untrained_left_out() const { return untrained_left_out_; }
  void seek(const DataPosition& position);
  // The training documents' token-weighted mean length, each cut to max_seq_len (the tokens a token attends over,
  // as causal attention's FLOPs count them), and whether rows hold several documents or padding (the varlen kernel).
  double attention_span() const;
  bool varlen_rows() const;
  // The largest token id of the training and held-out records (-1: none), the one with it (file:line).
  std::pair<int64_t, std::string> max_token_id() const;
  // Rows per micro-batch from now on (the plan's; the next seek() cuts the data so).
  void set_micro_batch(int64_t micro) { micro_ = micro; }

 private:
  int64_t count_epoch_rows() const;  // plan_rows over order(0)
  int64_t epoch_rows_ = 0;
  // data.truncation on the training records longer than a row: drop them, stop naming them, or leave the cut
  // to Dataset (warning about the records the cut leaves with no target).
  void apply_truncation(std::vector<Example>& train) const;
  // Returns how many it left out; `training`: none where none has a target (check_has_targets says why).
  // from_train_files: the examples came from data.train_file's files (the training set or its held-out share), so
  // that a record's place names its file where there are several.
  int64_t leave_out_untrained(std::vector<Example>& examples, const std::string& source, bool training,
                              bool from_train_files) const;
  // A record's place in messages: its line, with its file where data.train_file lists several.
  std::string where(const Example& e, bool from_train_files) const;
  // A run that would train on no target token stops here, before the model loads, naming data.max_seq_len.
  void check_has_targets() const;

  DataConfig config_;
  int64_t micro_;
  int32_t pad_id_;
  std::unique_ptr<Dataset> train_;
  std::vector<Example> eval_;
  std::unique_ptr<BatchIterator> iterator_;
  int64_t untrained_left_out_ = 0;
  bool pairs_ = false;
  int64_t row_len_ = 0;
};

}  // namespace qt
