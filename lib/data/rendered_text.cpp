#include "lib/data/rendered_text.h"

#include <algorithm>

namespace qt {

namespace {

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = std::min(a.size(), b.size()), i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

// Appends the tokens of one run of text pieces [first, last) to `out`; `input_start`: the run starts the input.
void tokenize_run(const std::vector<RenderPiece>& pieces, size_t first, size_t last, const Tokenizer& tok,
                  bool input_start, Example& out) {
  const auto encode = [&](std::string_view text) {
    return input_start ? tok.encode_with_special(text) : tok.encode_after_special(text);
  };
  std::string text;
  std::vector<size_t> starts;  // char offset of each piece
  for (size_t p = first; p < last; ++p) {
    starts.push_back(text.size());
    text += pieces[p].text;
  }
  if (text.empty()) return;
  const std::vector<int32_t> ids = encode(text);
  // First token of each piece (non-decreasing); a token goes to the last piece whose first token is at or
  // before it. Only a change of loss needs the prefix tokenized.
  std::vector<size_t> first_token(last - first, 0);
  for (size_t i = 1; i < first_token.size(); ++i) {
    if (starts[i] == text.size()) {
      first_token[i] = ids.size();
    } else if (pieces[first + i].loss == pieces[first + i - 1].loss) {
      first_token[i] = first_token[i - 1];
    } else {
      const std::vector<int32_t> prefix = encode(std::string_view(text).substr(0, starts[i]));
      first_token[i] = std::max(first_token[i - 1], common_prefix(prefix, ids));
    }
  }
  size_t p = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    while (p + 1 < first_token.size() && first_token[p + 1] <= t) ++p;
    out.ids.push_back(ids[t]);
    out.loss.push_back(pieces[first + p].loss ? 1 : 0);
  }
}

}  // namespace

Example tokenize_rendered(const std::vector<RenderPiece>& pieces, const Tokenizer& tokenizer) {
  Example out;
  size_t run = 0;
  bool input_start = true;  // nothing of the text before
  for (size_t p = 0; p <= pieces.size(); ++p) {
    if (p < pieces.size() && pieces[p].special < 0) continue;
    tokenize_run(pieces, run, p, tokenizer, input_start, out);
    for (size_t q = run; q < p; ++q) input_start = input_start && pieces[q].text.empty();
    if (p < pieces.size()) {
      input_start = input_start && pieces[p].outside_text;
      out.ids.push_back(pieces[p].special);
      out.loss.push_back(pieces[p].loss ? 1 : 0);
    }
    run = p + 1;
  }
  return out;
}

}  // namespace qt
