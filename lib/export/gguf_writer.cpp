#include "lib/export/gguf_writer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "lib/core/error.h"
#include "lib/export/ggml_quants.h"

namespace qt {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF is written little-endian as the host's byte order");

const char* ggml_type_name(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
      return "f32";
    case GgmlType::F16:
      return "f16";
    case GgmlType::Q4_0:
      return "q4_0";
    case GgmlType::Q4_1:
      return "q4_1";
    case GgmlType::Q5_0:
      return "q5_0";
    case GgmlType::Q5_1:
      return "q5_1";
    case GgmlType::Q8_0:
      return "q8_0";
    case GgmlType::Q2_K:
      return "q2_K";
    case GgmlType::Q3_K:
      return "q3_K";
    case GgmlType::Q4_K:
      return "q4_K";
    case GgmlType::Q5_K:
      return "q5_K";
    case GgmlType::Q6_K:
      return "q6_K";
    case GgmlType::BF16:
      return "bf16";
  }
  return "?";
}

int64_t ggml_block_size(GgmlType type) {
  switch (type) {
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q8_0:
      return 32;
    case GgmlType::Q2_K:
    case GgmlType::Q3_K:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
      return kQK_K;
    default:
      return 1;
  }
}

int64_t ggml_nbytes(GgmlType type, int64_t n) {
  switch (type) {
    case GgmlType::F32:
      return 4 * n;
    case GgmlType::F16:
    case GgmlType::BF16:
      return 2 * n;
    case GgmlType::Q8_0:
      return n / kQ8_0BlockSize * kQ8_0BlockBytes;
    case GgmlType::Q4_0:
      return n / kQ5_Block * kQ4_0BlockBytes;
    case GgmlType::Q4_1:
      return n / kQ5_Block * kQ4_1BlockBytes;
    case GgmlType::Q5_0:
      return n / kQ5_Block * kQ5_0BlockBytes;
    case GgmlType::Q5_1:
      return n / kQ5_Block * kQ5_1BlockBytes;
    case GgmlType::Q2_K:
      return n / kQK_K * kQ2_KBlockBytes;
    case GgmlType::Q3_K:
      return n / kQK_K * kQ3_KBlockBytes;
    case GgmlType::Q4_K:
      return n / kQK_K * kQ4_KBlockBytes;
    case GgmlType::Q5_K:
      return n / kQK_K * kQ5_KBlockBytes;
    case GgmlType::Q6_K:
      return n / kQK_K * kQ6_KBlockBytes;
  }
  fail(ErrorKind::Internal, "ggml_nbytes: unknown type");
}

at::Tensor quantize_q8_0(const at::Tensor& x) {
  QT_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), ErrorKind::Internal,
           "quantize_q8_0: expects a contiguous fp32 CPU tensor");
  const int64_t n = x.numel();
  QT_CHECK(n % kQ8_0BlockSize == 0, ErrorKind::Internal, "quantize_q8_0: size not a multiple of 32");
  at::Tensor out = at::empty({n / kQ8_0BlockSize * kQ8_0BlockBytes}, at::kByte);
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / kQ8_0BlockSize, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = src + b * kQ8_0BlockSize;
      uint8_t* yb = dst + b * kQ8_0BlockBytes;
      float amax = 0.f;
      for (int64_t j = 0; j < kQ8_0BlockSize; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      const uint16_t dh = c10::Half(d).x;  // round to nearest even, as GGML_FP32_TO_FP16
      std::memcpy(yb, &dh, 2);
      for (int64_t j = 0; j < kQ8_0BlockSize; ++j) {
        const int8_t q = static_cast<int8_t>(std::roundf(xb[j] * id));
        std::memcpy(yb + 2 + j, &q, 1);
      }
    }
  });
  return out;
}

at::Tensor dequantize_q8_0(const at::Tensor& blocks, int64_t n) {
  QT_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
               blocks.numel() == n / kQ8_0BlockSize * kQ8_0BlockBytes && n % kQ8_0BlockSize == 0,
           ErrorKind::Internal, "dequantize_q8_0: expects n / 32 blocks of 34 bytes");
  at::Tensor out = at::empty({n}, at::kFloat);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t b = 0; b < n / kQ8_0BlockSize; ++b) {
    c10::Half d;
    std::memcpy(&d.x, src + b * kQ8_0BlockBytes, 2);
    for (int64_t j = 0; j < kQ8_0BlockSize; ++j) {
      int8_t q;
      std::memcpy(&q, src + b * kQ8_0BlockBytes + 2 + j, 1);
      dst[b * kQ8_0BlockSize + j] = static_cast<float>(d) * q;
    }
  }
  return out;
}

