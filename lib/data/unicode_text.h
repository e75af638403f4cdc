#pragma once
// UTF-8 decoding for the tokenizers: one codepoint at a time, tolerant of invalid input (an invalid byte is
// returned as its own "codepoint" k_invalid so that byte-level BPE still sees and encodes every byte).
#include <cstddef>
#include <string>
#include <string_view>

namespace qt::unicode {

// Not a Unicode scalar value: marks a byte that does not start a valid UTF-8 sequence. It belongs to none of
// the classes \p{L}, \p{N}, \s.
constexpr char32_t k_invalid = 0xFFFFFFFF;

// Decodes the codepoint starting at text[pos] and stores its length in bytes (1..4) in *len. Overlong forms,
// surrogates and values above U+10FFFF are invalid (RFC 3629 section 3): k_invalid with *len = 1.
char32_t decode_utf8(std::string_view text, std::size_t pos, std::size_t* len);

// `bytes` as valid UTF-8: each maximal subpart of an ill-formed sequence becomes U+FFFD (Unicode 15, section 3.9,
// "U+FFFD Substitution of Maximal Subparts"), as Python's bytes.decode("utf-8", "replace") and Rust's
// String::from_utf8_lossy (the decode of HF tokenizers' ByteLevel decoder) do. Valid text comes back unchanged.
std::string replace_invalid_utf8(std::string_view bytes);

// Appends scalar value c as UTF-8.
void append_utf8(char32_t c, std::string* out);

}  // namespace qt::unicode
