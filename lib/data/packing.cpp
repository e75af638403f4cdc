#include "lib/data/packing.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>

#include "lib/core/error.h"

namespace qt {

int64_t plan_rows(const std::vector<Example>& examples, const std::vector<int64_t>& order, int64_t begin,
                  const BatchShape& shape, std::vector<std::vector<int64_t>>* rows) {
  QT_CHECK(shape.micro_batch_size > 0 && shape.max_seq_len > 0, ErrorKind::Internal, "plan_rows: empty shape");
  rows->clear();
  int64_t i = begin, used = 0;
  int64_t used_half[2] = {0, 0};  // KTO's pairs: each half's tokens in the row (split_pairs cuts the row in them)
  const int64_t n = static_cast<int64_t>(order.size()), half = shape.max_seq_len / 2;
  while (i < n) {
    const int64_t e = order[i];
    QT_CHECK(e >= 0 && e < static_cast<int64_t>(examples.size()), ErrorKind::Internal, "plan_rows: index out of range");
    const Example& x = examples[e];
    const int64_t len = std::min<int64_t>(static_cast<int64_t>(x.ids.size()), shape.max_seq_len);
    // A KTO pair (a record and its KL sequence) also keeps each half of the row within half a row: the passes over
    // the records and over the KL sequences each take rows of at most half a row, as the plan counts them.
    const bool halves = x.label >= 0 && x.second > 0;
    const int64_t first = halves ? std::min(x.second, len) : 0, second = halves ? len - first : 0;
    const bool fits = !rows->empty() && shape.packing && used + len <= shape.max_seq_len &&
                      (!halves || (used_half[0] + first <= half && used_half[1] + second <= half));
    if (!fits) {
      if (static_cast<int64_t>(rows->size()) == shape.micro_batch_size) break;
      rows->emplace_back();
      used = used_half[0] = used_half[1] = 0;
    }
    rows->back().push_back(e);
    used += len;
    used_half[0] += first;
    used_half[1] += second;
    ++i;
  }
  return i;
}

std::vector<int64_t> best_fit_order(const std::vector<Example>& examples, const std::vector<int64_t>& order,
                                    int64_t max_seq_len, int64_t window) {
  QT_CHECK(max_seq_len > 0 && window > 0, ErrorKind::Internal, "best_fit_order: empty rows or windows");
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int64_t> out;
  out.reserve(order.size());
  std::vector<int64_t> by_length, len;
  std::vector<std::vector<int64_t>> groups;  // positions in `order`
  for (int64_t w0 = 0; w0 < n; w0 += window) {
    const int64_t w1 = std::min(n, w0 + window);
    len.assign(static_cast<size_t>(w1 - w0), 0);
    by_length.clear();
    for (int64_t p = w0; p < w1; ++p) {
      const int64_t e = order[static_cast<size_t>(p)];
      QT_CHECK(e >= 0 && e < static_cast<int64_t>(examples.size()), ErrorKind::Internal,
               "best_fit_order: index out of range");
      len[static_cast<size_t>(p - w0)] =
          std::min<int64_t>(static_cast<int64_t>(examples[static_cast<size_t>(e)].ids.size()), max_seq_len);
      by_length.push_back(p);
    }
    std::stable_sort(by_length.begin(), by_length.end(), [&](int64_t a, int64_t b) {
      return len[static_cast<size_t>(a - w0)] > len[static_cast<size_t>(b - w0)];
    });
    groups.clear();
    std::multimap<int64_t, size_t> room;  // room left -> group (the earliest made first among equals)
    for (int64_t p : by_length) {
      const int64_t l = len[static_cast<size_t>(p - w0)];
      auto it = room.lower_bound(l);
      size_t g;
      int64_t left;
      if (it == room.end()) {
        g = groups.size();
        groups.emplace_back();
        left = max_seq_len - l;
      } else {
        g = it->second;
        left = it->first - l;
        room.erase(it);
      }
      groups[g].push_back(p);
      room.emplace(left, g);
    }
    for (auto& grp : groups) std::sort(grp.begin(), grp.end());
    std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.front() < b.front(); });
    for (const auto& grp : groups)
      for (int64_t p : grp) out.push_back(order[static_cast<size_t>(p)]);
  }
  return out;
}

