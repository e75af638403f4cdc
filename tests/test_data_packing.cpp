// Tokenized documents -> micro-batches: packing against each document laid out alone (built by hand here),
// padding, truncation, deterministic epoch orders and resumable positions, the held-out split.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <set>
#include <vector>

#include "lib/data/dataset.h"
#include "lib/data/packing.h"
#include "lib/train/dpo.h"
#include "tests/catch.h"

namespace {

// Random documents: lengths in [1, max_len], ids in [0, 1000), about a third of the tokens masked.
std::vector<qt::Example> random_examples(int n, int max_len, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<qt::Example> out(n);
  for (int i = 0; i < n; ++i) {
    const int len = 1 + static_cast<int>(rng() % max_len);
    for (int k = 0; k < len; ++k) {
      out[i].ids.push_back(static_cast<int32_t>(rng() % 1000));
      out[i].loss.push_back(rng() % 3 != 0);
    }
    out[i].line = i + 1;
  }
  return out;
}

std::vector<int64_t> row_of(const at::Tensor& t, int64_t r) {
  at::Tensor x = t[r].to(at::kLong).contiguous();
  return std::vector<int64_t>(x.data_ptr<int64_t>(), x.data_ptr<int64_t>() + x.numel());
}

// Checks `batch` row by row against `rows` (example indices per row): each document's slice holds its ids,
// positions 0.., its index in the row, and targets = next id of the same document where that token is in the
// loss; the rest of the row is padding without targets. Returns the number of documents seen.
int64_t check_rows(const qt::Batch& batch, const std::vector<std::vector<int64_t>>& rows,
                   const std::vector<qt::Example>& examples, int64_t max_seq_len) {
  const int64_t B = batch.input_ids.size(0), S = batch.input_ids.size(1);
  REQUIRE(static_cast<int64_t>(rows.size()) <= B);
  int64_t docs = 0, targets = 0;
  for (int64_t r = 0; r < B; ++r) {
    const auto ids = row_of(batch.input_ids, r), tgt = row_of(batch.targets, r), pos = row_of(batch.positions, r),
               doc = row_of(batch.doc_ids, r);
    int64_t t = 0;
    if (r < static_cast<int64_t>(rows.size())) {
      for (size_t d = 0; d < rows[r].size(); ++d, ++docs) {
        const qt::Example& e = examples[rows[r][d]];
        const int64_t len = std::min<int64_t>(e.ids.size(), max_seq_len);
        INFO("row " << r << " document " << d << " (example " << rows[r][d] << ", " << len << " tokens)");
        REQUIRE(t + len <= S);
        for (int64_t k = 0; k < len; ++k, ++t) {
          CHECK(ids[t] == e.ids[k]);
          CHECK(pos[t] == k);
          CHECK(doc[t] == static_cast<int64_t>(d));
          const int64_t want = k + 1 < len && e.loss[k + 1] ? e.ids[k + 1] : -100;
          CHECK(tgt[t] == want);
          targets += want != -100;
        }
      }
    }
    for (; t < S; ++t) {
      CHECK(doc[t] == -1);
      CHECK(tgt[t] == -100);
      CHECK(pos[t] == 0);
    }
  }
  CHECK(batch.num_targets == targets);
  CHECK(batch.targets.ne(-100).sum().item<int64_t>() == targets);
  CHECK(batch.num_tokens == batch.doc_ids.ge(0).sum().item<int64_t>());  // input tokens: padding not counted
  return docs;
}

}  // namespace

