#include "lib/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>

#include "lib/core/error.h"

namespace qt {

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path)
    : path_(model_path), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  auto status = sp_->Load(model_path);
  if (!status.ok()) fail_at(ErrorKind::Model, model_path, "not a valid sentencepiece model: " + status.ToString());
  for (int id = 0; id < sp_->GetPieceSize(); ++id)
    if (sp_->IsControl(id) && !sp_->IdToPiece(id).empty()) controls_.emplace_back(sp_->IdToPiece(id), id);
  std::stable_sort(controls_.begin(), controls_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(std::string(text), &ids);
  if (!status.ok()) fail_at(ErrorKind::Internal, path_, "sentencepiece encode failed: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
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
