#pragma once
// A tokenized data set with a deterministic order per epoch, and the iterator that cuts it into micro-batches
// from a resumable position. Orders come from std::mt19937_64 and a Fisher-Yates shuffle written here (not
// std::shuffle or std::uniform_int_distribution, whose algorithms differ between standard libraries; not torch's
// RNG), so a position saved in a checkpoint means the same examples on any machine.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/batch.h"
#include "lib/core/json.h"
#include "lib/data/example.h"
#include "lib/data/packing.h"

namespace qt {

// Where the next micro-batch starts: order(epoch)[index] is the first example it takes.
struct DataPosition {
  int64_t epoch = 0;
  int64_t index = 0;

  Json to_json() const;  // {"epoch": e, "index": i}
  // Errors are qt::Error(Checkpoint) naming `file`.
  static DataPosition from_json(const Json& value, const std::string& file);
  bool operator==(const DataPosition& o) const { return epoch == o.epoch && index == o.index; }
};

class Dataset {
 public:
  // Documents longer than max_seq_len keep their first max_seq_len tokens; their number is counted in stats()
  // and logged once as a warning.
  // best_fit: order() reordered for best-fit packing (data.packing_strategy, packing.h's best_fit_order).
  Dataset(std::vector<Example> examples, int64_t max_seq_len, bool shuffle, uint64_t seed, bool best_fit = false);

  int64_t size() const { return static_cast<int64_t>(examples_.size()); }
  int64_t max_seq_len() const { return max_seq_len_; }
  const std::vector<Example>& examples() const { return examples_; }
  const DataStats& stats() const { return stats_; }
  // The permutation of example indices for `epoch` (identity when not shuffling), then with best_fit each window
  // of it reordered for packing. Depends only on the seed, the epoch and the examples' lengths.
  std::vector<int64_t> order(int64_t epoch) const;
  bool best_fit() const { return best_fit_; }
  // FNV-1a over the ids and loss masks: a checkpoint records it to notice data that changed under a resume.
  uint64_t fingerprint() const;

 private:
  std::vector<Example> examples_;
  int64_t max_seq_len_;
  bool shuffle_;
  uint64_t seed_;
  bool best_fit_ = false;
  DataStats stats_;
};

// Micro-batches over the epochs of a Dataset, starting at `start`: the epochs are one stream of rows, each
// micro-batch its next micro_batch_size rows (the one that reaches an epoch's end continues into the next epoch's
// order), so that the rows of a step do not depend on its micro-batch size.
class BatchIterator {
 public:
  BatchIterator(const Dataset& dataset, int64_t micro_batch_size, bool packing, DataPosition start = {},
                int32_t pad_id = 0);
  Batch next();
  // Where the next call to next() starts; save it with a checkpoint and pass it back as `start` to resume.
  DataPosition position() const { return pos_; }

 private:
  const Dataset& dataset_;
  BatchShape shape_;
  int32_t pad_id_;
  DataPosition pos_;
  std::vector<int64_t> order_;  // order(pos_.epoch)
  int64_t order_epoch_ = -1;
};

// Holds out round(fraction * n) examples (at least 1 when fraction > 0, at most n - 1), chosen by `seed`;
// both parts keep the file order. Returns {train, eval}.
std::pair<std::vector<Example>, std::vector<Example>> split_eval(std::vector<Example> examples, double fraction,
                                                                 uint64_t seed);

}  // namespace qt
