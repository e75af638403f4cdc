#pragma once
// JSON helpers over nlohmann::json: reading a file with errors that name it (and the line/column of a
// syntax error), typed access that names the key on a missing key or a wrong type, and "did you mean"
// suggestions for unknown keys.
#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "lib/core/error.h"

namespace qt {

using Json = nlohmann::json;

// Parses `path`; throws qt::Error(kind) naming the file (missing, unreadable, or where the syntax breaks).
Json read_json_file(const std::string& path, ErrorKind kind);
// Parses one JSON text; `where` names its origin ("data.jsonl:12").
Json parse_json(const std::string& text, const std::string& where, ErrorKind kind);
// Writes `value` (indented) to `path` via a temporary file and rename.
void write_json_file(const std::string& path, const Json& value);

const char* json_type_name(const Json& value);

// Nearest of `known` to `key` by edit distance, if close enough to be a plausible typo.
std::optional<std::string> nearest_key(const std::string& key, const std::vector<std::string>& known);

// Throws on any key of `object` not in `known`, naming it and the nearest known key.
void reject_unknown_keys(const Json& object, const std::vector<std::string>& known, const std::string& file,
                         const std::string& prefix, ErrorKind kind);

// Typed reads. `file` and `key` only name the place in error messages.
struct JsonReader {
  const Json& object;
  std::string file;
  ErrorKind kind;
  std::string prefix = "";  // "lora." for nested sections, so errors say "lora.r"

  bool has(const std::string& key) const { return object.contains(key) && !object.at(key).is_null(); }
  std::string path(const std::string& key) const { return prefix + key; }

  int64_t get_int(const std::string& key) const;
  double get_double(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  std::vector<std::string> get_strings(const std::string& key) const;

  int64_t get_int(const std::string& key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }
  double get_double(const std::string& key, double fallback) const {
    return has(key) ? get_double(key) : fallback;
  }
  bool get_bool(const std::string& key, bool fallback) const { return has(key) ? get_bool(key) : fallback; }
  std::string get_string(const std::string& key, const std::string& fallback) const {
    return has(key) ? get_string(key) : fallback;
  }
  const Json& require(const std::string& key) const;
};

}  // namespace qt
