#include "lib/data/unicode_nfc.h"

#include <algorithm>
#include <vector>

#include "lib/data/unicode_text.h"

namespace qt::unicode {
namespace {

// Hangul syllables (The Unicode Standard, section 3.12): LV and LVT syllables decompose into conjoining jamo and
// compose back by arithmetic.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint8_t combining_class(char32_t c) {
  if (c < 0x300) return 0;
  const CombiningClass* end = k_combining_class + k_combining_class_size;
  const CombiningClass* it =
      std::lower_bound(k_combining_class, end, c, [](const CombiningClass& e, char32_t v) { return e.c < v; });
  return it != end && it->c == c ? it->ccc : 0;
}

void decompose(char32_t c, std::u32string& out) {
  if (c >= kSBase && c < kSBase + kSCount) {
    const char32_t s = c - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const Decomposition* end = k_decomposition + k_decomposition_size;
  const Decomposition* it =
      std::lower_bound(k_decomposition, end, c, [](const Decomposition& e, char32_t v) { return e.c < v; });
  if (it != end && it->c == c) out.append(k_decomposition_data + it->offset, it->length);
  else out.push_back(c);
}

// The primary composite of (a, b), or 0 when there is none.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const Composition* end = k_composition + k_composition_size;
  const Composition* it = std::lower_bound(k_composition, end, std::make_pair(a, b), [](const Composition& e, auto v) {
    return e.first < v.first || (e.first == v.first && e.second < v.second);
  });
  return it != end && it->first == a && it->second == b ? it->composite : 0;
}

// NFC of a run of valid codepoints.
std::u32string nfc_run(const std::u32string& in) {
  std::u32string d;
  d.reserve(in.size());
  for (char32_t c : in) decompose(c, d);
  // Canonical ordering: within each run of non-starters, a stable sort by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i), d.begin() + static_cast<std::ptrdiff_t>(j),
                     [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // Canonical composition: each character joins the last starter when no character between them blocks it (one of
  // the same or a higher class, or a starter).
  std::u32string out;
  out.reserve(d.size());
  ptrdiff_t starter = -1;
  int last_class = -1;  // the class of the last character kept after the starter; -1: none yet
  for (char32_t c : d) {
    const int cls = combining_class(c);
    if (starter >= 0 && (last_class == -1 || (last_class != 0 && last_class < cls))) {
      if (char32_t composite = compose(out[static_cast<size_t>(starter)], c)) {
        out[static_cast<size_t>(starter)] = composite;
        continue;
      }
    }
    if (cls == 0) {
      starter = static_cast<ptrdiff_t>(out.size());
      last_class = -1;
    } else {
      last_class = cls;
    }
    out.push_back(c);
  }
  return out;
}

}  // namespace

std::string nfc(std::string_view text) {
  // Below U+0300 every codepoint is its own NFC and none composes with what precedes it.
  if (std::all_of(text.begin(), text.end(), [](char ch) { return static_cast<unsigned char>(ch) < 0xCC; }))
    return std::string(text);
  std::string out;
  out.reserve(text.size());
  std::u32string run;
  auto flush = [&] {
    for (char32_t c : nfc_run(run)) append_utf8(c, &out);
    run.clear();
  };
  for (size_t pos = 0; pos < text.size();) {
    size_t len = 0;
    const char32_t c = decode_utf8(text, pos, &len);
    if (c == k_invalid) {  // an invalid byte: kept as it is
      flush();
      out.append(text.substr(pos, len));
    } else {
      run.push_back(c);
    }
    pos += len;
  }
  flush();
  return out;
}

}  // namespace qt::unicode
