#include "lib/data/bpe_tokenizer.h"

#include <algorithm>
#include <queue>

#include "lib/core/error.h"
#include "lib/core/json.h"
#include "lib/data/unicode_nfc.h"
#include "lib/data/unicode_tables.h"
#include "lib/data/unicode_text.h"

namespace qt {
namespace {

// GPT-2's bytes_to_unicode (openai/gpt-2 src/encoder.py): printable Latin-1 bytes map to themselves, the other
// 68 bytes to U+0100.. in byte order, so that every byte is a visible character in vocab strings ("Ġ" = space).
std::array<char32_t, 256> bytes_to_unicode() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

// Case-insensitive match of the contraction group "(?i:'s|'t|'re|'ve|'m|'ll|'d)". Oniguruma's case folding
// (which tokenizers uses) also folds U+017F LATIN SMALL LETTER LONG S to 's' (Unicode CaseFolding.txt), so "'ſ"
// is a contraction there; the other letters of the group have no non-ASCII folds.
char32_t fold_contraction_char(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c - 'A' + 'a';
  if (c == 0x17F) return 's';
  return c;
}

const Json* find_member(const Json& object, const char* key) {
  if (!object.is_object()) return nullptr;
  auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

std::string type_of(const Json& object) {
  const Json* type = find_member(object, "type");
  return type && type->is_string() ? type->get<std::string>() : "";
}

// The start of the run of white space that ends at `end`, not before `floor`.
size_t white_space_start(std::string_view text, size_t floor, size_t end) {
  while (end > floor) {
    size_t b = end - 1;
    while (b > floor && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
    size_t len = 0;
    const char32_t c = unicode::decode_utf8(text, b, &len);
    if (b + len != end || !unicode::is_white_space(c)) break;
    end = b;
  }
  return end;
}

// The end of the run of white space that starts at `begin`.
size_t white_space_end(std::string_view text, size_t begin) {
  while (begin < text.size()) {
    size_t len = 0;
    if (!unicode::is_white_space(unicode::decode_utf8(text, begin, &len))) break;
    begin += len;
  }
  return begin;
}

// The codepoints of `text` and the byte offset of each, plus the text's end.
void decode_codepoints(std::string_view text, std::vector<char32_t>& cp, std::vector<size_t>& off) {
  cp.reserve(text.size());
  off.reserve(text.size() + 1);
  for (size_t pos = 0; pos < text.size();) {
    size_t len;
    cp.push_back(unicode::decode_utf8(text, pos, &len));
    off.push_back(pos);
    pos += len;
  }
  off.push_back(text.size());
}

}  // namespace

std::vector<std::string_view> llama3_pre_tokenize(std::string_view text, int max_digits) {
  using namespace unicode;
  std::vector<char32_t> cp;
  std::vector<size_t> off;
  decode_codepoints(text, cp, off);
  const size_t n = cp.size();
  auto L = [&](size_t i) { return i < n && is_letter(cp[i]); };
  auto N = [&](size_t i) { return i < n && is_number(cp[i]); };
  auto S = [&](size_t i) { return i < n && is_white_space(cp[i]); };
  auto CRLF = [&](size_t i) { return i < n && (cp[i] == '\r' || cp[i] == '\n'); };
  auto other = [&](size_t i) { return i < n && !S(i) && !L(i) && !N(i); };  // [^\s\p{L}\p{N}]

  // The end of the match at i of the pattern's alternatives, tried in order (leftmost-first, as Oniguruma
  // does); each alternative's backtracking is resolved by hand in the comment next to it.
  auto match_at = [&](size_t i) -> size_t {
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (cp[i] == '\'' && i + 1 < n) {
      char32_t c1 = fold_contraction_char(cp[i + 1]);
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
      if (i + 2 < n) {
        char32_t c2 = fold_contraction_char(cp[i + 2]);
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
      }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+ : the optional char is taken only if a letter follows it.
    if (L(i) || (!CRLF(i) && !N(i) && L(i + 1))) {
      size_t j = i + 1;
      while (L(j)) ++j;
      return j;
    }
    // \p{N}{1,3} (Qwen2: \p{N})
    if (N(i)) {
      size_t j = i + 1;
      while (j < i + static_cast<size_t>(max_digits) && N(j)) ++j;
      return j;
    }
    // " ?[^\s\p{L}\p{N}]+[\r\n]*" (only U+0020 is the optional space)
    {
      size_t s = (cp[i] == ' ' && other(i + 1)) ? i + 1 : i;
      if (other(s)) {
        size_t j = s + 1;
        while (other(j)) ++j;
        while (CRLF(j)) ++j;
        return j;
      }
    }
    // Here cp[i] is white space. Let [i, e) be the whole run of white space.
    size_t e = i;
    while (S(e)) ++e;
    // \s*[\r\n]+ : \s* backs off until [\r\n]+ can match, i.e. the match ends just after the run's last CR/LF.
    for (size_t k = e; k > i; --k) {
      if (CRLF(k - 1)) return k;
    }
    // \s+(?!\S) : the whole run at the end of the text, else the run less its last char (which precedes \S).
    if (e == n) return e;
    if (e - i >= 2) return e - 1;
    // \s+
    return std::max(e, i + 1);
  };

  std::vector<std::string_view> pieces;
  for (size_t i = 0; i < n;) {
    size_t end = match_at(i);
    pieces.push_back(text.substr(off[i], off[end] - off[i]));
    i = end;
  }
  return pieces;
}

std::vector<std::string_view> gpt2_pre_tokenize(std::string_view text, bool individual_digits) {
  using namespace unicode;
  std::vector<char32_t> cp;
  std::vector<size_t> off;
  decode_codepoints(text, cp, off);
  const size_t n = cp.size();
  std::vector<std::string_view> pieces;
  for (size_t begin = 0; begin < n;) {
    // The regex runs on [begin, end): up to the next digit where digits are split off alone.
    size_t end = begin;
    if (individual_digits && is_number(cp[begin])) {
      end = begin + 1;
    } else {
      while (end < n && !(individual_digits && is_number(cp[end]))) ++end;
    }
    auto L = [&](size_t i) { return i < end && is_letter(cp[i]); };
    auto N = [&](size_t i) { return i < end && is_number(cp[i]); };
    auto S = [&](size_t i) { return i < end && is_white_space(cp[i]); };
    auto other = [&](size_t i) { return i < end && !S(i) && !L(i) && !N(i); };  // [^\s\p{L}\p{N}]
    // The end of the match at i of the alternatives, tried in order (leftmost-first).
    auto match_at = [&](size_t i) -> size_t {
      // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
      if (cp[i] == '\'' && i + 1 < end) {
        const char32_t c1 = cp[i + 1];
        if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return i + 2;
        if (i + 2 < end) {
          const char32_t c2 = cp[i + 2];
          if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return i + 3;
        }
      }
      // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": the space only where a run of the class follows it.
      for (int k = 0; k < 3; ++k) {
        const auto in_class = [&](size_t j) { return k == 0 ? L(j) : k == 1 ? N(j) : other(j); };
        const size_t s = (cp[i] == ' ' && in_class(i + 1)) ? i + 1 : i;
        if (in_class(s)) {
          size_t j = s + 1;
          while (in_class(j)) ++j;
          return j;
        }
      }
      // Here cp[i] is white space; [i, e) the run. \s+(?!\S): the run at the end, else less its last char;
      // \s+: one char.
      size_t e = i;
      while (S(e)) ++e;
      if (e == end) return e;
      if (e - i >= 2) return e - 1;
      return std::max(e, i + 1);
    };
    for (size_t i = begin; i < end;) {
      const size_t j = match_at(i);
      pieces.push_back(text.substr(off[i], off[j] - off[i]));
      i = j;
    }
    begin = end;
  }
  return pieces;
}

bool is_byte_level_tokenizer_json(const Json& doc) {
  const Json* pre = find_member(doc, "pre_tokenizer");
  if (!pre) return false;
  if (type_of(*pre) == "ByteLevel") return true;
  if (type_of(*pre) == "Sequence") {
    if (const Json* list = find_member(*pre, "pretokenizers"); list && list->is_array()) {
      for (const auto& p : *list)
        if (type_of(p) == "ByteLevel") return true;
    }
  }
  return false;
}

BpeTokenizer::BpeTokenizer(const Json& doc, const std::string& path) {
  auto fail = [&](const std::string& key, const std::string& msg) { fail_key(ErrorKind::Model, path, key, msg); };
  if (!doc.is_object()) fail_at(ErrorKind::Model, path, "expected a JSON object at the top level");
  const Json* model = find_member(doc, "model");
  if (!model || !model->is_object()) fail("model", "missing (expected an object with type \"BPE\")");
  // tokenizer.json written by tokenizers < 0.9 has no model.type; merges identify BPE there.
  if (type_of(*model) != "BPE" && !(type_of(*model).empty() && find_member(*model, "merges")))
    fail("model.type", "expected \"BPE\" (a Llama 3 style byte-level BPE), got " +
                           (find_member(*model, "type") ? model->at("type").dump() : std::string("none")));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const Json* v = find_member(*model, key); v && !(v->is_string() && v->get<std::string>().empty()))
      fail(std::string("model.") + key, "is not supported for byte-level BPE (got " + v->dump() + ")");
  }
  if (const Json* v = find_member(*model, "dropout"); v && v->is_number() && v->get<double>() > 0)
    fail("model.dropout", "BPE dropout is a training-time augmentation; expected null");
  if (const Json* v = find_member(*model, "ignore_merges")) {
    if (!v->is_boolean()) fail("model.ignore_merges", "expected true or false, got " + v->dump());
    ignore_merges_ = v->get<bool>();
  }

  // Normalizer: none (Llama 3) or NFC (Qwen2 / 2.5 / 3).
  if (const Json* n = find_member(doc, "normalizer")) {
    if (type_of(*n) != "NFC")
      fail("normalizer", "expected null (Llama 3) or {\"type\": \"NFC\"} (Qwen2), got " + n->dump().substr(0, 80));
    nfc_ = true;
  }
  // Pre-tokenization: Llama 3's layout (Split with its regex or Qwen2's, then ByteLevel without regex).
  const Json& pre = doc.at("pre_tokenizer");
  std::vector<const Json*> steps;
  if (type_of(pre) == "Sequence") {
    for (const auto& p : pre.at("pretokenizers")) steps.push_back(&p);
  } else {
    steps.push_back(&pre);
  }
  bool layout_ok = steps.size() == 2 && type_of(*steps[0]) == "Split" && type_of(*steps[1]) == "ByteLevel";
  // GPT-2's: ByteLevel with its own regex, alone or after Digits(individual_digits) (SmolLM2's).
  const bool digits = steps.size() == 2 && type_of(*steps[0]) == "Digits";
  const bool byte_level_regex = type_of(*steps.back()) == "ByteLevel" && steps.back()->value("use_regex", true);
  if ((steps.size() == 1 || digits) && byte_level_regex) {
    if (digits && !steps[0]->value("individual_digits", false))
      fail("pre_tokenizer.pretokenizers[0].individual_digits",
           "only Digits with individual_digits true (each digit alone) is implemented");
    if (steps.back()->value("add_prefix_space", false))
      fail(type_of(pre) != "Sequence" ? "pre_tokenizer.add_prefix_space"
                                      : "pre_tokenizer.pretokenizers[" + std::to_string(steps.size() - 1) +
                                            "].add_prefix_space",
           "ByteLevel with add_prefix_space true is not implemented (expected false, as SmolLM2's and GPT-2's)");
    gpt2_ = true;
    gpt2_digits_ = digits;
  } else if (layout_ok) {
    const Json& split = *steps[0];
    const Json* pattern = find_member(split, "pattern");
    const Json* regex = pattern ? find_member(*pattern, "Regex") : nullptr;
    if (regex && regex->is_string() && regex->get<std::string>() == k_qwen2_pattern) max_digits_ = 1;
    else if (!regex || !regex->is_string() || regex->get<std::string>() != k_llama3_pattern)
      fail("pre_tokenizer.pretokenizers[0].pattern",
           "only Llama 3's and Qwen2's pre-tokenization regexes are implemented, got " +
               (pattern ? pattern->dump() : "none"));
    if (split.value("behavior", "") != "Isolated" || split.value("invert", false))
      fail("pre_tokenizer.pretokenizers[0]", "expected behavior \"Isolated\" and invert false, as in Llama 3");
    const Json& bl = *steps[1];
    if (bl.value("use_regex", true) || bl.value("add_prefix_space", false))
      fail("pre_tokenizer.pretokenizers[1]", "expected ByteLevel with use_regex false and add_prefix_space false");
  } else {
    fail("pre_tokenizer", "only Llama 3's layout (Sequence[Split(Llama 3's or Qwen2's regex), ByteLevel]) and "
                          "GPT-2's (ByteLevel with its regex, after Digits) are implemented; got " +
                              pre.dump().substr(0, 120));
  }

  // Vocabulary and merges.
  const Json* vocab = find_member(*model, "vocab");
  if (!vocab || !vocab->is_object()) fail("model.vocab", "missing (expected an object token -> id)");
  int32_t max_id = -1;
  vocab_.reserve(vocab->size());
  for (const auto& item : vocab->items()) {
    if (!item.value().is_number_integer() || item.value().get<int64_t>() < 0 ||
        item.value().get<int64_t>() > INT32_MAX)
      fail("model.vocab." + item.key(), "expected a non-negative 32-bit integer id, got " + item.value().dump());
    int32_t id = item.value().get<int32_t>();
    vocab_.emplace(item.key(), id);
    max_id = std::max(max_id, id);
  }
  const Json* added = find_member(doc, "added_tokens");
  if (added) {
    for (const auto& t : *added) {
      if (!t.is_object() || !t.contains("id") || !t.contains("content") || !t["id"].is_number_integer() ||
          !t["content"].is_string() || t["id"].get<int64_t>() < 0 || t["id"].get<int64_t>() > INT32_MAX)
        fail("added_tokens", "expected entries with a non-negative 32-bit integer id and a string content, got " +
                                 t.dump().substr(0, 200));
      for (const char* key : {"special", "lstrip", "rstrip", "single_word"})
        if (const Json* v = find_member(t, key); v && !v->is_boolean())
          fail("added_tokens", std::string("expected \"") + key + "\" true or false, got " + t.dump().substr(0, 200));
      // single_word matches only where no word character (Rust regex's \w: Alphabetic, marks, digits, connector
      // punctuation) touches the token: not implemented, so refused rather than matched everywhere.
      if (t.value("single_word", false))
        fail("added_tokens", "single_word true is not supported (token " + t["content"].dump() + ")");
      added_.push_back({t["content"].get<std::string>(), t["id"].get<int32_t>(), t.value("special", false),
                        t.value("lstrip", false), t.value("rstrip", false)});
      max_id = std::max(max_id, added_.back().id);
    }
  }
  // Ids number the tokens from 0 (a few unused ones at most): one far beyond their count is a broken file, whose
  // table of max_id strings would take the host's memory.
  const int64_t count = static_cast<int64_t>(vocab_.size() + added_.size());
  if (max_id >= 2 * count + 1024) {
    const bool added_max =
        std::any_of(added_.begin(), added_.end(), [&](const AddedToken& a) { return a.id == max_id; });
    fail(added_max ? "added_tokens" : "model.vocab", "id " + std::to_string(max_id) + " is far beyond the " +
                                                         std::to_string(count) + " tokens (ids number the tokens from 0)");
  }
  id_to_token_.assign(max_id + 1, "");
  for (const auto& [token, id] : vocab_) id_to_token_[id] = token;
  for (const auto& t : added_) id_to_token_[t.id] = t.content;
  std::stable_sort(added_.begin(), added_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (uint32_t i = 0; i < added_.size(); ++i)
    if (!added_[i].content.empty()) added_by_first_byte_[static_cast<unsigned char>(added_[i].content[0])].push_back(i);

  const Json* merges = find_member(*model, "merges");
  if (!merges || !merges->is_array()) fail("model.merges", "missing (expected a list of merges)");
  merges_.reserve(merges->size());
  int32_t rank = 0;
  for (const auto& m : *merges) {
    // "a b" (tokenizers < 0.20, and the published Llama 3 files) or ["a", "b"] (tokenizers >= 0.20).
    std::string left, right;
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("model.merges[" + std::to_string(rank) + "]", "expected \"left right\", got " + m.dump());
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail("model.merges[" + std::to_string(rank) + "]", "expected \"left right\" or [left, right], got " + m.dump());
    }
    auto l = vocab_.find(left), r = vocab_.find(right), lr = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || lr == vocab_.end())
      fail("model.merges[" + std::to_string(rank) + "]", "merge " + m.dump() + " uses a token not in model.vocab");
    merges_.emplace(pair_key(l->second, r->second), Merge{rank, lr->second});
    ++rank;
  }
  if (const Json* unk = find_member(*model, "unk_token"); unk && unk->is_string()) {
    auto it = vocab_.find(unk->get<std::string>());
    if (it == vocab_.end()) fail("model.unk_token", unk->dump() + " is not in model.vocab");
    unk_id_ = it->second;
  }

