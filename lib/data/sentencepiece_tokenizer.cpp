#include "lib/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>

#include "lib/core/error.h"
#include "lib/core/files.h"

namespace qt {

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path)
    : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  // sentencepiece reads a directory through a stream that throws (an internal error, not a model error).
  if (files::is_dir(model_path))
    fail_at(ErrorKind::Model, model_path, "is a directory, not a sentencepiece model file");
  auto status = sp_->Load(model_path);
  if (!status.ok()) fail_at(ErrorKind::Model, model_path, "not a valid sentencepiece model: " + status.ToString());
  // The control pieces (<s>, </s>) and the unknown piece (<unk>): transformers' Llama tokenizers hold all three as
  // special added tokens, so their text in a chat or prompt becomes their id.
  for (int id = 0; id < sp_->GetPieceSize(); ++id)
    if ((sp_->IsControl(id) || sp_->IsUnknown(id)) && !sp_->IdToPiece(id).empty())
      controls_.emplace_back(sp_->IdToPiece(id), id);
  std::stable_sort(controls_.begin(), controls_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

namespace {

// Text longer than this is encoded in pieces cut at single spaces (see encode).
constexpr size_t kChunkBytes = 64 * 1024;
// How far past kChunkBytes a cut is looked for before the rest is encoded whole.
constexpr size_t kCutSearchBytes = 16 * 1024;

bool plain_ascii(char c) { return c > 0x20 && c < 0x7f; }

}  // namespace

std::vector<int32_t> SentencePieceTokenizer::encode_whole(std::string_view text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(std::string(text), &ids);
  if (!status.ok()) fail_at(ErrorKind::Internal, path_, "sentencepiece encode failed: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

// sentencepiece's Encode builds a protobuf record of every piece (its surface, piece string and offsets: about 250
// bytes of memory per input byte) and took time growing faster than the text (9 MB: 11 s), so one record of tens
// of MB took gigabytes. Long text is encoded in pieces instead, cut at a single space between two printable ASCII
// characters, the space left out: the piece after it gets the dummy prefix that space would have become. A cut is
// taken only where the two words around it encode to the same ids together and apart (no piece of the vocabulary
// spans that word start, the normalizer leaves it alone); with no such cut the rest is encoded whole. Text within
// kChunkBytes is encoded whole, as before.
std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  if (text.size() <= kChunkBytes + kCutSearchBytes) return encode_whole(text);
  std::vector<int32_t> out;
  size_t start = 0;
  while (text.size() - start > kChunkBytes + kCutSearchBytes) {
    size_t cut = std::string_view::npos;
    const size_t last = start + kChunkBytes + kCutSearchBytes;
    for (size_t i = start + kChunkBytes; i < last && cut == std::string_view::npos; ++i) {
      if (text[i] != ' ' || !plain_ascii(text[i - 1]) || !plain_ascii(text[i + 1])) continue;
      // The words on either side of the space.
      size_t a = i;
      while (a > start && plain_ascii(text[a - 1]) && i - a < 256) --a;
      size_t b = i + 1;
      while (b < text.size() && plain_ascii(text[b]) && b - i < 256) ++b;
      if (a == start || b == text.size() || i - a >= 256 || b - i >= 256) continue;
      const std::string_view left = text.substr(a, i - a), right = text.substr(i + 1, b - i - 1);
      std::vector<int32_t> apart = encode_whole(left);
      const std::vector<int32_t> r = encode_whole(right);
      apart.insert(apart.end(), r.begin(), r.end());
      if (encode_whole(text.substr(a, b - a)) == apart) cut = i;
    }
    if (cut == std::string_view::npos) break;
    const std::vector<int32_t> ids = encode_whole(text.substr(start, cut - start));
    out.insert(out.end(), ids.begin(), ids.end());
    start = cut + 1;
  }
  const std::vector<int32_t> ids = encode_whole(text.substr(start));
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::vector<int32_t> SentencePieceTokenizer::encode_with_special(std::string_view text) const {
  std::vector<int32_t> out;
  size_t start = 0;
  for (size_t pos = 0; pos < text.size();) {
    auto hit = std::find_if(controls_.begin(), controls_.end(),
                            [&](const auto& c) { return text.compare(pos, c.first.size(), c.first) == 0; });
    if (hit == controls_.end()) {
      ++pos;
      continue;
    }
    if (pos > start) {
      auto ids = encode(text.substr(start, pos - start));
      out.insert(out.end(), ids.begin(), ids.end());
    }
    out.push_back(hit->second);
    pos += hit->first.size();
    start = pos;
  }
  if (start < text.size()) {
    auto ids = encode(text.substr(start));
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<int> in;
  in.reserve(ids.size());
  for (int32_t id : ids)
    if (id >= 0 && id < vocab_size()) in.push_back(id);
  std::string text;
  auto status = sp_->Decode(in, &text);
  if (!status.ok()) fail_at(ErrorKind::Internal, path_, "sentencepiece decode failed: " + status.ToString());
  return text;
}

int32_t SentencePieceTokenizer::vocab_size() const { return sp_->GetPieceSize(); }

int32_t SentencePieceTokenizer::token_to_id(std::string_view token) const {
  // PieceToId answers unk_id for an unknown piece: tell that apart from the unk piece itself.
  int id = sp_->PieceToId(std::string(token));
  return id >= 0 && sp_->IdToPiece(id) == token ? id : -1;
}

std::string SentencePieceTokenizer::id_to_token(int32_t id) const {
  return id >= 0 && id < vocab_size() ? sp_->IdToPiece(id) : std::string();
}

TokenizerDefaults SentencePieceTokenizer::defaults() const {
  // The model's trainer_spec names bos/eos (-1 when disabled). transformers' LlamaTokenizer defaults to
  // add_bos_token=True, add_eos_token=False; the same here when tokenizer_config.json is silent.
  TokenizerDefaults d;
  d.bos_id = sp_->bos_id();
  d.eos_id = sp_->eos_id();
  d.add_bos = d.bos_id >= 0;
  d.add_eos = false;
  return d;
}

}  // namespace qt