TEST_CASE("packed rows hold each document exactly as it is alone", "[data]") {
  const int64_t max_seq_len = 32, micro = 3;
  const auto examples = random_examples(60, 28, 1);
  std::vector<int64_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(order.size() - 1 - i);
  const qt::BatchShape shape{micro, max_seq_len, true};
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> seen;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size());) {
    const int64_t end = qt::plan_rows(examples, order, i, shape, &rows);
    REQUIRE(end > i);
    const qt::Batch b = qt::build_batch(examples, rows, shape);
    CHECK(b.input_ids.sizes() == at::IntArrayRef({micro, max_seq_len}));
    CHECK(check_rows(b, rows, examples, max_seq_len) == end - i);
    for (size_t r = 0; r < rows.size(); ++r) {
      int64_t used = 0;
      for (int64_t e : rows[r]) used += examples[e].ids.size();
      CHECK(used <= max_seq_len);
      // Greedy: the next row's first document did not fit in this one.
      if (r + 1 < rows.size()) CHECK(used + static_cast<int64_t>(examples[rows[r + 1][0]].ids.size()) > max_seq_len);
      seen.insert(seen.end(), rows[r].begin(), rows[r].end());
    }
    i = end;
  }
  CHECK(seen == order);  // every document once, in order
  // make_batches is the same loop.
  const auto batches = qt::make_batches(examples, order, micro, max_seq_len, true);
  int64_t targets = 0;
  for (const auto& b : batches) targets += b.num_targets;
  int64_t expected = 0;
  for (const auto& e : examples)
    for (size_t k = 1; k < e.ids.size(); ++k) expected += e.loss[k];
  CHECK(targets == expected);
}

TEST_CASE("padding mode puts one document per row right-padded", "[data]") {
  const auto examples = random_examples(10, 20, 2);
  std::vector<int64_t> order = {3, 1, 4, 0, 5, 9, 2, 6, 8, 7};
  const qt::BatchShape shape{4, 64, false};
  std::vector<std::vector<int64_t>> rows;
  const int64_t end = qt::plan_rows(examples, order, 0, shape, &rows);
  CHECK(end == 4);
  REQUIRE(rows.size() == 4);
  size_t longest = 0;
  for (size_t r = 0; r < 4; ++r) {
    CHECK(rows[r] == std::vector<int64_t>{order[r]});
    longest = std::max(longest, examples[order[r]].ids.size());
  }
  const qt::Batch b = qt::build_batch(examples, rows, shape, /*pad_id=*/7);
  CHECK(b.input_ids.size(1) == static_cast<int64_t>(longest));
  check_rows(b, rows, examples, 64);
  CHECK((b.input_ids.eq(7) | b.doc_ids.ge(0)).all().item<bool>());
  // The last micro-batch of a pass has fewer documents; the missing rows are padding.
  const auto batches = qt::make_batches(examples, order, 4, 64, false);
  REQUIRE(batches.size() == 3);
  CHECK(batches[2].doc_ids[2].eq(-1).all().item<bool>());
  CHECK(batches[2].doc_ids[3].eq(-1).all().item<bool>());
}

TEST_CASE("documents longer than a row are truncated and counted", "[data]") {
  auto examples = random_examples(20, 40, 3);
  const int64_t max_seq_len = 16;
  int64_t longer = 0, cut = 0, tokens = 0;
  for (const auto& e : examples) {
    longer += static_cast<int64_t>(e.ids.size()) > max_seq_len;
    cut += std::max<int64_t>(0, static_cast<int64_t>(e.ids.size()) - max_seq_len);
    tokens += std::min<int64_t>(e.ids.size(), max_seq_len);
  }
  REQUIRE(longer > 0);
  const qt::Dataset ds(examples, max_seq_len, false, 0);
  CHECK(ds.stats().documents == 20);
  CHECK(ds.stats().truncated == longer);
  CHECK(ds.stats().truncated_tokens == cut);
  CHECK(ds.stats().tokens == tokens);
  CHECK(ds.stats().loss_tokens + ds.stats().masked_tokens == tokens);
  for (size_t i = 0; i < examples.size(); ++i) {
    const size_t keep = std::min<size_t>(examples[i].ids.size(), max_seq_len);
    CHECK(ds.examples()[i].ids == std::vector<int32_t>(examples[i].ids.begin(), examples[i].ids.begin() + keep));
    CHECK(ds.examples()[i].loss.size() == keep);
  }
  // Packed, a truncated document fills a row alone and its last kept token has no target.
  qt::BatchIterator it(ds, 2, true);
  while (it.position().epoch == 0) {
    const qt::Batch b = it.next();
    CHECK(b.targets.select(1, max_seq_len - 1).eq(-100).all().item<bool>());
  }
}