  // Byte-level tables: each byte's character and id; and what each id decodes to (tokenizers' ByteLevel
  // decoder: a token whose characters all map back to bytes gives those bytes, any other its own UTF-8 text).
  const auto b2u = bytes_to_unicode();
  std::unordered_map<char32_t, unsigned char> u2b;
  for (int b = 0; b < 256; ++b) {
    unicode::append_utf8(b2u[b], &byte_to_char_[b]);
    auto it = vocab_.find(byte_to_char_[b]);
    byte_id_[b] = it == vocab_.end() ? -1 : it->second;
    u2b[b2u[b]] = static_cast<unsigned char>(b);
  }
  id_to_bytes_.resize(id_to_token_.size());
  for (size_t id = 0; id < id_to_token_.size(); ++id) {
    const std::string& tok = id_to_token_[id];
    std::string bytes;
    bool all = true;
    for (size_t pos = 0; pos < tok.size() && all;) {
      size_t len;
      auto it = u2b.find(unicode::decode_utf8(tok, pos, &len));
      if (it == u2b.end()) {
        all = false;
      } else {
        bytes.push_back(static_cast<char>(it->second));
      }
      pos += len;
    }
    id_to_bytes_[id] = all ? bytes : tok;
  }

  // Post-processor: the tokens TemplateProcessing's "single" template puts before and after the sequence
  // (Llama 3: "<|begin_of_text|> $A").
  if (const Json* post = find_member(doc, "post_processor")) {
    std::vector<const Json*> procs;
    if (type_of(*post) == "Sequence") {
      for (const auto& p : post->at("processors")) procs.push_back(&p);
    } else {
      procs.push_back(post);
    }
    for (const Json* p : procs) {
      std::string type = type_of(*p);
      if (type == "ByteLevel") continue;  // offsets only
      if (type != "TemplateProcessing")
        fail("post_processor", "unsupported type \"" + type + "\" (expected TemplateProcessing or ByteLevel)");
      std::vector<int32_t> before, after;
      bool seen_sequence = false;
      for (const auto& item : p->at("single")) {
        if (item.contains("Sequence")) {
          seen_sequence = true;
          continue;
        }
        const std::string name = item.at("SpecialToken").at("id").get<std::string>();
        const Json* spec = find_member(p->at("special_tokens"), name.c_str());
        if (!spec) fail("post_processor.special_tokens", "no entry for \"" + name + "\" used by the template");
        for (const auto& id : spec->at("ids")) (seen_sequence ? after : before).push_back(id.get<int32_t>());
      }
      if (before.size() > 1 || after.size() > 1)
        fail("post_processor.single", "more than one special token on one side of the sequence is not supported");
      if (!before.empty()) defaults_.add_bos = true, defaults_.bos_id = before[0];
      if (!after.empty()) defaults_.add_eos = true, defaults_.eos_id = after[0];
    }
  }
}

int32_t BpeTokenizer::token_to_id(std::string_view token) const {
  for (const auto& t : added_)
    if (t.content == token) return t.id;
  auto it = vocab_.find(std::string(token));
  return it == vocab_.end() ? -1 : it->second;
}

std::string BpeTokenizer::id_to_token(int32_t id) const {
  return id >= 0 && id < vocab_size() ? id_to_token_[id] : std::string();
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids)
    if (id >= 0 && id < vocab_size()) out += id_to_bytes_[id];
  return out;
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const { return encode_impl(text, false); }

std::vector<int32_t> BpeTokenizer::encode_with_special(std::string_view text) const {
  return encode_impl(text, true);
}

std::vector<int32_t> BpeTokenizer::encode_impl(std::string_view text, bool split_special) const {
  // Added tokens are cut out first, leftmost-longest (tokenizers' AddedVocabulary); special ones only when
  // asked (tokenizers' encode_special_tokens=True leaves them as text), non-special ones always.
  std::vector<int32_t> out;
  size_t start = 0;
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* hit = nullptr;
    for (uint32_t i : added_by_first_byte_[static_cast<unsigned char>(text[pos])]) {  // longest first
      const AddedToken& t = added_[i];
      if ((split_special || !t.special) && text.compare(pos, t.content.size(), t.content) == 0) {
        hit = &t;
        break;
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    // AddedVocabulary::find_matches: lstrip takes the white space (\s) before the token back to the previous match,
    // rstrip the white space after it; that white space is part of the token, not text.
    size_t begin = pos, end = pos + hit->content.size();
    if (hit->lstrip) begin = white_space_start(text, start, begin);
    if (hit->rstrip) end = white_space_end(text, end);
    encode_pre_tokenized(text.substr(start, begin - start), &out);
    out.push_back(hit->id);
    pos = start = end;
  }
  encode_pre_tokenized(text.substr(start), &out);
  return out;
}

void BpeTokenizer::encode_pre_tokenized(std::string_view text, std::vector<int32_t>* out) const {
  if (text.empty()) return;
  const std::string normalized = nfc_ ? unicode::nfc(text) : std::string();
  const std::string_view input = nfc_ ? std::string_view(normalized) : text;
  for (std::string_view word : gpt2_ ? gpt2_pre_tokenize(input, gpt2_digits_) : llama3_pre_tokenize(input, max_digits_))
    encode_word(word, out);
}

void BpeTokenizer::encode_word(std::string_view word, std::vector<int32_t>* out) const {
  std::string key(word);
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = bpe(word);
  out->insert(out->end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_.size() >= (1u << 18)) cache_.clear();  // bounded memory on adversarial input
  cache_.emplace(std::move(key), std::move(ids));
}

std::vector<int32_t> BpeTokenizer::bpe(std::string_view word) const {
  if (ignore_merges_) {  // tokenizers' BPE with ignore_merges: a word found whole in the vocab is one token
    std::string mapped;
    for (unsigned char b : word) mapped += byte_to_char_[b];
    auto it = vocab_.find(mapped);
    if (it != vocab_.end()) return {it->second};
  }
  struct Symbol {
    int32_t id, prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  for (unsigned char b : word) {
    int32_t id = byte_id_[b] >= 0 ? byte_id_[b] : unk_id_;
    if (id < 0) continue;  // tokenizers drops a character absent from the vocab when there is no unk token
    int32_t i = static_cast<int32_t>(syms.size());
    syms.push_back({id, i - 1, -1, true});
    if (i > 0) syms[i - 1].next = i;
  }
  // tokenizers' Word::merge_all: repeatedly merge the pair of lowest rank, leftmost first; a queued pair whose
  // symbols have changed since is skipped.
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int32_t pos) {
    auto it = merges_.find(pair_key(syms[pos].id, syms[syms[pos].next].id));
    if (it != merges_.end()) queue.push({it->second.rank, pos, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) push(i);
  while (!queue.empty()) {
    Candidate c = queue.top();
    queue.pop();
    Symbol& s = syms[c.pos];
    if (!s.alive || s.next < 0) continue;
    Symbol& r = syms[s.next];
    auto it = merges_.find(pair_key(s.id, r.id));
    if (it == merges_.end() || it->second.rank != c.rank || it->second.new_id != c.new_id) continue;
    s.id = c.new_id;
    r.alive = false;
    s.next = r.next;
    if (s.next >= 0) syms[s.next].prev = c.pos;
    if (s.prev >= 0) push(s.prev);
    if (s.next >= 0) push(c.pos);
  }
  std::vector<int32_t> ids;
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) ids.push_back(syms[i].id);
  return ids;
}

}  // namespace qt
