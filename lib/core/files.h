#pragma once
// File-system operations on POSIX calls. Not std::filesystem: libtorch.so, libtorch_cpu.so and libtorch_cuda.so
// export their own copy of std::filesystem (an older libstdc++fs), and calls bind to it at run time depending on
// link order; seen on the GPU image: std::filesystem::remove_all on a non-empty directory jumped to address 0.
// The project uses these helpers instead (a ctest check keeps std::filesystem out).
#include <string>
#include <utility>
#include <vector>

namespace qt::files {

bool exists(const std::string& path);
bool is_dir(const std::string& path);
bool is_file(const std::string& path);
int64_t file_size(const std::string& path);  // -1 if it cannot be stat'ed
std::string join(const std::string& a, const std::string& b);
std::string parent(const std::string& path);
std::string base_name(const std::string& path);
// "out/" (a shell's completion) as "out"; "/" stays.
std::string without_trailing_slashes(const std::string& path);
// `path` from the root: as it is when it starts with '/', else after the working directory (symbolic links are
// not resolved; "./" prefixes dropped). Throws qt::Error(Io) if the working directory cannot be read.
std::string absolute(const std::string& path);
// realpath(3): the path with every symbolic link, "." and ".." resolved; "" if it does not exist.
std::string real_path(const std::string& path);
// Why `path`, which does not exist, is missing: "file not found", or, for a symbolic link whose target is gone (a
// Hugging Face cache snapshot whose blob was deleted or never finished), that link and its target.
std::string why_missing(const std::string& path);

// mkdir -p. Throws qt::Error(Io) naming the path.
void make_dirs(const std::string& path);
// rm -rf; a missing path is not an error. Throws qt::Error(Io) naming what could not be removed.
void remove_tree(const std::string& path);

// What a writer that fails part-way leaves is removed when this goes out of scope, unless keep() was called: the
// directory `path` (made by the writer), or with `contents_only` what was written into it (a directory the user
// gave, empty before). Errors while removing are swallowed (the writer's own error is the one reported).
class RemoveUnlessKept {
 public:
  explicit RemoveUnlessKept(std::string path, bool contents_only = false)
      : path_(std::move(path)), contents_only_(contents_only) {}
  ~RemoveUnlessKept();
  RemoveUnlessKept(const RemoveUnlessKept&) = delete;
  RemoveUnlessKept& operator=(const RemoveUnlessKept&) = delete;
  void keep() { kept_ = true; }

 private:
  std::string path_;
  bool contents_only_;
  bool kept_ = false;
};
// rename(2): atomic within one file system. Throws qt::Error(Io).
void rename_path(const std::string& from, const std::string& to);
// Moves `from` (a file or a directory) to `to`, replacing what is there: in one step where the file system can
// (renameat2's RENAME_EXCHANGE; a crash leaves the old or the new one at `to`), else by moving the old one to `aside`
// first and back if `from` cannot take its place. Returns where the replaced one is now, for the caller to remove
// (`from` or `aside`; "" when `to` did not exist). Throws qt::Error(Io) with `to` as it was.
std::string replace_path(const std::string& from, const std::string& to, const std::string& aside);
// Names in a directory (no "." or ".."), sorted. Throws qt::Error(Io) if it cannot be read.
std::vector<std::string> list_dir(const std::string& path);
// The bytes of `from` into `to` (created or truncated), fsync'ed. Throws qt::Error(Io) naming the file, the operation
// and errno's text (a full disk is an error, not a shorter copy).
void copy_file(const std::string& from, const std::string& to);
// `text` as the whole of `path`, or `path` untouched: written to path + ".tmp", fsync'ed, renamed over `path`; on a
// failure the temporary file is removed and qt::Error(Io) names the file, the operation and errno's text.
// sync false: no fsync (readers still see the old file or the new one whole; a power loss may leave either): for
// files rewritten at every step, where the fsync would stall the step (the loss plot).
void write_file_atomically(const std::string& path, const std::string& text, bool sync = true);
void copy_tree(const std::string& from, const std::string& to);  // directories and regular files
// fsync a file or a directory (a rename is durable only once its directory is synced).
void sync_path(const std::string& path);
std::string read_file(const std::string& path);  // throws qt::Error(Io)

}  // namespace qt::files
