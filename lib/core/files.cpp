#include "lib/core/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "lib/core/error.h"

namespace qt::files {
namespace {

[[noreturn]] void io_fail(const std::string& path, const std::string& what) {
  fail_at(ErrorKind::Io, path, what + ": " + std::strerror(errno));
}

}  // namespace

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::string why_missing(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return "file not found";
  char target[PATH_MAX];
  const ssize_t n = ::readlink(path.c_str(), target, sizeof(target) - 1);
  return "is a symbolic link to " +
         (n > 0 ? "'" + std::string(target, static_cast<size_t>(n)) + "'" : std::string("a path")) +
         ", which does not exist";
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

int64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

std::string join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  if (!b.empty() && b.front() == '/') return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

std::string absolute(const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  char buf[4096];
  if (!::getcwd(buf, sizeof buf)) fail(ErrorKind::Io, std::string("cannot read the working directory: ") + std::strerror(errno));
  std::string rest = path;
  while (rest.rfind("./", 0) == 0) rest = rest.substr(2);
  if (rest.empty() || rest == ".") return buf;
  return join(buf, rest);
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : std::string();
}

std::string without_trailing_slashes(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

std::string parent(const std::string& path) {
  const std::string p = without_trailing_slashes(path);
  auto pos = p.rfind('/');
  if (pos == std::string::npos) return ".";
  return pos == 0 ? "/" : p.substr(0, pos);
}

std::string base_name(const std::string& path) {
  const std::string p = without_trailing_slashes(path);
  auto pos = p.rfind('/');
  return pos == std::string::npos ? p : p.substr(pos + 1);
}

void make_dirs(const std::string& path) {
  if (path.empty() || is_dir(path)) return;
  make_dirs(parent(path));
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) io_fail(path, "cannot create directory");
}

void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    if (::unlink(path.c_str()) != 0) io_fail(path, "cannot remove");
    return;
  }
  auto visit = [](const char* p, const struct stat*, int flag, struct FTW*) -> int {
    return (flag == FTW_DP ? ::rmdir(p) : ::unlink(p)) == 0 ? 0 : -1;
  };
  if (::nftw(path.c_str(), visit, 16, FTW_DEPTH | FTW_PHYS) != 0) io_fail(path, "cannot remove");
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) io_fail(to, "cannot rename " + from + " to it");
}

std::string replace_path(const std::string& from, const std::string& to, const std::string& aside) {
  struct stat st {};
  if (::lstat(to.c_str(), &st) != 0) {
    rename_path(from, to);
    return "";
  }
  // One step: a crash leaves either the old or the new one at `to`, never neither.
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) return from;
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) io_fail(to, "cannot exchange " + from + " with it");
  // A file system that cannot exchange (NFS): the old one aside, the new one in, the old one back if that fails.
  rename_path(to, aside);
  if (::rename(from.c_str(), to.c_str()) != 0) {
    const int err = errno;
    ::rename(aside.c_str(), to.c_str());
    fail_at(ErrorKind::Io, to, "cannot rename " + from + " to it: " + std::strerror(err));
  }
  return aside;
}

std::vector<std::string> list_dir(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (!d) io_fail(path, "cannot list directory");
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

namespace {

// write(2) until all of `n` bytes are written (a short write is not an error; a failed one is, errno kept).
bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = EIO;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Closes `fd` and throws qt::Error(Io) naming `path`, `what` failed and errno's text (errno as `what` left it).
[[noreturn]] void close_and_fail(int fd, const std::string& path, const std::string& what) {
  const int err = errno;
  ::close(fd);
  fail_at(ErrorKind::Io, path, what + ": " + std::strerror(err));
}

// Writes what `fill` writes (it returns false with errno set on a failed write) to `path`, created or truncated,
// then fsync (unless `sync` is false) and close, each checked. Throws qt::Error(Io) naming the file, the operation
// and errno's text.
template <typename Fill>
void write_synced(const std::string& path, Fill&& fill, bool sync = true) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_fail(path, "cannot be created");
  fill(fd);
  if (sync && ::fsync(fd) != 0) close_and_fail(fd, path, "fsync failed");
  if (::close(fd) != 0) io_fail(path, "close failed");  // (NFS reports a failed write-back here)
}

}  // namespace

void copy_file(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) io_fail(from, "cannot open for reading");
  struct InGuard {
    int fd;
    ~InGuard() { ::close(fd); }
  } guard{in};
  // (Was `out << in.rdbuf()`, which stops quietly where the disk fills: a truncated tokenizer.model, exit 0.)
  write_synced(to, [&](int out) {
    std::vector<char> buf(1 << 20);
    for (;;) {
      const ssize_t n = ::read(in, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) close_and_fail(out, from, "read failed");
      if (n == 0) break;
      if (!write_all(out, buf.data(), static_cast<size_t>(n))) close_and_fail(out, to, "write failed");
    }
  });
}

void write_file_atomically(const std::string& path, const std::string& text, bool sync) {
  const std::string tmp = path + ".tmp";
  RemoveUnlessKept cleanup(tmp);
  write_synced(
      tmp, [&](int fd) {
        if (!write_all(fd, text.data(), text.size())) close_and_fail(fd, tmp, "write failed");
      },
      sync);
  rename_path(tmp, path);
  cleanup.keep();
}

void copy_tree(const std::string& from, const std::string& to) {
  if (!is_dir(from)) {
    copy_file(from, to);
    return;
  }
  make_dirs(to);
  for (const auto& name : list_dir(from)) copy_tree(join(from, name), join(to, name));
}

void sync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io_fail(path, "cannot open to sync");
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) io_fail(path, "fsync failed");
}

std::string read_file(const std::string& path) {
  if (is_dir(path)) fail_at(ErrorKind::Io, path, "is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_at(ErrorKind::Io, path, exists(path) ? std::string("cannot be read (") + std::strerror(errno) + ")" : std::string("file not found"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

RemoveUnlessKept::~RemoveUnlessKept() {
  if (kept_) return;
  try {
    if (!contents_only_) {
      remove_tree(path_);
    } else if (is_dir(path_)) {
      for (const auto& name : list_dir(path_)) remove_tree(join(path_, name));
    }
  } catch (...) {
  }
}

}  // namespace qt::files
