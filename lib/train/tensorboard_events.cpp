#include "lib/train/tensorboard_events.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "lib/core/error.h"
#include "lib/core/files.h"

namespace qt {
namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

// Protocol buffer wire format (protobuf.dev/programming-guides/encoding): a key is (field << 3) | wire type;
// 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

template <typename T>
void fixed(std::string& out, T v) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));  // little-endian hosts (x86-64, aarch64), as the format is
  out.append(bytes, sizeof(T));
}

void bytes_field(std::string& out, int field, const std::string& value) {
  varint(out, static_cast<uint64_t>(field) << 3 | 2);
  varint(out, value.size());
  out += value;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event {wall_time = 1 (double), step = 2 (int64)}, the rest appended by the caller.
std::string event_head(int64_t step) {
  std::string e;
  varint(e, 1 << 3 | 1);
  fixed(e, now_seconds());
  varint(e, 2 << 3 | 0);
  varint(e, static_cast<uint64_t>(step));
  return e;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = crc32c_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  path_ = files::join(dir, "events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) + "." + host +
                               "." + std::to_string(::getpid()));
  file_ = std::fopen(path_.c_str(), "wb");
  if (!file_) fail_at(ErrorKind::Io, path_, std::string("cannot be opened for writing: ") + std::strerror(errno));
  std::string e = event_head(0);
  bytes_field(e, 3, "brain.Event:2");  // file_version: what TensorBoard's loader expects first
  write_record(e);
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_) std::fclose(file_);
}

void TensorBoardWriter::session_start(int64_t step) {
  std::string log;  // SessionLog {status = 1: START}
  varint(log, 1 << 3 | 0);
  varint(log, 1);
  std::string e = event_head(step);
  bytes_field(e, 7, log);
  write_record(e);
}

void TensorBoardWriter::scalar(const std::string& tag, int64_t step, double value) {
  std::string v;  // Summary.Value {tag = 1, simple_value = 2 (float)}
  bytes_field(v, 1, tag);
  varint(v, 2 << 3 | 5);
  fixed(v, static_cast<float>(value));
  std::string summary;  // Summary {value = 1}
  bytes_field(summary, 1, v);
  std::string e = event_head(step);
  bytes_field(e, 5, summary);
  write_record(e);
}

void TensorBoardWriter::write_record(const std::string& event) {
  std::string r;
  const uint64_t length = event.size();
  fixed(r, length);
  fixed(r, masked_crc32c(r.data(), sizeof length));
  r += event;
  fixed(r, masked_crc32c(event.data(), event.size()));
  if (std::fwrite(r.data(), 1, r.size(), file_) != r.size() || std::fflush(file_) != 0)
    fail_at(ErrorKind::Io, path_, std::string("write failed: ") + std::strerror(errno));
}

}  // namespace qt