TEST_CASE("a preference pair is laid as its two sequences side by side, each as it is alone", "[data][dpo]") {
  const auto docs = random_examples(24, 12, 17);
  std::vector<qt::Example> pairs;
  for (size_t i = 0; i + 1 < docs.size(); i += 2) {
    qt::Example p = docs[i];
    p.second = static_cast<int64_t>(p.ids.size());
    p.ids.insert(p.ids.end(), docs[i + 1].ids.begin(), docs[i + 1].ids.end());
    p.loss.insert(p.loss.end(), docs[i + 1].loss.begin(), docs[i + 1].loss.end());
    pairs.push_back(p);
  }
  for (const bool packing : {true, false}) {
    const qt::BatchShape shape{3, 40, packing};
    std::vector<int64_t> order(pairs.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::vector<std::vector<int64_t>> rows;
    int64_t placed = 0, seen = 0;
    while (placed < static_cast<int64_t>(pairs.size())) {
      placed = qt::plan_rows(pairs, order, placed, shape, &rows);
      const qt::Batch b = qt::build_batch(pairs, rows, shape);
      // The same rows of the two sequences as single documents, built by the single-document path.
      std::vector<std::vector<int64_t>> single_rows;
      int64_t pairs_in = 0;
      for (const auto& row : rows) {
        single_rows.emplace_back();
        for (int64_t p : row) single_rows.back().insert(single_rows.back().end(), {2 * p, 2 * p + 1}), ++pairs_in;
      }
      // (packed layout at the pairs' row length: padding mode's rows hold one pair, two documents)
      const qt::Batch want = qt::build_batch(docs, single_rows, qt::BatchShape{3, b.input_ids.size(1), true});
      CHECK(b.num_pairs == pairs_in);
      CHECK(b.input_ids.equal(want.input_ids));
      CHECK(b.targets.equal(want.targets));
      CHECK(b.positions.equal(want.positions));
      CHECK(b.doc_ids.equal(want.doc_ids));
      CHECK(b.num_targets == want.num_targets);
      // Each token's sequence: the row's documents numbered on from the rows before, padding past the last.
      const at::Tensor seq = qt::pair_sequences(b).reshape(b.doc_ids.sizes());
      int64_t offset = 0;
      for (int64_t r = 0; r < b.doc_ids.size(0); ++r) {
        const at::Tensor d = b.doc_ids[r].to(at::kLong);
        const at::Tensor pad = d.lt(0);
        CHECK(seq[r].masked_select(pad).eq(2 * b.num_pairs).all().item<bool>());
        CHECK(seq[r].masked_select(pad.logical_not()).equal(d.masked_select(pad.logical_not()) + offset));
        offset += d.max().item<int64_t>() + 1;
      }
      CHECK(offset == 2 * b.num_pairs);
      seen += pairs_in;
    }
    CHECK(seen == static_cast<int64_t>(pairs.size()));
  }
}

TEST_CASE("a pair's sequences longer than max_len keep their first tokens, each on its own", "[data][dpo]") {
  auto make = [](int64_t chosen, int64_t rejected) {
    qt::Example e;
    for (int64_t i = 0; i < chosen + rejected; ++i) {
      e.ids.push_back(static_cast<int32_t>(i < chosen ? i : 1000 + i - chosen));
      e.loss.push_back(static_cast<uint8_t>(i % 2));
    }
    e.second = chosen;
    return e;
  };
  struct Case {
    int64_t chosen, rejected, max_len, want_chosen, want_rejected;
  };
  for (const Case c : {Case{10, 30, 16, 10, 16}, Case{30, 10, 16, 16, 10}, Case{30, 40, 16, 16, 16},
                       Case{20, 10, 32, 20, 10}, Case{17, 16, 16, 16, 16}}) {
    qt::Example e = make(c.chosen, c.rejected);
    const qt::Example before = e;
    CHECK(qt::pair_longer_than(e, c.max_len) == (c.chosen > c.max_len || c.rejected > c.max_len));
    qt::truncate_pair(e, c.max_len);
    CAPTURE(c.chosen, c.rejected, c.max_len);
    CHECK(!qt::pair_longer_than(e, c.max_len));
    CHECK(e.second == c.want_chosen);
    REQUIRE(static_cast<int64_t>(e.ids.size()) == c.want_chosen + c.want_rejected);
    for (int64_t i = 0; i < c.want_chosen; ++i) CHECK(e.ids[i] == before.ids[i]);
    for (int64_t i = 0; i < c.want_rejected; ++i) {
      CHECK(e.ids[c.want_chosen + i] == before.ids[c.chosen + i]);
      CHECK(e.loss[c.want_chosen + i] == before.loss[c.chosen + i]);
    }
  }
  // Through a Dataset (rows of 32: each sequence within 16), counted as truncated, both sequences kept.
  const qt::Dataset ds({make(30, 40)}, 32, false, 0);
  CHECK(ds.stats().truncated == 1);
  CHECK(ds.examples()[0].second == 16);
  CHECK(ds.examples()[0].ids.size() == 32);
}

TEST_CASE("epoch order is deterministic for a seed and differs for another", "[data]") {
  const auto examples = random_examples(50, 10, 4);
  const qt::Dataset a(examples, 64, true, 42), b(examples, 64, true, 42), c(examples, 64, true, 43);
  const auto o0 = a.order(0);
  CHECK(o0 == b.order(0));
  CHECK(a.order(5) == b.order(5));
  CHECK(o0 != c.order(0));
  CHECK(o0 != a.order(1));
  std::vector<int64_t> sorted = o0;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 50; ++i) CHECK(sorted[i] == i);
  const qt::Dataset plain(examples, 64, false, 42);
  for (int64_t i = 0; i < 50; ++i) CHECK(plain.order(3)[i] == i);
  CHECK(a.fingerprint() == b.fingerprint());
  auto changed = examples;
  changed[7].ids[0] ^= 1;
  CHECK(qt::Dataset(changed, 64, true, 42).fingerprint() != a.fingerprint());
}

