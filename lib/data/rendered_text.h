#pragma once
// Tokenizing text assembled from pieces (a chat template's output, an Alpaca prompt plus answer) the way
// transformers does it: the whole text is tokenized at once, special-token strings becoming their ids, and
// each token is in the loss or not according to the piece its first character comes from.
#include <string>
#include <vector>

#include "lib/data/example.h"
#include "lib/data/tokenizer.h"

namespace qt {

struct RenderPiece {
  std::string text;      // plain text (special-token strings in it become their ids, as in transformers)
  int32_t special = -1;  // >= 0: this piece is that special token (text unused)
  bool loss = false;     // tokens of this piece are in the loss
  // A special token the tokenizer adds around the text (a document's BOS, as its post-processor adds it), not
  // one written in it (a chat template's bos_token): the text after it still starts the input.
  bool outside_text = false;
};

// ids equal tokenizer.encode_with_special(concatenation of the pieces' texts, special pieces as their text).
// Special tokens split text before the model sees it (tokenizers' added-token extraction; sentencepiece
// Llama's per-segment encoding), so each run of text between two special pieces is tokenized alone. Inside a
// run, a token belongs to a piece from the first token on which the run's ids and the ids of the run's text
// up to the piece's start differ: a token that straddles a boundary goes to the later piece. A run after a special
// piece written in the text is encoded as such (Tokenizer::encode_after_special).
Example tokenize_rendered(const std::vector<RenderPiece>& pieces, const Tokenizer& tokenizer);

}  // namespace qt
