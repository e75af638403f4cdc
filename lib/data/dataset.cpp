#include "lib/data/dataset.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <random>

#include "lib/core/error.h"
#include "lib/core/log.h"
#include "lib/data/packing.h"

namespace qt {

void DataStats::add(const Example& e) {
  ++documents;
  tokens += static_cast<int64_t>(e.ids.size());
  for (uint8_t l : e.loss) (l ? loss_tokens : masked_tokens) += 1;
}

void truncate_pair(Example& e, int64_t max_len) {
  const int64_t n = static_cast<int64_t>(e.ids.size());
  if (e.second <= 0) return;
  const int64_t c = std::min(e.second, max_len), r = std::min(n - e.second, max_len);
  if (c == e.second && r == n - e.second) return;
  auto cut = [&](const auto& v) {
    std::remove_cv_t<std::remove_reference_t<decltype(v)>> out(v.begin(), v.begin() + c);
    out.insert(out.end(), v.begin() + e.second, v.begin() + e.second + r);
    return out;
  };
  e.ids = cut(e.ids);
  e.loss = cut(e.loss);
  e.second = c;
}

bool pair_longer_than(const Example& e, int64_t max_len) {
  return e.second > 0 && (e.second > max_len || static_cast<int64_t>(e.ids.size()) - e.second > max_len);
}

int64_t fewest_targets(const Example& e) {
  auto targets = [&](size_t begin, size_t end) {
    int64_t t = 0;
    for (size_t i = begin + 1; i < end; ++i) t += e.loss[i];
    return t;
  };
  if (e.second <= 0) return targets(0, e.loss.size());
  if (e.label >= 0) return targets(0, static_cast<size_t>(e.second));
  return std::min(targets(0, static_cast<size_t>(e.second)), targets(static_cast<size_t>(e.second), e.loss.size()));
}

std::vector<Example> kto_pairs(std::vector<Example> examples, int64_t group, bool kl) {
  QT_CHECK(group > 0, ErrorKind::Internal, "kto_pairs: the group must be positive");
  const auto prompt_end = [](const Example& e) {
    QT_CHECK(e.label >= 0 && e.second <= 0, ErrorKind::Internal, "kto_pairs: an example without a label");
    return static_cast<size_t>(std::find(e.loss.begin(), e.loss.end(), uint8_t{1}) - e.loss.begin());
  };
  std::vector<Example> out;
  out.reserve(examples.size());
  const size_t n = examples.size(), g = static_cast<size_t>(group);
  for (size_t start = 0; start < n; start += g) {
    const size_t size = std::min(g, n - start);
    for (size_t k = 0; k < size; ++k) {
      const Example& e = examples[start + k];
      const Example& other = examples[start + (k + size - 1) % size];
      const size_t p = prompt_end(e), q = prompt_end(other);
      Example x;
      x.label = e.label, x.line = e.line, x.source = e.source;
      x.ids = e.ids;
      x.loss.assign(e.ids.size(), 0);
      std::fill(x.loss.begin() + static_cast<std::ptrdiff_t>(p), x.loss.end(), uint8_t{1});
      x.second = static_cast<int64_t>(x.ids.size());
      const size_t prompt = kl ? p : std::min<size_t>(1, e.ids.size());
      x.ids.insert(x.ids.end(), e.ids.begin(), e.ids.begin() + static_cast<std::ptrdiff_t>(prompt));
      x.loss.insert(x.loss.end(), prompt, 0);
      if (kl) {
        x.ids.insert(x.ids.end(), other.ids.begin() + static_cast<std::ptrdiff_t>(q), other.ids.end());
        x.loss.insert(x.loss.end(), other.ids.size() - q, 1);
      }
      out.push_back(std::move(x));
    }
  }
  return out;
}

std::string DataStats::summary() const {
  return std::to_string(documents) + " documents, " + std::to_string(tokens) + " tokens (" +
         std::to_string(loss_tokens) + " in the loss, " + std::to_string(masked_tokens) + " masked), " +
         std::to_string(truncated) + " truncated (" + std::to_string(truncated_tokens) + " tokens cut)";
}

Json DataPosition::to_json() const { return Json{{"epoch", epoch}, {"index", index}}; }

DataPosition DataPosition::from_json(const Json& value, const std::string& file) {
  const JsonReader r{value, file, ErrorKind::Checkpoint, "data_position."};
  DataPosition p{r.get_int("epoch"), r.get_int("index")};
  if (p.epoch < 0 || p.index < 0)
    fail_key(ErrorKind::Checkpoint, file, "data_position", "negative epoch or index: " + value.dump());
  return p;
}

namespace {

// Uniform in [0, n) by rejection (no modulo bias), from mt19937_64's specified output sequence.
uint64_t draw_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = rng();
  while (x >= limit);
  return x % n;
}

// std::seed_seq's mixing is specified by the standard; the stream tag keeps the eval split and the epoch
// orders apart for one seed.
std::mt19937_64 make_rng(uint64_t seed, uint64_t stream, uint64_t epoch) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(stream),
                    static_cast<uint32_t>(epoch), static_cast<uint32_t>(epoch >> 32)};
  return std::mt19937_64(seq);
}