TEST_CASE("resuming from a saved position yields the same remaining batches", "[data]") {
  const auto examples = random_examples(37, 24, 5);
  const qt::Dataset ds(examples, 32, true, 9);
  for (bool packing : {true, false}) {
    INFO("packing " << packing);
    qt::BatchIterator first(ds, 2, packing);
    for (int i = 0; i < 7; ++i) first.next();
    const qt::Json saved = first.position().to_json();
    std::vector<qt::Batch> rest;
    // Far enough to cross into later epochs.
    for (int i = 0; i < 40; ++i) rest.push_back(first.next());
    CHECK(first.position().epoch >= 2);
    qt::BatchIterator resumed(ds, 2, packing, qt::DataPosition::from_json(saved, "ckpt/state.json"));
    CHECK(resumed.position() == qt::DataPosition::from_json(saved, "ckpt/state.json"));
    for (size_t i = 0; i < rest.size(); ++i) {
      INFO("batch " << i);
      const qt::Batch b = resumed.next();
      REQUIRE(b.input_ids.sizes() == rest[i].input_ids.sizes());
      CHECK(b.input_ids.equal(rest[i].input_ids));
      CHECK(b.targets.equal(rest[i].targets));
      CHECK(b.positions.equal(rest[i].positions));
      CHECK(b.doc_ids.equal(rest[i].doc_ids));
      CHECK(b.num_targets == rest[i].num_targets);
    }
    CHECK(resumed.position() == first.position());
  }
}

