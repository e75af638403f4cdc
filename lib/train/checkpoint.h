#pragma once
// Crash-safe training checkpoints (`<output_dir>/checkpoint-<step>/`):
//   adapter_model.safetensors + adapter_config.json   the LoRA weights, as a PEFT adapter (usable as they are)
//   model/                                            with train.full_finetune instead: every weight, in the
//                                                     training dtype (a model directory transformers loads)
//   optimizer.safetensors                             AdamW moments (fp32), or with FullyShard one file per rank:
//   optimizer-shard-<r>-of-<n>.safetensors            rank r's rows of every moment (padded as FullyShard pads),
//                                                     re-sliced for any world size on resume
//   rng.safetensors                                   CPU (and CUDA) generator states
//   trainer_state.json                                format version, step, data position, seed, LR schedule
//                                                     step, the resolved run config, and a checksum per file
//                                                     (subdirectories' files by relative path)
//   COMPLETE                                          written last
// Written into a hidden temporary directory (files fsync'ed, COMPLETE last, directory fsync'ed), then renamed
// into place atomically; older checkpoints beyond keep_last are removed only after that. A full disk or a write
// error leaves the previous checkpoint untouched and surfaces as qt::Error(Io).
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/core/json.h"
#include "lib/data/dataset.h"
#include "lib/dist/parallel.h"

