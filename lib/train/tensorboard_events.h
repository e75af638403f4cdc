#pragma once
// TensorBoard event files: `tensorboard --logdir OUTPUT_DIR` shows the run's scalars. The format is TensorFlow's
// TFRecord framing (tensorflow/core/lib/io/record_writer.cc: uint64 length, masked CRC-32C of the length, the data,
// masked CRC-32C of the data, little-endian) around Event protocol buffers (tensorflow/core/util/event.proto:
// wall_time = 1, step = 2, file_version = 3, summary = 5; summary.proto: Summary.value = 1, Value.tag = 1,
// Value.simple_value = 2). The few fields are encoded here by hand: no protobuf dependency.
#include <cstdint>
#include <cstdio>
#include <string>

namespace qt {

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of `size` bytes, and TFRecord's mask of it
// (rotated right by 15 bits plus 0xa282ead8), which keeps a CRC of data holding CRCs from being trivial.
uint32_t crc32c(const void* data, size_t size);
uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  // Creates DIR/events.out.tfevents.<seconds>.<host>.<pid> (the name TensorBoard looks for) and writes the file
  // version record. Throws qt::Error(Io) naming the file.
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One scalar at `step` (TensorBoard's simple_value, a float), flushed at once so that a live TensorBoard and a
  // stopped run see it.
  void scalar(const std::string& tag, int64_t step, double value);
  // SessionLog START at `step` (Event.session_log = 7, SessionLog.status = 1, START = 1): TensorBoard drops what
  // earlier files hold from that step on, so that a run resumed from a checkpoint shows its steps once.
  void session_start(int64_t step);
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  FILE* file_ = nullptr;
};

}  // namespace qt
