#pragma once
// Unicode character classes needed by the byte-level BPE pre-tokenizer (Llama 3's regex): \p{L}, \p{N}, \s.
// The range tables are generated (scripts/gen_unicode_tables.py -> unicode_tables.cpp) so that no regex or ICU
// library is needed at run time.
#include <cstddef>
#include <cstdint>

namespace qt::unicode {

struct CodepointRange {
  char32_t lo, hi;  // inclusive
};

extern const CodepointRange k_letter[];
extern const std::size_t k_letter_size;
extern const CodepointRange k_number[];
extern const std::size_t k_number_size;
extern const CodepointRange k_white_space[];
extern const std::size_t k_white_space_size;

bool in_table(const CodepointRange* table, std::size_t size, char32_t c);

inline bool is_letter(char32_t c) { return in_table(k_letter, k_letter_size, c); }       // \p{L}
inline bool is_number(char32_t c) { return in_table(k_number, k_number_size, c); }       // \p{N}
inline bool is_white_space(char32_t c) {                                                 // \s (White_Space)
  return c == U' ' || (c >= U'\t' && c <= U'\r') || (c >= 0x80 && in_table(k_white_space, k_white_space_size, c));
}

}  // namespace qt::unicode
