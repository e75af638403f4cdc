#include "lib/train/train_data.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/data/packing.h"
#include "lib/data/records.h"

namespace qt {

TrainData::TrainData(const Json& section, const std::string& file, const Tokenizer& tokenizer, int64_t micro,
                     const KtoSection* kto)
    : config_(DataConfig::from_json(section, file)), micro_(micro) {
  config_.unpair = kto != nullptr;
  pad_id_ = tokenizer.eos_id() >= 0 ? tokenizer.eos_id() : 0;  // padding carries no target; any id will do
  std::vector<Example> train;
  for (size_t i = 0; i < config_.train_files.size(); ++i) {
    std::vector<Example> part = load_examples(config_.train_files[i], config_, tokenizer);
    for (Example& e : part) {
      e.source = static_cast<int32_t>(i);
      train.push_back(std::move(e));
    }
  }
  if (!config_.eval_file.empty()) {
    eval_ = load_examples(config_.eval_file, config_, tokenizer);
  } else if (config_.eval_fraction > 0) {
    auto [t, e] = split_eval(std::move(train), config_.eval_fraction, config_.seed);
    train = std::move(t);
    eval_ = std::move(e);
    if (eval_.empty())
      log::warn_rank0("data.eval_fraction " + std::to_string(config_.eval_fraction) + " of " + config_.train_file +
                      "'s " + std::to_string(train.size()) + " records holds none out: no held-out evaluation");
  }
  // KTO: every record unpaired (labelled), each made a pair with its KL sequence after the records left without a
  // target are left out (TRL drops the records whose prompt fills max_length before it rotates the completions).
  // Labelled records are KTO's alone.
  for (const auto* set : {&train, &eval_})
    for (const Example& e : *set)
      if ((e.label >= 0) != (kto != nullptr))
        fail_key(ErrorKind::Data, config_.file, "data.format",
                 kto ? config_.train_file + " line " + std::to_string(e.line) + ": train.objective \"kto\" trains on "
                           "unpaired records {prompt, completion, label} or preference pairs {prompt, chosen, rejected}"
                     : config_.train_file + " line " + std::to_string(e.line) + " is an unpaired preference record "
                           "{prompt, completion, label}: set train.objective to \"kto\" to train on such records, or "
                           "data.format to \"completion\" to train on their completions");
  if (kto) {
    untrained_left_out_ = leave_out_untrained(train, config_.train_file, /*training=*/true, /*from_train_files=*/true);
    if (!eval_.empty())
      leave_out_untrained(eval_, config_.eval_file.empty() ? config_.train_file : config_.eval_file,
                          /*training=*/false, /*from_train_files=*/config_.eval_file.empty());
    const int64_t group = kto->group(micro);
    train = kto_pairs(std::move(train), group, kto->kl());
    eval_ = kto_pairs(std::move(eval_), group, kto->kl());
  }
  // Preference pairs (DPO, KTO's): data.max_seq_len bounds each of a pair's sequences, as TRL's max_length, and a row
  // holds two of them. A file holds pairs or none.
  size_t pair_count = 0, all = train.size() + eval_.size();
  for (const auto* set : {&train, &eval_})
    for (const Example& e : *set) pair_count += e.second > 0;
  pairs_ = pair_count > 0;
  if (pairs_ && pair_count < all)
    fail_key(ErrorKind::Data, config_.file, "data.format",
             std::to_string(pair_count) + " of the " + std::to_string(all) + " training and held-out records are " +
                 "preference pairs {prompt, chosen, rejected}, the others are not: a run trains on pairs (DPO) or on "
                 "none");
  row_len_ = pairs_ ? 2 * config_.max_seq_len : config_.max_seq_len;
  if (pairs_)
    for (Example& e : eval_) truncate_pair(e, config_.max_seq_len);
  // Text documents end with EOS (data.add_eos) so that the model learns to stop; a tokenizer without one cannot.
  if (config_.add_eos && tokenizer.eos_id() < 0 &&
      (config_.format == RecordFormat::Text || config_.format == RecordFormat::Auto))
    log::warn_rank0("data.add_eos: the tokenizer has no EOS token, so the text documents of " + config_.train_file +
                    " train without one (the model will not learn where a document ends)");
  apply_truncation(train);
  untrained_left_out_ += leave_out_untrained(train, config_.train_file, /*training=*/true, /*from_train_files=*/true);
  if (!eval_.empty()) {
    const std::string& source = config_.eval_file.empty() ? config_.train_file : config_.eval_file;
    leave_out_untrained(eval_, source, /*training=*/false, /*from_train_files=*/config_.eval_file.empty());
    if (eval_.empty() && !config_.eval_file.empty())
      fail_key(ErrorKind::Data, config_.file, "data.eval_file",
               "none of the records of " + config_.eval_file + " holds a target token within data.max_seq_len = " +
                   std::to_string(config_.max_seq_len) + " (every token masked, or the answers start after the cut): "
                   "its loss would be over no token");
    if (eval_.empty())
      log::warn_rank0("data.eval_fraction: none of the held-out records holds a target token: no held-out evaluation");
  }
  train_ = std::make_unique<Dataset>(std::move(train), row_len_, config_.shuffle, config_.seed,
                                     packs_best_fit(config_, pairs_ || kto != nullptr));
  check_has_targets();
  log::info("data: " + train_->stats().summary() + (eval_.empty() ? "" : "; " + std::to_string(eval_.size()) + " held-out documents"));
  epoch_rows_ = count_epoch_rows();
  if (config_.packing) {
    // What packing leaves as padding in the first epoch's rows (the steps an epoch follow from the rows).
    const int64_t rows = epoch_rows_;
    int64_t tokens = 0;
    for (const Example& e : train_->examples())
      tokens += std::min<int64_t>(static_cast<int64_t>(e.ids.size()), row_len_);
    char padding[32];
    std::snprintf(padding, sizeof padding, "%.1f%%",
                  100.0 * (1.0 - static_cast<double>(tokens) / static_cast<double>(rows * row_len_)));
    log::info("packing (" + std::string(train_->best_fit() ? "best fit" : "in order") + "): " + std::to_string(rows) +
              " rows of " + std::to_string(row_len_) + " tokens an epoch, " + padding + " of their tokens padding");
  }
  seek({});
}

namespace {

// Tokens of a document that are next-token targets once batched: in the loss, and not its first token.
int64_t targets_in(const std::vector<uint8_t>& loss, size_t end) {
  int64_t n = 0;
  for (size_t i = 1; i < std::min(end, loss.size()); ++i) n += loss[i];
  return n;
}

// "lines 3, 7, 9 and 12 more" of a file's records; of several files' (data.train_file a list), "lines a.jsonl:3,
// b.jsonl:7, ...".
std::string some_lines(const std::vector<std::string>& lines) {
  std::string out = lines.size() == 1 ? "line " : "lines ";
  for (size_t i = 0; i < std::min<size_t>(lines.size(), 5); ++i) out += (i ? ", " : "") + lines[i];
  if (lines.size() > 5) out += " and " + std::to_string(lines.size() - 5) + " more";
  return out;
}

}  // namespace

// Records with no target token within a row (chat records without an answer, labels all -100, answers the cut at
// data.max_seq_len removes) add nothing to the loss: they are left out, with a warning naming them, so that no batch
// is made of them alone (a step would have nothing to train on). Where no record has a target nothing is left out:
// check_has_targets says why (training) or the caller does (held-out).
std::string TrainData::where(const Example& e, bool from_train_files) const {
  if (!from_train_files || config_.train_files.size() < 2) return std::to_string(e.line);
  return config_.train_files[static_cast<size_t>(e.source)] + ":" + std::to_string(e.line);
}

int64_t TrainData::leave_out_untrained(std::vector<Example>& examples, const std::string& source, bool training,
                                       bool from_train_files) const {
  const auto len = static_cast<size_t>(config_.max_seq_len);
  // (a pair: either sequence without a target once cut to data.max_seq_len, as Dataset cuts it)
  const auto untrained = [&](const Example& e) {
    if (e.second <= 0) return targets_in(e.loss, len) == 0;
    Example cut = e;
    truncate_pair(cut, config_.max_seq_len);
    return fewest_targets(cut) == 0;
  };
  std::vector<std::string> lines;
  for (const auto& e : examples)
    if (untrained(e)) lines.push_back(where(e, from_train_files));
  if (lines.empty() || (training && lines.size() == examples.size())) return 0;
  const size_t before = examples.size();
  examples.erase(std::remove_if(examples.begin(), examples.end(), untrained), examples.end());
  log::warn_rank0(source + ": " + std::to_string(lines.size()) + " of " + std::to_string(before) + " " +
                  (training ? "training" : "held-out") + " records (" + some_lines(lines) + ") hold no target token within data.max_seq_len = " +
                  std::to_string(config_.max_seq_len) + ": left out (they add nothing to the loss)");
  return static_cast<int64_t>(lines.size());
}

void TrainData::apply_truncation(std::vector<Example>& train) const {
  const auto len = static_cast<size_t>(config_.max_seq_len);
  std::vector<std::string> long_lines, emptied_lines;  // longer than a row; of those, left with no target by the cut
  int64_t long_tokens = 0;
  // A pair is longer than a row where either of its sequences is longer than data.max_seq_len.
  const auto too_long = [&](const Example& e) {
    return e.second > 0 ? pair_longer_than(e, config_.max_seq_len) : e.ids.size() > len;
  };
  for (const auto& e : train) {
    if (!too_long(e)) continue;
    long_lines.push_back(where(e, true));
    if (e.second > 0) {
      Example cut = e;
      truncate_pair(cut, config_.max_seq_len);
      long_tokens += static_cast<int64_t>(e.ids.size() - cut.ids.size());
      if (fewest_targets(cut) == 0 && fewest_targets(e) > 0) emptied_lines.push_back(where(e, true));
      continue;
    }
    long_tokens += static_cast<int64_t>(e.ids.size() - len);
    if (targets_in(e.loss, len) == 0 && targets_in(e.loss, e.loss.size()) > 0) emptied_lines.push_back(where(e, true));
  }
  if (long_lines.empty()) return;
  const std::string what = std::to_string(long_lines.size()) + " of " + std::to_string(train.size()) + " records of " +
                           config_.train_file + " (" + some_lines(long_lines) + ") are longer than data.max_seq_len = " +
                           std::to_string(config_.max_seq_len) + " tokens" + (pairs_ ? " (a pair: either sequence)" : "");
  switch (config_.truncation) {
    case Truncation::Error:
      fail_key(ErrorKind::Data, config_.file, "data.truncation",
               "\"error\": " + what + "; raise data.max_seq_len, or set data.truncation to \"truncate\" or \"drop\"");
    case Truncation::Drop:
      train.erase(std::remove_if(train.begin(), train.end(), too_long), train.end());
      if (train.empty())
        fail_key(ErrorKind::Data, config_.file, "data.truncation",
                 "\"drop\" leaves no training record: every one of " + config_.train_file + "'s " +
                     std::to_string(long_lines.size()) + " records is longer than data.max_seq_len = " +
                     std::to_string(config_.max_seq_len) + " tokens; raise data.max_seq_len, or set data.truncation " +
                     "to \"truncate\"");
      log::info("data.truncation \"drop\": " + what + ", left out (" + std::to_string(train.size()) + " remain)");
      return;
    case Truncation::Truncate:
      if (!emptied_lines.empty())
        log::warn_rank0("data.truncation \"truncate\": " + std::to_string(emptied_lines.size()) + " records (" +
                  some_lines(emptied_lines) + ") lose every target token to the cut at data.max_seq_len = " +
                  std::to_string(config_.max_seq_len) + " (their answers start after it)");
      return;
  }
}

void TrainData::check_has_targets() const {
  for (const auto& e : train_->examples())
    if (e.second > 0 ? fewest_targets(e) > 0 : targets_in(e.loss, e.loss.size()) > 0) return;
  std::vector<std::string> lines;  // (every record: none has a target)
  for (const auto& e : train_->examples()) lines.push_back(where(e, true));
  if (train_->stats().truncated == 0)  // nothing was cut: the records themselves hold no target
    fail_key(ErrorKind::Data, config_.file, "data.train_file",
             "the " + std::to_string(train_->size()) + " training records of " + config_.train_file + " (" +
                 some_lines(lines) + ") hold no target token to train on (" + train_->stats().summary() +
                 "): every token is masked (tokenized records whose labels are all -100, chat records without an "
                 "assistant answer, or answers rendered empty), or the records are one token long (a token is a "
                 "target only after another)" +
                 (config_.train_on_prompt ? "" : "; data.train_on_prompt trains on the prompts too"));
  fail_key(ErrorKind::Data, config_.file, "data.max_seq_len",
           "the " + std::to_string(train_->size()) + " training records of " + config_.train_file + " (" +
               some_lines(lines) + ") leave no target token to train on with data.max_seq_len = " + std::to_string(config_.max_seq_len) +
               " and data.truncation \"" + truncation_name(config_.truncation) + "\" (" +
               train_->stats().summary() + "); raise data.max_seq_len" +
               (config_.train_on_prompt ? "" : ", or set data.train_on_prompt"));
}

void TrainData::write_eval_records(const std::string& path) const {
  if (eval_.empty()) return;
  // The held-out share's records come from data.train_file's files (e.source), data.eval_file's from it alone.
  const std::vector<std::string> sources =
      config_.eval_file.empty() ? config_.train_files : std::vector<std::string>{config_.eval_file};
  struct Text {
    std::string bytes;
    std::vector<std::pair<size_t, size_t>> lines;  // [begin, end) of each line, '\n' excluded
  };
  std::vector<std::optional<Text>> texts(sources.size());
  std::string out;
  for (const auto& e : eval_) {
    const auto i = config_.eval_file.empty() ? static_cast<size_t>(e.source) : size_t{0};
    if (!texts[i]) {
      Text t{files::read_file(sources[i]), {}};
      for (size_t begin = 0; begin < t.bytes.size();) {
        size_t end = t.bytes.find('\n', begin);
        if (end == std::string::npos) end = t.bytes.size();
        t.lines.emplace_back(begin, end);
        begin = end + 1;
      }
      texts[i] = std::move(t);
    }
    const Text& t = *texts[i];
    QT_CHECK(e.line >= 1 && e.line <= static_cast<int64_t>(t.lines.size()), ErrorKind::Data,
             sources[i] + ": changed while the run read it (line " + std::to_string(e.line) + " is gone)");
    const auto [begin, end] = t.lines[static_cast<size_t>(e.line - 1)];
    const std::string line = t.bytes.substr(begin, end - begin);
    Json pair;
    if (e.label >= 0) pair = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (pair.is_object() && pair.contains("chosen") && pair.contains("rejected")) {  // (KTO: TRL's unpaired form)
      pair["completion"] = pair.at(e.label ? "chosen" : "rejected");
      pair["label"] = e.label == 1;
      pair.erase("chosen");
      pair.erase("rejected");
      out += pair.dump();
    } else {
      out += line;
    }
    out += '\n';
  }
  files::write_file_atomically(path, out);
}

double TrainData::attention_span() const {
  double tokens = 0, squares = 0;
  for (const Example& e : train_->examples()) {
    // (a pair's two sequences attend apart)
    const int64_t n_all = std::min<int64_t>(static_cast<int64_t>(e.ids.size()), row_len_);
    for (const int64_t part : e.second > 0 ? std::vector<int64_t>{e.second, n_all - e.second} : std::vector<int64_t>{n_all}) {
      const double n = static_cast<double>(part);
      tokens += n;
      squares += n * n;
    }
  }
  return tokens > 0 ? squares / tokens : static_cast<double>(row_len_);
}

std::pair<int64_t, std::string> TrainData::max_token_id() const {
  int64_t best = -1;
  std::string where;
  // file: the examples' one file, or "" for data.train_file's (each example's own).
  auto scan = [&](const std::vector<Example>& examples, const std::string& file) {
    for (const Example& e : examples)
      for (int32_t id : e.ids)
        if (id > best) {
          best = id;
          const std::string& f = file.empty() ? config_.train_files[static_cast<size_t>(e.source)] : file;
          where = f + (e.line > 0 ? ":" + std::to_string(e.line) : std::string());
        }
  };
  scan(train_->examples(), "");
  scan(eval_, config_.eval_file.empty() ? "" : config_.eval_file);
  return {best, where};
}

bool TrainData::varlen_rows() const {
  for (const Example& e : train_->examples())
    if (static_cast<int64_t>(e.ids.size()) < row_len_ || e.second > 0) return true;  // packed with others, padded
  return false;
}

void TrainData::seek(const DataPosition& position) {
  iterator_ = std::make_unique<BatchIterator>(*train_, micro_, config_.packing, position, pad_id_);
}

int64_t TrainData::count_epoch_rows() const {
  const std::vector<int64_t> order = train_->order(0);
  const BatchShape shape{1, row_len_, config_.packing};
  int64_t rows = 0;
  std::vector<std::vector<int64_t>> planned;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++rows) {
    planned.clear();
    i = plan_rows(train_->examples(), order, i, shape, &planned);
  }
  return rows;
}

int64_t TrainData::steps_per_epoch(int64_t batch_size) const {
  return std::max<int64_t>(1, (epoch_rows_ + batch_size - 1) / batch_size);
}

std::vector<Batch> TrainData::eval_batches(int rank, int world) const {
  std::vector<Batch> mine;
  if (eval_.empty()) return mine;
  std::vector<int64_t> order(eval_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  // Held-out documents longer than a row keep their first max_seq_len tokens, as in training.
  std::vector<Batch> all = make_batches(eval_, order, micro_, row_len_, config_.packing);
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