std::vector<int64_t> permutation(int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[i], p[draw_below(rng, static_cast<uint64_t>(i) + 1)]);
  return p;
}

constexpr uint64_t kEpochStream = 1, kEvalStream = 2;

}  // namespace

Dataset::Dataset(std::vector<Example> examples, int64_t max_seq_len, bool shuffle, uint64_t seed, bool best_fit)
    : examples_(std::move(examples)), max_seq_len_(max_seq_len), shuffle_(shuffle), seed_(seed), best_fit_(best_fit) {
  QT_CHECK(max_seq_len > 0, ErrorKind::Internal, "Dataset: max_seq_len must be positive");
  for (auto& e : examples_) {
    QT_CHECK(e.loss.size() == e.ids.size(), ErrorKind::Internal, "Dataset: loss mask and ids differ in length");
    // (a pair: each of its sequences within half a row, TRL's max_length)
    if (e.second > 0 ? pair_longer_than(e, max_seq_len_ / 2) : static_cast<int64_t>(e.ids.size()) > max_seq_len_) {
      ++stats_.truncated;
      const int64_t before = static_cast<int64_t>(e.ids.size());
      if (e.second > 0) {
        truncate_pair(e, max_seq_len_ / 2);
      } else {
        e.ids.resize(max_seq_len_);
        e.loss.resize(max_seq_len_);
      }
      stats_.truncated_tokens += before - static_cast<int64_t>(e.ids.size());
    }
    stats_.add(e);
  }
  if (stats_.truncated > 0)
    log::warn_rank0(std::to_string(stats_.truncated) + " of " + std::to_string(stats_.documents) +
              " documents are longer than data.max_seq_len = " + std::to_string(max_seq_len_) +
              " and were truncated (" + std::to_string(stats_.truncated_tokens) + " tokens dropped)");
}

std::vector<int64_t> Dataset::order(int64_t epoch) const {
  std::vector<int64_t> p(examples_.size());
  if (!shuffle_) {
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<int64_t>(i);
  } else {
    std::mt19937_64 rng = make_rng(seed_, kEpochStream, static_cast<uint64_t>(epoch));
    p = permutation(size(), rng);
  }
  return best_fit_ ? best_fit_order(examples_, p, max_seq_len_) : p;
}

uint64_t Dataset::fingerprint() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a 64-bit offset basis and prime (FNV spec)
  auto mix = [&h](uint64_t v) {
    for (int b = 0; b < 8; ++b) {
      h ^= (v >> (8 * b)) & 0xFF;
      h *= 1099511628211ull;
    }
  };
  for (const auto& e : examples_) {
    mix(e.ids.size());
    if (e.second > 0) mix(static_cast<uint64_t>(e.second) | uint64_t{1} << 63);  // (single documents as before)
    if (e.label >= 0) mix(static_cast<uint64_t>(e.label) | uint64_t{1} << 62);    // (KTO's; others as before)
    for (size_t i = 0; i < e.ids.size(); ++i)
      mix(static_cast<uint64_t>(static_cast<uint32_t>(e.ids[i])) << 1 | e.loss[i]);
  }
  return h;
}