namespace {

template <typename T>
void put(std::string& buf, T v) {
  buf.append(reinterpret_cast<const char*>(&v), sizeof v);
}

void put_string(std::string& buf, const std::string& s) {
  put<uint64_t>(buf, s.size());
  buf.append(s);
}

int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// A FILE* owned for the duration of write(); a failed write names the path.
class OutFile {
 public:
  explicit OutFile(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
    if (!f_) fail_at(ErrorKind::Io, path, std::string("cannot create: ") + std::strerror(errno));
  }
  ~OutFile() {
    if (f_) std::fclose(f_);
  }
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f_) != n)
      fail_at(ErrorKind::Io, path_, std::string("write failed: ") + std::strerror(errno));
  }
  void pad(int64_t n) {
    static const char zeros[64] = {};
    while (n > 0) {
      const size_t k = static_cast<size_t>(std::min<int64_t>(n, sizeof zeros));
      write(zeros, k);
      n -= static_cast<int64_t>(k);
    }
  }
  void close_synced() {
    if (std::fflush(f_) != 0 || ::fsync(fileno(f_)) != 0)
      fail_at(ErrorKind::Io, path_, std::string("write failed: ") + std::strerror(errno));
    const int rc = std::fclose(f_);
    f_ = nullptr;
    if (rc != 0) fail_at(ErrorKind::Io, path_, std::string("close failed: ") + std::strerror(errno));
  }

 private:
  std::string path_;
  FILE* f_;
};

}  // namespace

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
  QT_CHECK(alignment > 0 && alignment % 8 == 0, ErrorKind::Internal, "GGUF alignment must be a multiple of 8");
}

void GgufWriter::add_key(const std::string& key, GgufValueType type) {
  for (const auto& k : keys_) QT_CHECK(k != key, ErrorKind::Internal, "GGUF key written twice: " + key);
  keys_.push_back(key);
  put_string(kv_, key);
  put<uint32_t>(kv_, static_cast<uint32_t>(type));
  ++kv_count_;
}

void GgufWriter::add_u32(const std::string& key, uint32_t v) {
  add_key(key, GgufValueType::UInt32);
  put(kv_, v);
}
void GgufWriter::add_i32(const std::string& key, int32_t v) {
  add_key(key, GgufValueType::Int32);
  put(kv_, v);
}
void GgufWriter::add_f32(const std::string& key, float v) {
  add_key(key, GgufValueType::Float32);
  put(kv_, v);
}
void GgufWriter::add_bool(const std::string& key, bool v) {
  add_key(key, GgufValueType::Bool);
  put<uint8_t>(kv_, v ? 1 : 0);
}
void GgufWriter::add_string(const std::string& key, const std::string& v) {
  add_key(key, GgufValueType::String);
  put_string(kv_, v);
}
void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  add_key(key, GgufValueType::Array);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufValueType::String));
  put<uint64_t>(kv_, v.size());
  for (const auto& s : v) put_string(kv_, s);
}
void GgufWriter::add_f32_array(const std::string& key, const std::vector<float>& v) {
  add_key(key, GgufValueType::Array);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufValueType::Float32));
  put<uint64_t>(kv_, v.size());
  for (float x : v) put(kv_, x);
}
void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  add_key(key, GgufValueType::Array);
  put<uint32_t>(kv_, static_cast<uint32_t>(GgufValueType::Int32));
  put<uint64_t>(kv_, v.size());
  for (int32_t x : v) put(kv_, x);
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& shape, GgmlType type,
                            std::function<at::Tensor()> make) {
  for (const auto& t : tensors_) QT_CHECK(t.name != name, ErrorKind::Internal, "GGUF tensor written twice: " + name);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const int64_t block = ggml_block_size(type);
  QT_CHECK(block == 1 || (!shape.empty() && shape.back() % block == 0), ErrorKind::Internal,
           name + ": " + ggml_type_name(type) + " needs rows of a multiple of " + std::to_string(block) + " values");
  const int64_t nbytes = ggml_nbytes(type, n);
  tensors_.push_back({name, shape, type, next_offset_, nbytes, std::move(make)});
  next_offset_ = align_up(next_offset_ + nbytes, alignment_);
}

int64_t GgufWriter::data_bytes() const { return next_offset_; }

