#pragma once
// The one error type of the project. Every failure the user can cause (bad config, bad file, bad data,
// non-finite loss, ...) is thrown as qt::Error with a kind that maps to a distinct process exit code,
// and a message that names the file, the key or the step. main() catches it and prints one line.
#include <stdexcept>
#include <string>

namespace qt {

enum class ErrorKind {
  Usage = 2,       // bad command line
  Config = 3,      // run config (our JSON): malformed, unknown key, wrong type, out of range
  Model = 4,       // model directory: config.json, safetensors, tokenizer files, shapes, dtypes
  Data = 5,        // training / eval data files
  Checkpoint = 6,  // checkpoint or adapter files: missing, corrupt, incompatible
  Numeric = 7,     // non-finite loss or gradients
  Io = 8,          // a write failed (disk full, permissions)
  Device = 9,      // CUDA / NCCL / MPI failures, out of device memory
  Internal = 10,   // a bug: an invariant of ours that did not hold
};

int exit_code(ErrorKind kind);
const char* kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message) : std::runtime_error(std::move(message)), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Convenience constructors: "<where>: <what>" with `where` a file path, optionally with a key.
[[noreturn]] void fail(ErrorKind kind, const std::string& message);
[[noreturn]] void fail_at(ErrorKind kind, const std::string& file, const std::string& message);
[[noreturn]] void fail_key(ErrorKind kind, const std::string& file, const std::string& key, const std::string& message);

#define QT_CHECK(cond, kind, msg)        \
  do {                                   \
    if (!(cond)) ::qt::fail((kind), (msg)); \
  } while (0)

}  // namespace qt
