#pragma once
// The decision a training run takes about its output directory, before it reads or writes anything there: resume a
// checkpoint, start fresh in an unused directory, or replace an older run's files only when asked to
// (--overwrite-output-dir, as HF Trainer's overwrite_output_dir). A new run never mixes with an older one.
#include <memory>
#include <string>
#include <vector>

namespace qt {

// The files a run leaves in its output directory (checkpoint-*, .checkpoint-*.tmp-*, adapter/, model/,
// metrics.jsonl, loss.html, config.resolved.json, eval.jsonl, events.out.tfevents.*, profile_*), by name, sorted. Other files are the user's and are left alone.
std::vector<std::string> run_files(const std::string& output_dir);

// resume: "" (a new run), "auto" (the newest complete checkpoint in output_dir, else a new run) or a checkpoint
// directory (returned as it is; loading it checks it). Returns the checkpoint to resume from, "" for a new run.
// A new run into a directory holding another run's files is refused (qt::Error Config, naming them) unless
// `overwrite`; then `replace` receives their names, and the run removes them with replace_earlier_run() only once its
// own data and model have loaded (a run that fails before that leaves the earlier one whole). After `--resume auto`
// finds no checkpoint, or for a new run, what a run leaves before its first checkpoint (metrics.jsonl, loss.html,
// config.resolved.json, eval.jsonl, incomplete checkpoints, profiles) is that run's and is replaced; a checkpoint,
// an adapter/ or model/ (a finished run) still needs `overwrite`. An empty output_dir, or one that is a file, is a Config error. `config_file` names
// the run config in messages.
std::string prepare_output_dir(const std::string& output_dir, const std::string& resume, bool overwrite,
                               std::vector<std::string>& replace, const std::string& config_file);

// An exclusive lock (flock) on output_dir/.qlora-train.lock, held while this object lives (the process: the kernel
// lets it go when the process ends, however it ends). Taken by rank 0 as training starts, before the run removes or
// writes anything in output_dir: a second run into the same directory at the same time (a job submitted twice, a
// requeued job whose first copy still runs) is refused (qt::Error Config) naming the process and host that hold it,
// instead of removing the live run's files. On file systems without flock across hosts it guards one host only.
// Makes output_dir if it does not exist.
// output_dir/.qlora-train.lock: the lock file, holding "pid P on HOST" of the run that holds it.
std::string output_dir_lock_file(const std::string& output_dir);
class OutputDirLock {
 public:
  OutputDirLock(const std::string& output_dir, const std::string& config_file);
  ~OutputDirLock();
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;

 private:
  int fd_ = -1;
};

// Removes `names` (prepare_output_dir's `replace`) from output_dir, saying so; names already gone are skipped.
void replace_earlier_run(const std::string& output_dir, const std::vector<std::string>& names);

}  // namespace qt
