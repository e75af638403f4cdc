#pragma once
// safetensors reader (mmap) and writer. Format, as specified by huggingface/safetensors:
//   8 bytes little-endian u64 N | N bytes of JSON header | data buffer
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// start of the data buffer) plus an optional "__metadata__" map of strings. Every field is validated against
// the file size before any byte is read through it.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/error.h"

namespace qt {

struct TensorInfo {
  std::string name;
  std::string dtype;  // safetensors spelling: "BF16", "F32", ...
  at::ScalarType scalar_type;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer
  uint64_t end = 0;
  int64_t numel() const;
};

// Maps between safetensors dtype names and ATen scalar types; throws qt::Error for unknown ones.
at::ScalarType safetensors_dtype(const std::string& name, const std::string& file, const std::string& key);
std::string safetensors_dtype_name(at::ScalarType type);

class SafetensorsFile {
 public:
  // `kind`: what a missing, truncated or malformed file is reported as (a model's weights: Model; an adapter's or
  // checkpoint's: Checkpoint).
  explicit SafetensorsFile(const std::string& path, ErrorKind kind = ErrorKind::Model);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws naming the file and the tensor

  // A CPU tensor over the mapped bytes (no copy when aligned): valid while this object lives.
  at::Tensor view(const std::string& name) const;
  // An owned copy converted to `dtype` on `device`.
  at::Tensor load(const std::string& name, at::ScalarType dtype, const at::Device& device) const;

 private:
  void open();
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data buffer
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes tensors (any device; copied to CPU contiguous) to `path` through a temporary file, fsync and rename.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace qt
