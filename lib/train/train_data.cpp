#include "lib/train/train_data.h"

#include "lib/core/error.h"
#include "lib/core/log.h"
#include "lib/data/packing.h"
#include "lib/data/records.h"

namespace qt {

TrainData::TrainData(const Json& section, const std::string& file, const Tokenizer& tokenizer, int64_t micro)
    : config_(DataConfig::from_json(section, file)), micro_(micro) {
  pad_id_ = tokenizer.eos_id() >= 0 ? tokenizer.eos_id() : 0;  // padding carries no target; any id will do
  std::vector<Example> train = load_examples(config_.train_file, config_, tokenizer);
  if (!config_.eval_file.empty()) {
    eval_ = load_examples(config_.eval_file, config_, tokenizer);
  } else if (config_.eval_fraction > 0) {
    auto [t, e] = split_eval(std::move(train), config_.eval_fraction, config_.seed);
    train = std::move(t);
    eval_ = std::move(e);
  }
  train_ = std::make_unique<Dataset>(std::move(train), config_.max_seq_len, config_.shuffle, config_.seed);
  log::info("data: " + train_->stats().summary() + (eval_.empty() ? "" : "; " + std::to_string(eval_.size()) + " held-out documents"));
  seek({});
}

void TrainData::seek(const DataPosition& position) {
  iterator_ = std::make_unique<BatchIterator>(*train_, micro_, config_.packing, position, pad_id_);
}

int64_t TrainData::steps_per_epoch(int64_t batch_size) const {
  const std::vector<int64_t> order = train_->order(0);
  const BatchShape shape{1, config_.max_seq_len, config_.packing};
  int64_t rows = 0;
  std::vector<std::vector<int64_t>> planned;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++rows) {
    planned.clear();
    i = plan_rows(train_->examples(), order, i, shape, &planned);
  }
  return std::max<int64_t>(1, (rows + batch_size - 1) / batch_size);
}

std::vector<Batch> TrainData::eval_batches(int rank, int world) const {
  std::vector<Batch> mine;
  if (eval_.empty()) return mine;
  std::vector<int64_t> order(eval_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  // Held-out documents longer than a row keep their first max_seq_len tokens, as in training.
  std::vector<Batch> all = make_batches(eval_, order, micro_, config_.max_seq_len, config_.packing);
  for (size_t i = 0; i < all.size(); ++i)
    if (static_cast<int>(i % static_cast<size_t>(world)) == rank) mine.push_back(std::move(all[i]));
  return mine;
}

std::vector<Batch> TrainData::next_step(int64_t batch_size, int rank, int world) {
  if (batch_size % (micro_ * world) != 0)
    fail(ErrorKind::Config, "train.batch_size " + std::to_string(batch_size) + " is not a multiple of micro_batch_size " +
                                std::to_string(micro_) + " x world size " + std::to_string(world));
  const int64_t micro_batches = batch_size / micro_;
  std::vector<Batch> mine;
  for (int64_t i = 0; i < micro_batches; ++i) {
    Batch b = iterator_->next();
    if (static_cast<int>(i % world) == rank) mine.push_back(std::move(b));
  }
  return mine;
}

}  // namespace qt