TEST_CASE("the epochs are one stream: each visits every document once in its order, micro-batches full", "[data]") {
  const auto examples = random_examples(23, 30, 6);
  const qt::Dataset ds(examples, 32, true, 11);
  // The rows of two epochs, packed greedily epoch by epoch (a new row at each epoch's start).
  std::vector<std::vector<int64_t>> stream;
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    const auto order = ds.order(epoch);
    std::vector<std::vector<int64_t>> rows;
    CHECK(qt::plan_rows(ds.examples(), order, 0, {1000, 32, true}, &rows) == static_cast<int64_t>(order.size()));
    stream.insert(stream.end(), rows.begin(), rows.end());
  }
  // Cut into micro-batches of any size, the same rows in the same order, every micro-batch full (the one that
  // reaches an epoch's end continues into the next epoch).
  for (int64_t micro : {1, 3, 4}) {
    INFO("micro-batches of " << micro);
    qt::BatchIterator it(ds, micro, true);
    size_t at = 0;
    while (at + static_cast<size_t>(micro) <= stream.size()) {
      const qt::Batch b = it.next();
      const std::vector<std::vector<int64_t>> want(stream.begin() + at, stream.begin() + at + micro);
      check_rows(b, want, ds.examples(), 32);
      at += static_cast<size_t>(micro);
    }
  }
}

namespace {
// Documents of SFT-like lengths: log-normal around `median` tokens (sigma 0.8), at least 1.
std::vector<qt::Example> sft_like_examples(int n, double median, uint32_t seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<double> length(std::log(median), 0.8);
  std::vector<qt::Example> out(n);
  for (int i = 0; i < n; ++i) {
    const int len = std::max(1, static_cast<int>(std::lround(length(rng))));
    out[i].ids.assign(len, 7);
    out[i].loss.assign(len, 1);
    out[i].line = i + 1;
  }
  return out;
}

int64_t count_rows(const std::vector<qt::Example>& examples, const std::vector<int64_t>& order, int64_t row) {
  int64_t rows = 0;
  std::vector<std::vector<int64_t>> planned;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++rows) i = qt::plan_rows(examples, order, i, {1, row, true}, &planned);
  return rows;
}

// Best-fit decreasing's groups by brute force: each document, longest first, into the fitting group of least room.
int64_t bfd_groups(const std::vector<int64_t>& lengths, int64_t row) {
  std::vector<int64_t> sorted = lengths, room;
  std::stable_sort(sorted.begin(), sorted.end(), std::greater<int64_t>());
  for (int64_t l : sorted) {
    int64_t best = -1;
    for (size_t g = 0; g < room.size(); ++g)
      if (room[g] >= l && (best < 0 || room[g] < room[static_cast<size_t>(best)])) best = static_cast<int64_t>(g);
    if (best < 0) room.push_back(row - l);
    else room[static_cast<size_t>(best)] -= l;
  }
  return static_cast<int64_t>(room.size());
}
}  // namespace

TEST_CASE("best-fit packing: best-fit decreasing's rows per window, documents moved only within theirs", "[data]") {
  for (const int64_t row : {2048, 8192}) {
    INFO("rows of " << row);
    const auto examples = sft_like_examples(5000, 330, 12);
    const qt::Dataset in_order(examples, row, true, 3), best_fit(examples, row, true, 3, /*best_fit=*/true);
    const auto base = in_order.order(0), order = best_fit.order(0);
    CHECK(best_fit.best_fit());
    // A permutation of the shuffled order in which each document stays within its window of 1,000.
    REQUIRE(order.size() == base.size());
    for (size_t w = 0; w < base.size(); w += qt::kBestFitWindow) {
      const size_t end = std::min(base.size(), w + static_cast<size_t>(qt::kBestFitWindow));
      CHECK(std::multiset<int64_t>(base.begin() + w, base.begin() + end) ==
            std::multiset<int64_t>(order.begin() + w, order.begin() + end));
    }
    // Rows: next-fit over the new order makes no more than best-fit decreasing's groups of each window.
    int64_t groups = 0, tokens = 0;
    for (size_t w = 0; w < base.size(); w += qt::kBestFitWindow) {
      std::vector<int64_t> lengths;
      for (size_t i = w; i < std::min(base.size(), w + static_cast<size_t>(qt::kBestFitWindow)); ++i)
        lengths.push_back(std::min<int64_t>(examples[base[i]].ids.size(), row));
      groups += bfd_groups(lengths, row);
    }
    for (const auto& e : examples) tokens += std::min<int64_t>(e.ids.size(), row);
    const int64_t rows = count_rows(examples, order, row), rows_in_order = count_rows(examples, base, row);
    const double waste = 1.0 - static_cast<double>(tokens) / static_cast<double>(rows * row);
    const double waste_in_order = 1.0 - static_cast<double>(tokens) / static_cast<double>(rows_in_order * row);
    INFO(rows << " rows (" << waste << " padding) against " << rows_in_order << " in order (" << waste_in_order
              << "), best-fit decreasing's groups " << groups);
    CHECK(rows <= groups);
    CHECK(waste < 0.02);
    CHECK(waste_in_order > 0.03);
    // Deterministic, and the epochs differ as their shuffles do.
    CHECK(order == qt::Dataset(examples, row, true, 3, true).order(0));
    CHECK(order != best_fit.order(1));
  }
  // Where no two documents fit a row, nothing moves; a window's documents of equal lengths keep their order.
  std::vector<qt::Example> big = random_examples(40, 10, 9);
  for (auto& e : big) e.ids.resize(17, 1), e.loss.resize(17, 1);
  std::vector<int64_t> order(40);
  for (int64_t i = 0; i < 40; ++i) order[i] = (i * 7) % 40;
  CHECK(qt::best_fit_order(big, order, 32) == order);
  for (auto& e : big) e.ids.resize(8, 1), e.loss.resize(8, 1);
  CHECK(qt::best_fit_order(big, order, 32) == order);
}