namespace qt {

inline constexpr int kCheckpointFormatVersion = 1;

struct TrainerState {
  int64_t step = 0;  // optimizer steps completed
  DataPosition data;
  uint64_t seed = 0;
  int64_t tokens_seen = 0;
  Json config;  // resolved run config
  std::string train_file_hash;  // data.train_file's bytes (train_file_hash()); "" in older checkpoints
  // DPO from lora.init_from: the adapter file's bytes that the reference is read from; "" otherwise
  std::string reference_hash;
  int64_t total_steps = 0;      // the length of the run's schedule; 0 in older checkpoints
  // fp16 compute: the dynamic loss scale and the steps since it last changed (0: no loss scaling).
  double loss_scale = 0;
  int64_t loss_scale_good_steps = 0;
  // AdamW's step count (its bias corrections): `step` less the steps fp16 loss scaling skipped; -1 in older
  // checkpoints (then `step`).
  int64_t optimizer_steps = -1;
  // Training records after loading (data.position counts among them); -1 in checkpoints before the ninth session,
  // which counted the records without a target token that are left out since.
  int64_t train_records = -1;
  // Not saved: the training records left out at load for holding no target (this run's).
  int64_t records_left_out = 0;
};

struct CheckpointContents {
  TrainerState state;
  std::vector<std::pair<std::string, at::Tensor>> optimizer;  // AdamW::state_tensors() (unsharded)
  std::vector<std::pair<std::string, at::Tensor>> rng;        // "cpu", "cuda:<i>" -> generator state bytes
  // > 0: the optimizer state was saved as that many per-rank shards (written by write_optimizer_shard, not
  // by save_checkpoint); load_checkpoint returns them by rank in optimizer_shards_by_rank.
  int optimizer_shards = 0;
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> optimizer_shards_by_rank;
};

// Writes checkpoint-<state.step> under `output_dir`. `write_adapter(dir)` writes the PEFT adapter files into the
// temporary directory. Prunes complete checkpoints beyond `keep_last` afterwards. Returns the final path.
// `tmp_pid` names the temporary directory (checkpoint_tmp_dir; < 0: this process's id). With
// contents.optimizer_shards > 0 the ranks have already written their shards into that directory (after
// begin_checkpoint_dir); save_checkpoint checks they are all there and lists them in the manifest.
std::string save_checkpoint(const std::string& output_dir, const CheckpointContents& contents,
                            const std::function<void(const std::string&)>& write_adapter, int64_t keep_last,
                            int64_t tmp_pid = -1);

// The sharded save, in order: rank 0 begin_checkpoint_dir(tmp); barrier; every rank write_optimizer_shard;
// barrier; rank 0 save_checkpoint(..., tmp_pid) with optimizer_shards = world size.
std::string checkpoint_tmp_dir(const std::string& output_dir, int64_t step, int64_t pid);
void begin_checkpoint_dir(const std::string& tmp_dir);  // removes and re-creates it
std::string optimizer_shard_file(int rank, int world);   // "optimizer-shard-00001-of-00003.safetensors"
void write_optimizer_shard(const std::string& tmp_dir, int rank, int world,
                           const std::vector<std::pair<std::string, at::Tensor>>& tensors);

// Reads a checkpoint directory, verifying COMPLETE, the format version and every file's checksum; throws
// qt::Error(Checkpoint) naming the file that is missing, truncated or corrupt.
CheckpointContents load_checkpoint(const std::string& dir);

// The newest checkpoint under `output_dir` that loads; incomplete or corrupt ones are skipped with a warning
// naming them. nullopt when there is none.
std::optional<std::string> find_latest_checkpoint(const std::string& output_dir);

// A run resumed at `step` from an older checkpoint than output_dir's newest: the later checkpoints belong to the run
// it departs from. Renamed aside (checkpoint-N -> checkpoint-N.abandoned, which `--resume auto` and the pruning of
// keep_last pass over), so that the resumed run's own checkpoints, its metrics.jsonl and its next `--resume auto`
// follow one line of steps. Returns the new names.
std::vector<std::string> set_aside_checkpoints_after(const std::string& output_dir, int64_t step);

// Keys of the run config that a resumed run must keep (model, LoRA shape, data, batch geometry, seed); the
// rest (total steps, logging, eval and checkpoint intervals, micro-batch size, activation checkpointing and
// offload) may change. Throws qt::Error(Checkpoint) listing every differing key; the paths of the model and the
// data files (model.path, data.train_file, data.eval_file, eval.exact_match_file, lora.init_from) may differ with
// `allow_changes` (--resume-allow-changes: a run moved to another directory), with a warning.
void check_resume_compatible(const Json& saved, const Json& current, const std::string& checkpoint_dir,
                             bool allow_changes = false);

// A 64-bit FNV-1a hash of a file's bytes (hex), stored in checkpoints for data.train_file.
std::string train_file_hash(const std::string& path);
// data.train_file's files: the one file's hash, or the files' hashes joined by "+" in their order (a file added,
// removed or moved in the list changes it, as a changed file does).
std::string train_files_hash(const std::vector<std::string>& paths);

// What a resume may not change beyond the config keys: asking for fewer steps than the checkpoint has done is an
// error (qt::Error Config, naming train.steps / train.epochs); a changed schedule length (the learning rate would
// jump; only where `length_matters`: a decaying schedule or a warmup_ratio) or a changed training file (the order
// and the held-out split would differ) is refused (Checkpoint), naming it, unless `allow_changes`
// (--resume-allow-changes), which logs a warning instead. Older checkpoints that hold no hash or length are not
// checked for them.
void check_resume_progress(const TrainerState& saved, const TrainerState& current, bool length_matters,
                           bool allow_changes, const std::string& checkpoint_dir, const std::string& config_file);

// The CPU (and current CUDA device's) default generator states, and their restoration.
std::vector<std::pair<std::string, at::Tensor>> capture_rng_states();
void restore_rng_states(const std::vector<std::pair<std::string, at::Tensor>>& states);

// The AdamW state of checkpoint `ck` for `params` (AdamW::state_tensors() names), re-sliced for this run: the
// checkpoint may hold it unsharded or as shards of any world size; the result is the parallel strategy's part
// (whole tensors, or when sharded this rank's padded shards). A missing or misshapen tensor is a
// qt::Error(Checkpoint) naming it and `dir`.
std::vector<std::pair<std::string, at::Tensor>> optimizer_state_for(
    const CheckpointContents& ck, const std::vector<std::pair<std::string, at::Tensor>>& params,
    const Parallel& parallel, const std::string& dir);

}  // namespace qt
