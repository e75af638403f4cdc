#pragma once
// Small helpers shared by the C++ tests.
#include <ATen/ATen.h>
#include <sys/resource.h>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/model/llama_config.h"

#include <csignal>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>

namespace qt::test {

// ||a - b|| / ||b|| in float64; NaN anywhere makes it infinite so that it never passes a bound.
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.detach().to(at::kCPU, at::kDouble), y = b.detach().to(at::kCPU, at::kDouble);
  if (!x.isfinite().all().item<bool>() || !y.isfinite().all().item<bool>()) return INFINITY;
  double denom = y.norm().item<double>();
  double num = (x - y).norm().item<double>();
  return denom == 0 ? num : num / denom;
}

inline std::string fixture(const std::string& rel) { return std::string(QT_FIXTURES) + "/" + rel; }

// A fresh empty directory under the build tree, removed and re-created on each call.
inline std::string scratch_dir(const std::string& name) {
  std::string p = qt::files::join(qt::files::join(qt::files::parent(QT_FIXTURES), "scratch"), name);
  qt::files::remove_tree(p);
  qt::files::make_dirs(p);
  return p;
}

// The message of the qt::Error that f() throws ("" when it throws none); its kind into *kind when given.
inline std::string error_of(const std::function<void()>& f, qt::ErrorKind* kind = nullptr) {
  try {
    f();
  } catch (const qt::Error& e) {
    if (kind) *kind = e.kind();
    return e.what();
  }
  return "";
}

// While alive, a file this process writes cannot grow past `bytes` (RLIMIT_FSIZE, as `ulimit -f`) and SIGXFSZ is
// ignored: a write beyond fails with EFBIG ("File too large"), as one on a full disk fails with ENOSPC.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &old_);
    handler_ = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old_;
    small.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &small);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  struct rlimit old_ {};
  void (*handler_)(int) = nullptr;
};

// The qt::Error that f() throws, if any (its kind and message together).
template <typename F>
std::optional<qt::Error> caught(F&& f) {
  try {
    f();
  } catch (const qt::Error& e) {
    return e;
  }
  return std::nullopt;
}

// An environment variable set to `value` (null: unset) for the scope, its previous value (or absence) restored after,
// also when the scope is left by an exception or a failed REQUIRE.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) saved_ = old;
    if (value) ::setenv(name, value, 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (saved_) ::setenv(name_.c_str(), saved_->c_str(), 1);
    else ::unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> saved_;
};

inline bool has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// The same dtype, element count and bits (NaN payloads and signed zeros included), wherever each tensor lives.
inline bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  auto bits = [](const at::Tensor& t) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous().reshape({-1});
    switch (c.element_size()) {
      case 1: return c.view(at::kByte);
      case 2: return c.view(at::kShort);
      case 4: return c.view(at::kInt);
      default: return c.view(at::kLong);
    }
  };
  return a.scalar_type() == b.scalar_type() && a.numel() == b.numel() && at::equal(bits(a), bits(b));
}

// Leaves 256 MiB of NaN in the caching allocator's free blocks of `device`, so that an output the code forgets to
// write (allocated with at::empty from that cache) shows up as NaN.
inline void poison_allocator_cache(const at::Device& device) {
  at::Tensor nan = at::full({int64_t{64} << 20}, NAN, at::TensorOptions().dtype(at::kFloat).device(device));
  nan.reset();  // back to the caching allocator, NaN bytes and all
}

// A 2-layer LLaMA shape (hidden 128, 4 heads of 32, GQA 2:1, intermediate 256) with `vocab` tokens.
inline qt::LlamaConfig tiny_llama_config(int64_t vocab) {
  qt::LlamaConfig c;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 32;
  c.vocab_size = vocab;
  return c;
}

}  // namespace qt::test
