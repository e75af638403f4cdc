#pragma once
// GGUF, version 3: the single-file model format of llama.cpp / ggml (ggml's docs/gguf.md). A file is
//   header:  magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata count
//   metadata key/values: gguf string key (uint64 length + bytes), uint32 value type, value (arrays: uint32 element
//            type, uint64 count, elements)
//   tensor infos: name, uint32 n_dims, uint64 dims[n_dims] innermost (fastest varying) first, uint32 ggml type,
//            uint64 offset of its data from the start of the data section (a multiple of general.alignment)
//   padding to general.alignment, then the data section, each tensor's bytes padded to the alignment.
// All little-endian. The writer holds the metadata and the tensor infos; tensor data is made one tensor at a time
// while the file is written, so a model never exists whole in memory in its output type.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace qt {

// ggml's type ids (ggml.h, enum ggml_type) for the types this writer emits.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30
};

// "f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "bf16"
const char* ggml_type_name(GgmlType type);

// Values a block of `type` (1 for f32 / f16 / bf16): a row of a block type is a whole number of blocks.
int64_t ggml_block_size(GgmlType type);

// Bytes of `n` values of `type` (a row of a block type must be a multiple of its block size).
int64_t ggml_nbytes(GgmlType type, int64_t n);

// Q8_0 (ggml-common.h block_q8_0): blocks of 32 values, each one fp16 scale d = max|x| / 127 followed by 32
// int8 q = round(x / d) (round half away from zero), 34 bytes a block. quantize_row_q8_0_ref in ggml-quants.c.
inline constexpr int64_t kQ8_0BlockSize = 32;
inline constexpr int64_t kQ8_0BlockBytes = 2 + kQ8_0BlockSize;
// `x`: fp32, contiguous, numel a multiple of 32. Returns the blocks as uint8 bytes.
at::Tensor quantize_q8_0(const at::Tensor& x);
// The inverse, to fp32: d * q per value (dequantize_row_q8_0).
at::Tensor dequantize_q8_0(const at::Tensor& blocks, int64_t n);

// Metadata value types (gguf_type in gguf.h).
enum class GgufValueType : uint32_t {
  UInt8 = 0,
  Int8 = 1,
  UInt16 = 2,
  Int16 = 3,
  UInt32 = 4,
  Int32 = 5,
  Float32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  UInt64 = 10,
  Int64 = 11,
  Float64 = 12
};

class GgufWriter {
 public:
  static constexpr uint32_t kVersion = 3;
  explicit GgufWriter(uint32_t alignment = 32);

  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);

  // A tensor of HF shape `shape` (outermost first, as torch lists it) stored as `type`; `make` returns it in fp32,
  // contiguous, when the data section reaches it.
  void add_tensor(const std::string& name, const std::vector<int64_t>& shape, GgmlType type,
                  std::function<at::Tensor()> make);

  // Writes the whole file to `path` (created or truncated) and fsyncs it. qt::Error(Io) naming the path on a
  // failed write; qt::Error(Numeric) naming the tensor if one holds a non-finite value.
  void write(const std::string& path) const;

  int64_t tensor_count() const { return static_cast<int64_t>(tensors_.size()); }
  int64_t data_bytes() const;  // the data section's size, padding included

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    GgmlType type;
    int64_t offset;
    int64_t nbytes;
    std::function<at::Tensor()> make;
  };
  void add_key(const std::string& key, GgufValueType type);

  uint32_t alignment_;
  std::string kv_;  // the metadata key/values, serialized as they are added
  int64_t kv_count_ = 0;
  std::vector<std::string> keys_;
  std::vector<Tensor> tensors_;
  int64_t next_offset_ = 0;
};

}  // namespace qt
