#include "lib/core/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/json.h"

namespace qt {
namespace {

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"BF16", at::kBFloat16}, {"F16", at::kHalf}, {"F32", at::kFloat}, {"F64", at::kDouble}, {"U8", at::kByte},
    {"I8", at::kChar},       {"I16", at::kShort}, {"I32", at::kInt},  {"I64", at::kLong},   {"BOOL", at::kBool},
};

[[noreturn]] void bad(const std::string& file, const std::string& what) {
  fail_at(ErrorKind::Model, file, "invalid safetensors file: " + what);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

at::ScalarType safetensors_dtype(const std::string& name, const std::string& file, const std::string& key) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  fail_key(ErrorKind::Model, file, key,
           "unsupported dtype '" + name + "' (expected BF16, F16, F32, F64, U8, I8, I16, I32, I64 or BOOL)");
}

std::string safetensors_dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (type == d.type) return d.name;
  fail(ErrorKind::Internal, std::string("no safetensors dtype for ") + c10::toString(type));
}

SafetensorsFile::SafetensorsFile(const std::string& path, ErrorKind kind) : path_(path) {
  try {
    open();
  } catch (const Error& e) {
    if (kind == ErrorKind::Model || e.kind() != ErrorKind::Model) throw;
    throw Error(kind, e.what());
  }
}

