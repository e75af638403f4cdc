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
  int64_t line = 0;    // line of the jsonl record it came from (0: none)
  int32_t source = 0;  // which of data.train_file's files (DataConfig::train_files) it came from
};

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
