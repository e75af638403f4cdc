#include "lib/train/output_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/train/checkpoint.h"

namespace qt {
namespace {

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// What a run writes at its start, before its first checkpoint: the resolved config, the held-out records, the
// metrics and their plot.
bool is_start_file(const std::string& name) {
  return name == "metrics.jsonl" || name == "loss.html" || name == "config.resolved.json" || name == "eval.jsonl" ||
         starts_with(name, "events.out.tfevents.");
}

bool is_best_dir(const std::string& name) { return name == "best_adapter" || name == "best_model"; }

bool is_run_file(const std::string& name) {
  return starts_with(name, "checkpoint-") || starts_with(name, ".checkpoint-") || name == "adapter" ||
         name == "model" || is_best_dir(name) || is_start_file(name) || starts_with(name, "profile_");
}

// What a run writes before its first checkpoint is complete: replaced by a `--resume auto` that finds none.
bool is_pre_checkpoint_file(const std::string& name) {
  return is_start_file(name) || starts_with(name, ".checkpoint-") || starts_with(name, "profile_");
}

std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out;
}

}  // namespace

std::vector<std::string> run_files(const std::string& output_dir) {
  std::vector<std::string> found;
  if (!files::is_dir(output_dir)) return found;
  for (const auto& name : files::list_dir(output_dir))
    if (is_run_file(name)) found.push_back(name);
  return found;
}

std::string prepare_output_dir(const std::string& output_dir, const std::string& resume, bool overwrite,
                               std::vector<std::string>& replace, const std::string& config_file) {
  replace.clear();
  if (output_dir.empty())
    fail_key(ErrorKind::Config, config_file, "output_dir", "is empty: name the directory the run writes to");
  if (files::exists(output_dir) && !files::is_dir(output_dir))
    fail_key(ErrorKind::Config, config_file, "output_dir", "'" + output_dir + "' is a file, not a directory");
  if (!resume.empty() && overwrite)
    fail(ErrorKind::Usage, "--resume and --overwrite-output-dir exclude each other: resume a run or replace it");
  if (!resume.empty() && resume != "auto") return resume;
  std::vector<std::string> old = run_files(output_dir);
  if (resume == "auto") {
    if (auto latest = find_latest_checkpoint(output_dir)) return *latest;
    log::info("--resume auto: no complete checkpoint in " + output_dir + "; starting a new run");
    // (A best adapter of a run with no checkpoint is set aside, not lost: replace_earlier_run.)
    old.erase(std::remove_if(old.begin(), old.end(),
                             [](const std::string& n) { return is_pre_checkpoint_file(n) || is_best_dir(n); }),
              old.end());
    overwrite = overwrite || old.empty();
    if (!overwrite) {
      // Checkpoints alone, none of which loads (a file deleted by hand, a damaged disk), are no finished run: said so
      // (it read "holds a finished run (checkpoint-2)").
      const bool damaged = std::all_of(old.begin(), old.end(), [](const std::string& n) { return starts_with(n, "checkpoint-"); });
      fail_key(ErrorKind::Config, config_file, "output_dir",
               "'" + output_dir + "' holds " +
                   (damaged ? "checkpoints none of which loads (" + join_names(old) + "; the warnings above say why)"
                            : "a finished run (" + join_names(old) + ") and no checkpoint to resume") +
                   "; use another output_dir, or --overwrite-output-dir (without --resume) to replace it");
    }
    old = run_files(output_dir);
  } else if (!old.empty() && !overwrite && std::all_of(old.begin(), old.end(), is_pre_checkpoint_file)) {
    // What a run left that stopped before its first checkpoint (a bad step 1, a signal): nothing to resume, and its
    // config and metrics would otherwise block the corrected run.
    log::info(output_dir + " holds only what a run left before its first checkpoint (" + join_names(old) +
              "): replaced by this run");
  } else if (!old.empty() && !overwrite) {
    fail_key(ErrorKind::Config, config_file, "output_dir",
             "'" + output_dir + "' holds another run's files (" + join_names(old) +
                 "); use another output_dir, --resume auto to continue that run, or --overwrite-output-dir to replace it");
  }
  replace = old;
  return "";
}

std::string output_dir_lock_file(const std::string& output_dir) { return files::join(output_dir, ".qlora-train.lock"); }

OutputDirLock::OutputDirLock(const std::string& output_dir, const std::string& config_file) {
  if (output_dir.empty() || (files::exists(output_dir) && !files::is_dir(output_dir))) return;  // (prepare_output_dir says)
  files::make_dirs(output_dir);
  const std::string path = output_dir_lock_file(output_dir);
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_at(ErrorKind::Io, path, std::string("cannot be opened (") + std::strerror(errno) + ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    char buf[256];
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    if (n > 0) holder.assign(buf, static_cast<size_t>(n));
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) holder.pop_back();
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK) fail_at(ErrorKind::Io, path, std::string("cannot be locked (") + std::strerror(err) + ")");
    fail_key(ErrorKind::Config, config_file, "output_dir",
             "'" + output_dir + "' is in use by another run" + (holder.empty() ? "" : " (" + holder + ")") +
                 ", which holds " + path + "; wait for it to end, stop it, or use another output_dir");
  }
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  const std::string who = "pid " + std::to_string(::getpid()) + " on " + host + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, who.data(), who.size(), 0) != static_cast<ssize_t>(who.size()))
    log::warn(path + ": could not write who holds it (" + std::strerror(errno) + ")");
}

OutputDirLock::~OutputDirLock() {
  if (fd_ >= 0) ::close(fd_);  // (closing lets the lock go; the file stays: removing it would race a new holder)
}

void replace_earlier_run(const std::string& output_dir, const std::vector<std::string>& names) {
  std::vector<std::string> present;
  for (const auto& name : names)
    if (files::exists(files::join(output_dir, name))) present.push_back(name);
  if (present.empty()) return;
  log::info("replacing the earlier run in " + output_dir + ": removing " + join_names(present));
  for (const auto& name : present) {
    const std::string path = files::join(output_dir, name);
    if (!is_best_dir(name)) {
      files::remove_tree(path);
      continue;
    }
    // checkpoint.save_best's adapter is trained work that no checkpoint holds: set aside (one kept), not removed.
    const std::string aside = path + ".abandoned";
    if (files::exists(aside)) files::remove_tree(aside);
    files::rename_path(path, aside);
    log::warn("set the earlier run's " + name + " aside as " + aside);
  }
}

}  // namespace qt