Batch build_batch(const std::vector<Example>& examples, const std::vector<std::vector<int64_t>>& rows,
                  const BatchShape& shape, int32_t pad_id) {
  const int64_t B = shape.micro_batch_size;
  QT_CHECK(static_cast<int64_t>(rows.size()) <= B, ErrorKind::Internal, "build_batch: more rows than the batch");
  int64_t S = shape.max_seq_len;
  if (!shape.packing) {
    S = 1;
    for (const auto& row : rows)
      for (int64_t e : row) S = std::max<int64_t>(S, std::min<int64_t>(examples[e].ids.size(), shape.max_seq_len));
  }
  at::Tensor input_ids = at::full({B, S}, pad_id, at::kLong);
  at::Tensor targets = at::full({B, S}, -100, at::kLong);
  at::Tensor positions = at::zeros({B, S}, at::kLong);
  at::Tensor doc_ids = at::full({B, S}, -1, at::kInt);
  auto ids_a = input_ids.accessor<int64_t, 2>();
  auto tgt_a = targets.accessor<int64_t, 2>();
  auto pos_a = positions.accessor<int64_t, 2>();
  auto doc_a = doc_ids.accessor<int32_t, 2>();
  int64_t num_targets = 0, num_tokens = 0;
  int64_t num_pairs = 0;
  std::vector<float> labels;  // KTO's (Example::label)
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t t = 0;
    int32_t d = 0;  // document index in the row: a pair's two sequences are two documents
    for (size_t i = 0; i < rows[r].size(); ++i) {
      const Example& ex = examples[rows[r][i]];
      const int64_t len = std::min<int64_t>(static_cast<int64_t>(ex.ids.size()), S);
      QT_CHECK(t + len <= S, ErrorKind::Internal, "build_batch: row overflows the sequence length");
      QT_CHECK(ex.second <= 0 || static_cast<int64_t>(ex.ids.size()) <= S, ErrorKind::Internal,
               "build_batch: a preference pair longer than its row (truncate_pair first)");
      num_tokens += len;
      num_pairs += ex.second > 0;
      if (ex.second > 0 && ex.label >= 0) labels.push_back(static_cast<float>(ex.label));
      int64_t start = 0;  // where the current sequence starts
      for (int64_t k = 0; k < len; ++k, ++t) {
        if (ex.second > 0 && k == ex.second) start = k, ++d;
        const int64_t end = ex.second > 0 && k < ex.second ? ex.second : len;
        ids_a[r][t] = ex.ids[k];
        pos_a[r][t] = k - start;
        doc_a[r][t] = d;
        if (k + 1 < end && ex.loss[k + 1]) {
          tgt_a[r][t] = ex.ids[k + 1];
          ++num_targets;
        }
      }
      ++d;
    }
  }
  Batch b;
  b.input_ids = input_ids;
  b.targets = targets;
  b.positions = positions;
  b.doc_ids = doc_ids;
  b.num_targets = num_targets;
  b.num_tokens = num_tokens;
  b.num_pairs = num_pairs;
  if (!labels.empty()) {
    QT_CHECK(static_cast<int64_t>(labels.size()) == num_pairs, ErrorKind::Internal,
             "build_batch: KTO's labelled records among pairs without a label");
    b.pair_labels = at::tensor(labels, at::kFloat);
  }
  return b;
}

std::vector<Batch> make_batches(const std::vector<Example>& examples, const std::vector<int64_t>& order,
                                int64_t micro_batch_size, int64_t max_seq_len, bool packing) {
  const BatchShape shape{micro_batch_size, max_seq_len, packing};
  std::vector<Batch> out;
  std::vector<std::vector<int64_t>> rows;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size());) {
    i = plan_rows(examples, order, i, shape, &rows);
    out.push_back(build_batch(examples, rows, shape));
  }
  return out;
}

}  // namespace qt