void SafetensorsFile::open() {
  const std::string& path = path_;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_at(ErrorKind::Model, path, files::exists(path) ? std::strerror(errno) : "file not found");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail_at(ErrorKind::Model, path, std::string("stat failed: ") + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail_at(ErrorKind::Model, path,
            S_ISDIR(st.st_mode) ? "is a directory, not a safetensors file" : "is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    bad(path, "file is " + std::to_string(size_) + " bytes, shorter than the 8-byte header length");
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail_at(ErrorKind::Model, path, std::string("mmap failed: ") + std::strerror(errno));
  }
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
    if (header_len > size_ - 8)
      bad(path, "header length " + std::to_string(header_len) + " points past the end of the file (" +
                    std::to_string(size_) + " bytes; truncated?)");
    data_ = bytes + 8 + header_len;
    const uint64_t data_size = size_ - 8 - header_len;
    Json header = parse_json(std::string(reinterpret_cast<const char*>(bytes + 8), header_len), path, ErrorKind::Model);
    if (!header.is_object()) bad(path, "header is not a JSON object");
    for (const auto& item : header.items()) {
      const std::string& name = item.key();
      const Json& v = item.value();
      if (name == "__metadata__") {
        if (!v.is_object()) bad(path, "__metadata__ is not an object");
        for (const auto& m : v.items()) {
          if (!m.value().is_string()) bad(path, "__metadata__ value for '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
        bad(path, "tensor '" + name + "' lacks dtype, shape or data_offsets");
      TensorInfo t;
      t.name = name;
      if (!v["dtype"].is_string()) bad(path, "tensor '" + name + "': dtype is not a string");
      t.dtype = v["dtype"].get<std::string>();
      t.scalar_type = safetensors_dtype(t.dtype, path, name);
      if (!v["shape"].is_array()) bad(path, "tensor '" + name + "': shape is not a list");
      for (const auto& d : v["shape"]) {
        if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
          bad(path, "tensor '" + name + "': shape entry " + d.dump() + " is not a non-negative integer");
        t.shape.push_back(d.get<int64_t>());
      }
      const Json& off = v["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        bad(path, "tensor '" + name + "': data_offsets is not a pair of non-negative integers");
      t.begin = off[0].get<uint64_t>();
      t.end = off[1].get<uint64_t>();
      if (t.begin > t.end)
        bad(path, "tensor '" + name + "': data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                      "] are reversed (the end before the start)");
      if (t.end > data_size)
        bad(path, "tensor '" + name + "': data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                      "] point past the end of the data (" + std::to_string(data_size) + " bytes; truncated?)");
      // numel * itemsize must equal the byte range; guard the multiplication against overflow.
      uint64_t elems = 1;
      for (auto d : t.shape) {
        if (d != 0 && elems > UINT64_MAX / static_cast<uint64_t>(d)) bad(path, "tensor '" + name + "': shape overflows");
        elems *= static_cast<uint64_t>(d);
      }
      const uint64_t item_size = c10::elementSize(t.scalar_type);
      if (elems > UINT64_MAX / item_size || elems * item_size != t.end - t.begin)
        bad(path, "tensor '" + name + "': " + std::to_string(t.end - t.begin) + " bytes do not hold shape " +
                      Json(t.shape).dump() + " of " + t.dtype);
      tensors_.push_back(std::move(t));
    }
    // By start, then end: a zero-size tensor at [n, n] comes before the one that starts at n (safetensors writes
    // them so), and neither overlaps the other.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    // The data is the tensors' bytes back to back and nothing else, as the safetensors library requires (it refuses
    // a gap as an invalid offset and bytes past the last tensor as an incomplete buffer, so transformers could not
    // load such a file): bytes unaccounted for mean a header that does not describe the data (a file written over a
    // longer one, two files joined, a hand-edited header).
    uint64_t end = 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (i > 0 && tensors_[i].begin < tensors_[i - 1].end)
        bad(path, "tensors '" + tensors_[i - 1].name + "' and '" + tensors_[i].name + "' overlap");
      if (tensors_[i].begin > end)
        bad(path, "tensor '" + tensors_[i].name + "' starts at byte " + std::to_string(tensors_[i].begin) +
                      " of the data, where " + (i > 0 ? "'" + tensors_[i - 1].name + "' ends at " : "the data begins at ") +
                      std::to_string(end) + ": " + std::to_string(tensors_[i].begin - end) +
                      " bytes belong to no tensor (safetensors' data is the tensors back to back)");
      end = tensors_[i].end;
      index_[tensors_[i].name] = i;
    }
    if (end != data_size)
      bad(path, std::to_string(data_size - end) + " bytes after the last tensor's data (the header's tensors end at byte " +
                    std::to_string(end) + " of " + std::to_string(data_size) +
                    "; safetensors allows none: a file written over a longer one, or two files joined?)");
  } catch (...) {
    ::munmap(map_, size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) fail_key(ErrorKind::Model, path_, name, "tensor not found in the file");
  return *t;
}

at::Tensor SafetensorsFile::view(const std::string& name) const {
  const TensorInfo& t = info(name);
  void* ptr = const_cast<uint8_t*>(data_ + t.begin);
  auto options = at::TensorOptions().dtype(t.scalar_type).device(at::kCPU);
  if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(t.scalar_type) == 0)
    return at::from_blob(ptr, t.shape, options);
  // Misaligned data (legal in the format, rare in practice): copy through bytes.
  at::Tensor out = at::empty(t.shape, options);
  std::memcpy(out.data_ptr(), ptr, t.end - t.begin);
  return out;
}

at::Tensor SafetensorsFile::load(const std::string& name, at::ScalarType dtype, const at::Device& device) const {
  at::Tensor v = view(name);
  // .to() copies even when dtype and device already match the view, since the view aliases the mapping.
  if (v.scalar_type() == dtype && device.is_cpu()) return v.clone();
  return v.to(device, dtype, /*non_blocking=*/false, /*copy=*/true);
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> cpu;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (header.contains(name)) fail(ErrorKind::Internal, path + ": duplicate tensor name '" + name + "'");
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", safetensors_dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail_at(ErrorKind::Io, tmp, std::string("cannot create: ") + std::strerror(errno));
  auto write_all = [&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        int err = errno;
        ::close(fd);
        ::unlink(tmp.c_str());
        fail_at(ErrorKind::Io, tmp, std::string("write failed: ") + std::strerror(err));
      }
      c += w;
      n -= static_cast<size_t>(w);
    }
  };
  uint8_t len[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  write_all(len, 8);
  write_all(text.data(), text.size());
  for (const auto& t : cpu) write_all(t.data_ptr(), t.numel() * t.element_size());
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    fail_at(ErrorKind::Io, tmp, std::string("fsync failed: ") + std::strerror(err));
  }
  if (::close(fd) != 0) {  // (NFS reports a failed write-back here; it was not checked)
    int err = errno;
    ::unlink(tmp.c_str());
    fail_at(ErrorKind::Io, tmp, std::string("close failed: ") + std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    fail_at(ErrorKind::Io, path, std::string("rename failed: ") + std::strerror(err));
  }
}

}  // namespace qt