void GgufWriter::write(const std::string& path) const {
  std::string head;
  head.append("GGUF", 4);
  put<uint32_t>(head, kVersion);
  put<uint64_t>(head, tensors_.size());
  const bool has_alignment = std::find(keys_.begin(), keys_.end(), "general.alignment") != keys_.end();
  put<uint64_t>(head, kv_count_ + (has_alignment ? 0 : 1));
  head.append(kv_);
  if (!has_alignment) {
    put_string(head, "general.alignment");
    put<uint32_t>(head, static_cast<uint32_t>(GgufValueType::UInt32));
    put<uint32_t>(head, alignment_);
  }
  for (const auto& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<uint64_t>(head, static_cast<uint64_t>(*it));
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, static_cast<uint64_t>(t.offset));
  }
  OutFile f(path);
  f.write(head.data(), head.size());
  f.pad(align_up(static_cast<int64_t>(head.size()), alignment_) - static_cast<int64_t>(head.size()));
  int64_t pos = 0;
  for (const auto& t : tensors_) {
    at::Tensor x = t.make();
    QT_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), ErrorKind::Internal,
             t.name + ": GGUF tensor source must be fp32 on the CPU");
    QT_CHECK(x.sizes().vec() == t.shape, ErrorKind::Internal, t.name + ": shape differs from its tensor info");
    x = x.contiguous();
    if (!x.isfinite().all().item<bool>())
      fail(ErrorKind::Numeric, t.name + ": the merged weight holds a non-finite value; nothing exported");
    at::Tensor out;
    switch (t.type) {
      case GgmlType::F32:
        out = x;
        break;
      case GgmlType::F16:
        out = x.to(at::kHalf);
        break;
      case GgmlType::BF16:
        out = x.to(at::kBFloat16);
        break;
      case GgmlType::Q8_0:
        out = quantize_q8_0(x);
        break;
      case GgmlType::Q4_0:
        out = quantize_q4_0(x);
        break;
      case GgmlType::Q4_1:
        out = quantize_q4_1(x);
        break;
      case GgmlType::Q5_0:
        out = quantize_q5_0(x);
        break;
      case GgmlType::Q5_1:
        out = quantize_q5_1(x);
        break;
      case GgmlType::Q2_K:
        out = quantize_q2_k(x);
        break;
      case GgmlType::Q3_K:
        out = quantize_q3_k(x);
        break;
      case GgmlType::Q4_K:
        out = quantize_q4_k(x);
        break;
      case GgmlType::Q5_K:
        out = quantize_q5_k(x);
        break;
      case GgmlType::Q6_K:
        out = quantize_q6_k(x);
        break;
    }
    // Finite in fp32 is not enough: past fp16's 65504 a value (f16), or a block's fp16 scale amax / 127 (q8_0), is
    // stored as infinity and llama.cpp's logits turn NaN (convert_hf_to_gguf.py's astype writes it so, silently);
    // export --merge --dtype fp16 refuses the same weights.
    // The other block types' fp16 scales and minimums are at most the block's largest magnitude: fp16's range holds
    // them where it holds the values.
    const bool blocks = ggml_block_size(t.type) > 1 && t.type != GgmlType::Q8_0;
    const bool stored_finite = t.type == GgmlType::Q8_0  ? (x.abs().amax() / 127).to(at::kHalf).isfinite().item<bool>()
                               : blocks                  ? x.abs().amax().to(at::kHalf).isfinite().item<bool>()
                               : t.type == GgmlType::F32 ? true
                                                         : out.isfinite().all().item<bool>();
    if (!stored_finite)
      fail(ErrorKind::Numeric, t.name + ": the merged weight holds a value " + ggml_type_name(t.type) +
                                   " cannot store" +
                                   (t.type == GgmlType::Q8_0  ? " (|w| > 127 x 65504, its block's fp16 scale)"
                                    : t.type == GgmlType::F16 || blocks ? " (|w| > 65504)"
                                                              : "") +
                                   "; nothing exported");
    QT_CHECK(out.nbytes() == static_cast<size_t>(t.nbytes) && pos == t.offset, ErrorKind::Internal,
             t.name + ": data size or offset differs from its tensor info");
    f.write(out.data_ptr(), out.nbytes());
    pos += t.nbytes;
    const int64_t padded = align_up(pos, alignment_);
    f.pad(padded - pos);
    pos = padded;
  }
  f.close_synced();
}

}  // namespace qt
