#include "lib/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>

#include "lib/core/error.h"
#include "lib/core/files.h"

namespace qt {

namespace {

uint64_t read_varint(const std::string& bytes, size_t& pos, const std::string& path) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= bytes.size()) break;
    const auto b = static_cast<uint8_t>(bytes[pos++]);
    v |= uint64_t{b & 0x7fu} << shift;
    if (!(b & 0x80)) return v;
  }
  fail_at(ErrorKind::Model, path, "not a valid sentencepiece model: a truncated or overlong varint in its protobuf");
}

void write_varint(std::string& out, uint64_t v) {
  for (; v >= 0x80; v >>= 7) out.push_back(static_cast<char>((v & 0x7f) | 0x80));
  out.push_back(static_cast<char>(v));
}

// The serialized ModelProto (sentencepiece_model.proto) with normalizer_spec.add_dummy_prefix false: field 3 of
// the normalizer_spec (field 3) appended as 0, protobuf's last value read winning. self_test_data (field 4) is
// left out: its samples were encoded with the prefix, and loading checks them.
std::string without_dummy_prefix(const std::string& proto, const std::string& path) {
  constexpr uint64_t kNormalizerSpec = 3, kSelfTestData = 4;
  const std::string no_prefix("\x18\x00", 2);  // field 3 (add_dummy_prefix), varint 0
  std::string out;
  bool normalizer = false;
  for (size_t pos = 0; pos < proto.size();) {
    const size_t start = pos;
    const uint64_t key = read_varint(proto, pos, path);
    const uint64_t field = key >> 3, wire = key & 7;
    size_t body = pos, end = pos;
    if (wire == 0) {
      read_varint(proto, pos, path);
      end = pos;
    } else if (wire == 1 || wire == 5) {
      end = pos + (wire == 1 ? 8 : 4);
    } else if (wire == 2) {
      const uint64_t n = read_varint(proto, pos, path);
      body = pos;
      end = n <= proto.size() - pos ? pos + n : proto.size() + 1;
    } else {
      fail_at(ErrorKind::Model, path, "not a valid sentencepiece model: protobuf wire type " + std::to_string(wire));
    }
    if (end > proto.size()) fail_at(ErrorKind::Model, path, "not a valid sentencepiece model: a truncated field");
    if (field == kNormalizerSpec && wire == 2) {
      const std::string spec = proto.substr(body, end - body) + no_prefix;
      write_varint(out, key);
      write_varint(out, spec.size());
      out += spec;
      normalizer = true;
    } else if (field != kSelfTestData) {
      out.append(proto, start, end - start);
    }
    pos = end;
  }
  if (!normalizer) {
    write_varint(out, kNormalizerSpec << 3 | 2);
    write_varint(out, no_prefix.size());
    out += no_prefix;
  }
  return out;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path, DummyPrefix prefix)
    : path_(model_path), prefix_(prefix), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
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
  if (prefix_ != DummyPrefix::Always) {  // (a model whose own spec has no dummy prefix gets none either way)
    bare_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
    status = bare_->LoadFromSerializedProto(without_dummy_prefix(sp_->serialized_model_proto(), model_path));
    if (!status.ok())
      fail_at(ErrorKind::Model, model_path,
              "not a valid sentencepiece model without its dummy prefix: " + status.ToString());
  }
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

namespace {

// Text longer than this is encoded in pieces cut at single spaces (see encode).
constexpr size_t kChunkBytes = 64 * 1024;
// How far past kChunkBytes a cut is looked for before the rest is encoded whole.
constexpr size_t kCutSearchBytes = 16 * 1024;

bool plain_ascii(char c) { return c > 0x20 && c < 0x7f; }

}  // namespace

std::vector<int32_t> SentencePieceTokenizer::encode_whole(std::string_view text, bool prefixed) const {
  std::vector<int> ids;
  auto status = (prefixed || !bare_ ? sp_ : bare_)->Encode(std::string(text), &ids);
  if (!status.ok()) fail_at(ErrorKind::Internal, path_, "sentencepiece encode failed: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

// sentencepiece's Encode builds a protobuf record of every piece (its surface, piece string and offsets: about 250
// bytes of memory per input byte) and took time growing faster than the text (9 MB: 11 s), so one record of tens
// of MB took gigabytes. Long text is encoded in pieces instead, cut at a single space between two printable ASCII
// characters, the space left out: the piece after it gets the dummy prefix that space would have become. A cut is
// taken only where the two words around it encode to the same ids together and apart (no piece of the vocabulary
// spans that word start, the normalizer leaves it alone); with no such cut the rest is encoded whole. Text within
// kChunkBytes is encoded whole, as before. `prefixed`: the first piece gets the dummy prefix.
std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  return encode_text(text, prefixes(text, true));
}

bool SentencePieceTokenizer::prefixes(std::string_view run, bool at_start) const {
  // Metaspace replaces the spaces by "▁" first and prefixes a run that does not start with one.
  const bool space = !run.empty() && (run[0] == ' ' || run.substr(0, 3) == "\xe2\x96\x81");
  switch (prefix_) {
    case DummyPrefix::Always:
      return true;
    case DummyPrefix::MetaspaceAlways:
      return !space;
    case DummyPrefix::First:
      return at_start && !space;
    case DummyPrefix::Never:
      return false;
  }
  return true;
}

std::vector<int32_t> SentencePieceTokenizer::encode_text(std::string_view text, bool prefixed) const {
  if (text.size() <= kChunkBytes + kCutSearchBytes) return encode_whole(text, prefixed);
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
    const std::vector<int32_t> ids = encode_whole(text.substr(start, cut - start), prefixed || start > 0);
    out.insert(out.end(), ids.begin(), ids.end());
    start = cut + 1;
  }
  const std::vector<int32_t> ids = encode_whole(text.substr(start), prefixed || start > 0);
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::vector<int32_t> SentencePieceTokenizer::encode_with_special(std::string_view text) const {
  return encode_segments(text, true);
}

std::vector<int32_t> SentencePieceTokenizer::encode_after_special(std::string_view text) const {
  return encode_segments(text, false);
}

std::vector<int32_t> SentencePieceTokenizer::encode_segments(std::string_view text, bool at_start) const {
  std::vector<int32_t> out;
  const auto segment = [&](size_t from, size_t to) {
    const std::string_view run = text.substr(from, to - from);
    const std::vector<int32_t> ids = encode_text(run, prefixes(run, at_start && from == 0));
    out.insert(out.end(), ids.begin(), ids.end());
  };
  size_t start = 0;
  for (size_t pos = 0; pos < text.size();) {
    auto hit = std::find_if(controls_.begin(), controls_.end(),
                            [&](const auto& c) { return text.compare(pos, c.first.size(), c.first) == 0; });
    if (hit == controls_.end()) {
      ++pos;
      continue;
    }
    if (pos > start) segment(start, pos);
    out.push_back(hit->second);
    pos += hit->first.size();
    start = pos;
  }
  if (start < text.size()) segment(start, text.size());
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

bool SentencePieceTokenizer::dropped_by_decode(int32_t id) const {
  return id >= 0 && id < vocab_size() && sp_->IsControl(id);
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