TEST_CASE("eval split holds out a seeded fraction in file order", "[data]") {
  const auto examples = random_examples(40, 5, 7);
  auto [train, eval] = qt::split_eval(examples, 0.25, 3);
  CHECK(eval.size() == 10);
  CHECK(train.size() == 30);
  std::set<int64_t> lines;
  for (const auto* part : {&train, &eval}) {
    for (size_t i = 0; i < part->size(); ++i) {
      lines.insert((*part)[i].line);
      if (i > 0) CHECK((*part)[i - 1].line < (*part)[i].line);
      CHECK((*part)[i].ids == examples[(*part)[i].line - 1].ids);
    }
  }
  CHECK(lines.size() == 40);
  auto again = qt::split_eval(examples, 0.25, 3);
  auto other = qt::split_eval(examples, 0.25, 4);
  auto lines_of = [](const std::vector<qt::Example>& v) {
    std::vector<int64_t> l;
    for (const auto& e : v) l.push_back(e.line);
    return l;
  };
  CHECK(lines_of(again.second) == lines_of(eval));
  CHECK(lines_of(other.second) != lines_of(eval));
  CHECK(qt::split_eval(examples, 0.0, 3).second.empty());
  CHECK(qt::split_eval(examples, 0.001, 3).second.size() == 1);  // a fraction > 0 holds out at least one
}

