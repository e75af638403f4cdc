#pragma once
// JSON Lines input: one JSON object per line. Errors name the file and the line number.
#include <string>
#include <vector>

#include "lib/core/json.h"

namespace qt {

struct JsonlRecord {
  Json value;
  int64_t line = 0;  // 1-based line number in the file
};

// Reads every record of `path`. Blank lines at the end are ignored (editors and `echo >>` leave them); a blank line
// between records, a line that is not valid JSON, or a value that is not an object is
// a qt::Error(Data) naming "path:line"; so is a file with no records at all.
std::vector<JsonlRecord> read_jsonl(const std::string& path);

// The string field `key` of a record; a missing key or another type is an error naming file, line and key.
std::string record_string(const JsonlRecord& record, const std::string& path, const std::string& key);

}  // namespace qt