BatchIterator::BatchIterator(const Dataset& dataset, int64_t micro_batch_size, bool packing, DataPosition start,
                             int32_t pad_id)
    : dataset_(dataset), shape_{micro_batch_size, dataset.max_seq_len(), packing}, pad_id_(pad_id), pos_(start) {
  if (dataset.size() == 0) fail(ErrorKind::Data, "the data set is empty: no micro-batch can be made");
  if (micro_batch_size <= 0) fail(ErrorKind::Config, "micro_batch_size must be positive");
  if (pos_.epoch < 0 || pos_.index < 0 || pos_.index > dataset.size())
    fail(ErrorKind::Checkpoint, "data position (epoch " + std::to_string(pos_.epoch) + ", index " +
                                    std::to_string(pos_.index) + ") is outside the data set of " +
                                    std::to_string(dataset.size()) + " documents");
  if (pos_.index == dataset.size()) pos_ = {pos_.epoch + 1, 0};
}

Batch BatchIterator::next() {
  // The epochs are one stream of rows: a micro-batch that reaches an epoch's end takes its remaining rows from the
  // next epoch's start, so that every micro-batch is full and a step's rows (the next batch_size rows of the stream)
  // do not depend on how the step is cut into micro-batches (the micro-batch size, the world size). Greedy packing
  // starts a new row at each call, so the rows themselves do not depend on it either.
  std::vector<std::vector<int64_t>> rows;
  while (static_cast<int64_t>(rows.size()) < shape_.micro_batch_size) {
    if (order_epoch_ != pos_.epoch) {
      order_ = dataset_.order(pos_.epoch);
      order_epoch_ = pos_.epoch;
    }
    BatchShape rest = shape_;
    rest.micro_batch_size = shape_.micro_batch_size - static_cast<int64_t>(rows.size());
    std::vector<std::vector<int64_t>> part;
    const int64_t end = plan_rows(dataset_.examples(), order_, pos_.index, rest, &part);
    QT_CHECK(end > pos_.index, ErrorKind::Internal, "BatchIterator: no progress (an empty data set?)");
    rows.insert(rows.end(), part.begin(), part.end());
    pos_ = end == dataset_.size() ? DataPosition{pos_.epoch + 1, 0} : DataPosition{pos_.epoch, end};
  }
  return build_batch(dataset_.examples(), rows, shape_, pad_id_);
}

std::pair<std::vector<Example>, std::vector<Example>> split_eval(std::vector<Example> examples, double fraction,
                                                                 uint64_t seed) {
  QT_CHECK(fraction >= 0.0 && fraction < 1.0, ErrorKind::Internal, "split_eval: fraction outside [0, 1)");
  const int64_t n = static_cast<int64_t>(examples.size());
  int64_t k = static_cast<int64_t>(std::llround(fraction * static_cast<double>(n)));
  if (fraction > 0.0) k = std::max<int64_t>(k, 1);
  k = std::min<int64_t>(k, n - 1);
  std::pair<std::vector<Example>, std::vector<Example>> out;
  if (k <= 0) {
    out.first = std::move(examples);
    return out;
  }
  std::mt19937_64 rng = make_rng(seed, kEvalStream, 0);
  const std::vector<int64_t> p = permutation(n, rng);
  std::vector<uint8_t> held(n, 0);
  for (int64_t i = 0; i < k; ++i) held[p[i]] = 1;
  for (int64_t i = 0; i < n; ++i) (held[i] ? out.second : out.first).push_back(std::move(examples[i]));
  return out;
}

}  // namespace qt
