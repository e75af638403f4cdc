#pragma once
// Tokenized documents -> qt::Batch rows, packed or padded.
//   packing: documents are laid greedily, in order, into rows of max_seq_len tokens; a document that does not
//            fit in what is left of a row starts the next row (documents are never split; Dataset truncates
//            those longer than a row). Positions restart at 0 and doc_ids count 0, 1, ... per document. The order
//            is the epoch's, reordered by best_fit_order under data.packing_strategy "best_fit" (Dataset::order).
//   padding: one document per row, right-padded to the longest document of the micro-batch.
// targets[t] = ids[t + 1] of the same document where that token is in the loss, else -100 (prompt tokens, each
// document's last token, padding). Padding has doc_id -1, position 0, input id `pad_id`.
#include <cstdint>
#include <vector>

#include "lib/core/batch.h"
#include "lib/data/example.h"

namespace qt {

struct BatchShape {
  int64_t micro_batch_size = 1;  // rows
  int64_t max_seq_len = 2048;    // tokens per row
  bool packing = true;
};

// Assigns examples order[begin], order[begin + 1], ... to at most shape.micro_batch_size rows and returns the
// index into `order` of the first example not placed. `rows` receives one list of example indices per
// non-empty row.
int64_t plan_rows(const std::vector<Example>& examples, const std::vector<int64_t>& order, int64_t begin,
                  const BatchShape& shape, std::vector<std::vector<int64_t>>* rows);

// The micro-batch of `rows` ([micro_batch_size, S]: rows beyond rows.size() are all padding). S is max_seq_len
// when packing, else the longest document (at most max_seq_len). Documents longer than max_seq_len keep their
// first max_seq_len tokens.
Batch build_batch(const std::vector<Example>& examples, const std::vector<std::vector<int64_t>>& rows,
                  const BatchShape& shape, int32_t pad_id = 0);

// data.packing_strategy "best_fit": `order` reordered window by window (each kBestFitWindow consecutive documents)
// so that plan_rows' next-fit packs them as best-fit decreasing does: in each window the documents, longest first
// (ties in order), each go to the group of least room left that holds it (a new group where none does); the groups
// follow one another in the order of their first document, each group's documents in their order. Next-fit over
// groups that each fit a row makes at most as many rows as there are groups (a row that starts in a group takes the
// rest of it), so rows are never more than best-fit's; where no two documents fit one row the order is unchanged.
// A document moves only within its window. Lengths are counted up to max_seq_len (a longer document is truncated).
inline constexpr int64_t kBestFitWindow = 1000;
std::vector<int64_t> best_fit_order(const std::vector<Example>& examples, const std::vector<int64_t>& order,
                                    int64_t max_seq_len, int64_t window = kBestFitWindow);

// Every micro-batch of one pass over `order`.
std::vector<Batch> make_batches(const std::vector<Example>& examples, const std::vector<int64_t>& order,
                                int64_t micro_batch_size, int64_t max_seq_len, bool packing);

}  // namespace qt