TEST_CASE("split_pairs cuts KTO's pairs into the records and their KL sequences, each as laid alone", "[data][dpo]") {
  std::vector<qt::Example> singles = random_examples(11, 40, 17);
  for (size_t i = 0; i < singles.size(); ++i) {
    std::fill(singles[i].loss.begin(), singles[i].loss.begin() + singles[i].ids.size() / 3, uint8_t{0});
    singles[i].loss.back() = 1;  // (a completion of at least one token)
    singles[i].label = static_cast<int8_t>(i % 3 == 0);
  }
  const std::vector<qt::Example> pairs = qt::kto_pairs(singles, 4, /*kl=*/true);
  std::vector<qt::Example> firsts, seconds;
  for (const qt::Example& e : pairs) {
    const auto cut = [&](size_t from, size_t to) {
      qt::Example x;
      x.ids.assign(e.ids.begin() + from, e.ids.begin() + to);
      x.loss.assign(e.loss.begin() + from, e.loss.begin() + to);
      return x;
    };
    firsts.push_back(cut(0, e.second));
    seconds.push_back(cut(e.second, e.ids.size()));
  }
  // Packed rows of 3, 4 and 2 pairs (the fourth row all padding), and one pair a row.
  for (const bool packing : {true, false}) {
    const std::vector<std::vector<int64_t>> rows =
        packing ? std::vector<std::vector<int64_t>>{{0, 1, 2}, {3, 4, 5, 6}, {7, 8}}
                : std::vector<std::vector<int64_t>>{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}};
    const qt::Batch b = qt::build_batch(pairs, rows, qt::BatchShape{packing ? 4 : 11, 512, packing}, 7);
    const qt::PairHalves h = qt::split_pairs(b);
    INFO((packing ? "packed" : "one pair a row"));
    check_rows(h.first, rows, firsts, 512);
    check_rows(h.second, rows, seconds, 512);
    for (const qt::Batch* x : {&h.first, &h.second}) {
      CHECK(x->num_pairs == b.num_pairs);
      CHECK(at::equal(x->pair_labels, b.pair_labels));
      const int64_t longest = x->doc_ids.ge(0).sum(1).max().item<int64_t>();
      CHECK(x->input_ids.size(1) >= longest);
      CHECK(x->input_ids.size(1) <= std::max<int64_t>(b.input_ids.size(1) / 2, longest));
    }
    CHECK(h.first.num_targets + h.second.num_targets == b.num_targets);
    // Each sequence's log-probability from either half, in pair_sequences' numbering, is the whole batch's.
    const at::Tensor losses = at::rand({b.input_ids.numel()}, at::kDouble) * b.targets.reshape({-1}).ne(-100);
    const at::Tensor whole = qt::sequence_logps(losses, qt::pair_sequences(b), b.num_pairs);
    const auto moved = [&](const qt::Batch& x) {  // each token's loss where split_pairs put the token
      at::Tensor out = at::zeros({x.input_ids.numel()}, at::kDouble);
      const at::Tensor docs = b.doc_ids.reshape({-1});
      int64_t done = 0;
      for (int64_t r = 0; r < b.input_ids.size(0); ++r) {
        int64_t k = 0;
        for (int64_t t = 0; t < b.input_ids.size(1); ++t) {
          const int64_t d = docs[r * b.input_ids.size(1) + t].item<int64_t>();
          if (d >= 0 && (d % 2 == 0) == (&x == &h.first))
            out[r * x.input_ids.size(1) + k++] = losses[r * b.input_ids.size(1) + t];
        }
        done += k;
      }
      CHECK(done == x.num_tokens);
      return out;
    };
    const at::Tensor split = qt::sequence_logps(moved(h.first), h.first_sequences, b.num_pairs) +
                             qt::sequence_logps(moved(h.second), h.second_sequences, b.num_pairs);
    CHECK(at::allclose(split, whole, 1e-6, 1e-6));
    CHECK(whole.abs().sum().item<double>() > 0);
  }
}

TEST_CASE("KTO's pairs are packed with each half of a row within half a row", "[data][dpo]") {
  std::vector<qt::Example> singles = random_examples(200, 60, 23);
  for (size_t i = 0; i < singles.size(); ++i) {
    std::fill(singles[i].loss.begin(), singles[i].loss.begin() + singles[i].ids.size() / 4, uint8_t{0});
    singles[i].loss.back() = 1;
    singles[i].label = static_cast<int8_t>(i % 2);
  }
  std::vector<qt::Example> pairs = qt::kto_pairs(singles, 5, /*kl=*/true);
  for (qt::Example& e : pairs) qt::truncate_pair(e, 64);  // (as Dataset cuts each sequence to data.max_seq_len)
  std::vector<int64_t> order(pairs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  // Rows of 128 tokens (each sequence within 64): the first halves and the second halves each within 64.
  int64_t pairs_seen = 0, fuller = 0;
  for (const qt::Batch& b : qt::make_batches(pairs, order, 4, 128, /*packing=*/true)) {
    const qt::PairHalves h = qt::split_pairs(b);
    for (const qt::Batch* x : {&h.first, &h.second}) {
      CHECK(x->doc_ids.ge(0).sum(1).max().item<int64_t>() <= 64);
      CHECK(x->input_ids.size(1) == 64);
    }
    fuller += b.doc_ids.ge(0).sum(1).max().item<int64_t>() > 64;
    pairs_seen += b.num_pairs;
  }
  CHECK(pairs_seen == static_cast<int64_t>(pairs.size()));
  CHECK(fuller > 0);  // (rows of more than half a row: packing still fills them)
}
