#include "lib/core/error.h"

namespace qt {

int exit_code(ErrorKind kind) { return static_cast<int>(kind); }

const char* kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Usage: return "usage error";
    case ErrorKind::Config: return "config error";
    case ErrorKind::Model: return "model error";
    case ErrorKind::Data: return "data error";
    case ErrorKind::Checkpoint: return "checkpoint error";
    case ErrorKind::Numeric: return "numeric error";
    case ErrorKind::Io: return "I/O error";
    case ErrorKind::Device: return "device error";
    case ErrorKind::Internal: return "internal error";
  }
  return "error";
}

void fail(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

void fail_at(ErrorKind kind, const std::string& file, const std::string& message) {
  throw Error(kind, file + ": " + message);
}

void fail_key(ErrorKind kind, const std::string& file, const std::string& key, const std::string& message) {
  throw Error(kind, file + ": key '" + key + "': " + message);
}

}  // namespace qt
