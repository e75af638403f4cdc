#include "lib/data/jsonl.h"

#include "lib/core/files.h"

#include <cerrno>
#include <cstring>
#include <fstream>

namespace qt {

std::vector<JsonlRecord> read_jsonl(const std::string& path) {
  if (files::is_dir(path)) fail_at(ErrorKind::Data, path, "is a directory, not a jsonl file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_at(ErrorKind::Data, path, errno == ENOENT ? std::string("file not found") : std::string("cannot be read (") + std::strerror(errno) + ")");
  // A compressed file would otherwise read as malformed JSON at line 1, and a UTF-16 one (Windows editors' "Unicode",
  // PowerShell's `>`) as a NUL byte at column 2.
  {
    unsigned char magic[2] = {0, 0};
    in.read(reinterpret_cast<char*>(magic), 2);
    if (magic[0] == 0x1f && magic[1] == 0x8b)
      fail_at(ErrorKind::Data, path, "is gzip-compressed; decompress it first (gunzip): jsonl is read as plain text");
    if ((magic[0] == 0xff && magic[1] == 0xfe) || (magic[0] == 0xfe && magic[1] == 0xff))
      fail_at(ErrorKind::Data, path,
              "is UTF-16 encoded (it starts with a UTF-16 byte order mark); jsonl is read as UTF-8: convert it first "
              "(iconv -f UTF-16 -t UTF-8)");
    in.clear();
    in.seekg(0);
  }
  std::vector<JsonlRecord> records;
  std::string line;
  int64_t number = 0;
  int64_t blank = 0;  // the first blank line not yet followed by a record
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const std::string where = path + ":" + std::to_string(number);
    if (line.find_first_not_of(" \t") == std::string::npos) {
      if (!blank) blank = number;
      continue;
    }
    if (blank)
      fail_at(ErrorKind::Data, path + ":" + std::to_string(blank), "empty line (each line must hold one JSON object)");
    Json value = parse_json(line, where, ErrorKind::Data);
    if (!value.is_object()) fail_at(ErrorKind::Data, where, std::string("expected a JSON object, got ") + json_type_name(value));
    records.push_back({std::move(value), number});
  }
  if (records.empty())
    fail_at(ErrorKind::Data, path,
            number > 0 ? "no records (the file holds only blank lines)" : "no records (the file is empty)");
  return records;
}

std::string record_string(const JsonlRecord& record, const std::string& path, const std::string& key) {
  const std::string where = path + ":" + std::to_string(record.line);
  if (!record.value.contains(key)) fail_key(ErrorKind::Data, where, key, "missing");
  const Json& v = record.value.at(key);
  if (!v.is_string()) fail_key(ErrorKind::Data, where, key, std::string("expected a string, got ") + json_type_name(v));
  return v.get<std::string>();
}

}  // namespace qt
