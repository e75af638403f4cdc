#include "lib/train/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <thread>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/core/safetensors.h"
#include "lib/kernels/adamw_8bit.h"

namespace qt {
namespace {

constexpr const char* kComplete = "COMPLETE";
constexpr const char* kStateFile = "trainer_state.json";

// 64-bit FNV-1a over the file's bytes, eight at a time (a corruption check, not a cryptographic hash).
std::string file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_at(ErrorKind::Checkpoint, path, "cannot be read");
  uint64_t h = 1469598103934665603ULL;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const size_t n = static_cast<size_t>(in.gcount());
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, buf.data() + i, 8);
      h = (h ^ w) * 1099511628211ULL;
    }
    for (; i < n; ++i) h = (h ^ static_cast<uint8_t>(buf[i])) * 1099511628211ULL;
  }
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

// Test hook: QT_TEST_CHECKPOINT_DELAY_MS sleeps between the files of a checkpoint so that a test can kill the
// process in the middle of a save.
void test_delay() {
  if (const char* v = std::getenv("QT_TEST_CHECKPOINT_DELAY_MS"))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atol(v)));
}


int64_t checkpoint_step(const std::string& name) {
  const std::string prefix = "checkpoint-";
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size()) return -1;
  // (Digits past int64, checkpoint-99999999999999999999 made by hand, are no checkpoint of ours: std::stoll threw,
  // and `--resume auto` and every save ended in "internal error: stoll".)
  int64_t step = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    const int digit = name[i] - '0';
    if (step > (std::numeric_limits<int64_t>::max() - digit) / 10) return -1;
    step = step * 10 + digit;
  }
  return step;
}

void flatten(const Json& j, const std::string& prefix, std::map<std::string, Json>& out) {
  if (j.is_object() && !j.empty()) {
    for (const auto& item : j.items()) flatten(item.value(), prefix.empty() ? item.key() : prefix + "." + item.key(), out);
  } else {
    out[prefix] = j;
  }
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> capture_rng_states() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("cpu", at::detail::getDefaultCPUGenerator().get_state());
  if (at::hasCUDA()) {
    const int n = static_cast<int>(at::getNumGPUs());
    for (int i = 0; i < n; ++i)
      out.emplace_back("cuda:" + std::to_string(i), at::cuda::detail::getDefaultCUDAGenerator(i).get_state());
  }
  return out;
}

void restore_rng_states(const std::vector<std::pair<std::string, at::Tensor>>& states) {
  for (const auto& [name, state] : states) {
    if (name == "cpu") {
      auto gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(state);
    } else if (name.rfind("cuda:", 0) == 0 && at::hasCUDA()) {
      const int i = std::stoi(name.substr(5));
      if (i < static_cast<int>(at::getNumGPUs())) {
        auto gen = at::cuda::detail::getDefaultCUDAGenerator(i);
        gen.set_state(state);
      }
    }
  }
}

std::string checkpoint_tmp_dir(const std::string& output_dir, int64_t step, int64_t pid) {
  return files::join(output_dir, ".checkpoint-" + std::to_string(step) + ".tmp-" + std::to_string(pid));
}

void begin_checkpoint_dir(const std::string& tmp_dir) {
  files::remove_tree(tmp_dir);
  files::make_dirs(tmp_dir);
}

std::string optimizer_shard_file(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "optimizer-shard-%05d-of-%05d.safetensors", rank, world);
  return buf;
}

void write_optimizer_shard(const std::string& tmp_dir, int rank, int world,
                           const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  const std::string p = files::join(tmp_dir, optimizer_shard_file(rank, world));
  save_safetensors(p, tensors, {{"format", "qlora-train"}, {"rank", std::to_string(rank)}, {"world_size", std::to_string(world)}});
  files::sync_path(p);
}

std::string save_checkpoint(const std::string& output_dir, const CheckpointContents& c,
                            const std::function<void(const std::string&)>& write_adapter, int64_t keep_last,
                            int64_t tmp_pid) {
  const std::string name = "checkpoint-" + std::to_string(c.state.step);
  const std::string final_dir = files::join(output_dir, name);
  const std::string tmp = checkpoint_tmp_dir(output_dir, c.state.step, tmp_pid < 0 ? ::getpid() : tmp_pid);
  if (c.optimizer_shards > 0) {
    for (int r = 0; r < c.optimizer_shards; ++r)
      if (!files::exists(files::join(tmp, optimizer_shard_file(r, c.optimizer_shards))))
        fail_at(ErrorKind::Io, files::join(tmp, optimizer_shard_file(r, c.optimizer_shards)),
                "rank " + std::to_string(r) + "'s optimizer shard was not written");
  } else {
    begin_checkpoint_dir(tmp);
  }
  // A save that fails part-way (a full disk) takes its partial directory with it: the space comes back and the next
  // --resume auto finds nothing to skip.
  files::RemoveUnlessKept cleanup(tmp);
  write_adapter(tmp);
  test_delay();
  if (c.optimizer_shards == 0)
    save_safetensors(files::join(tmp, "optimizer.safetensors"), c.optimizer, {{"format", "qlora-train"}});
  test_delay();
  save_safetensors(files::join(tmp, "rng.safetensors"), c.rng, {{"format", "qlora-train"}});
  // Every file, also inside subdirectories (a full fine-tuning checkpoint's model/), by its relative path.
  Json manifest = Json::object();
  std::function<void(const std::string&)> add = [&](const std::string& rel) {
    const std::string p = files::join(tmp, rel);
    if (files::is_dir(p)) {
      for (const auto& f : files::list_dir(p)) add(files::join(rel, f));
      files::sync_path(p);
      return;
    }
    files::sync_path(p);
    manifest[rel] = {{"bytes", files::file_size(p)}, {"fnv1a64", file_hash(p)}};
  };
  for (const auto& f : files::list_dir(tmp)) add(f);
  Json state = {{"format_version", kCheckpointFormatVersion},
                {"step", c.state.step},
                {"data", {{"epoch", c.state.data.epoch}, {"index", c.state.data.index}}},
                {"seed", c.state.seed},
                {"tokens_seen", c.state.tokens_seen},
                {"config", c.state.config},
                {"files", manifest}};
  if (!c.state.train_file_hash.empty()) state["train_file_hash"] = c.state.train_file_hash;
  if (!c.state.reference_hash.empty()) state["reference_hash"] = c.state.reference_hash;
  if (c.state.total_steps > 0) state["total_steps"] = c.state.total_steps;
  if (c.state.loss_scale > 0) {
    state["loss_scale"] = c.state.loss_scale;
    state["loss_scale_good_steps"] = c.state.loss_scale_good_steps;
  }
  if (c.state.optimizer_steps >= 0) state["optimizer_steps"] = c.state.optimizer_steps;
  if (c.state.train_records >= 0) state["train_records"] = c.state.train_records;
  if (c.optimizer_shards > 0) state["optimizer_shards"] = c.optimizer_shards;
  test_delay();
  files::write_file_atomically(files::join(tmp, kStateFile), state.dump(2) + "\n");
  // The marker also holds the state file's hash (the manifest inside it covers every other file).
  files::write_file_atomically(files::join(tmp, kComplete), name + "\n" + kStateFile + " fnv1a64 " +
                                                     file_hash(files::join(tmp, kStateFile)) + "\n");
  files::sync_path(tmp);
  // Replace a checkpoint of the same step (a resumed run saving again) only once the new one is complete, and in one
  // step: moved aside first, it stayed aside when the second rename failed (or the process died between the two),
  // named as a killed save's partial directory, and the next save removed it.
  const std::string old = files::replace_path(tmp, final_dir, tmp + ".old");
  cleanup.keep();
  files::sync_path(output_dir);
  // The new checkpoint is complete: what cannot be removed now (the replaced one, old checkpoints past keep_last,
  // partial ones of saves that were killed) is warned about, not an error of the run.
  auto remove_or_warn = [&](const std::string& path) {
    try {
      files::remove_tree(path);
    } catch (const Error& e) {
      log::warn(std::string("could not remove ") + path + " (" + e.what() + "); the run goes on");
    }
  };
  if (!old.empty()) remove_or_warn(old);
  for (const auto& f : files::list_dir(output_dir))
    if (f.rfind(".checkpoint-", 0) == 0) remove_or_warn(files::join(output_dir, f));  // saves that were killed

  std::vector<std::pair<int64_t, std::string>> complete;
  for (const auto& f : files::list_dir(output_dir)) {
    int64_t s = checkpoint_step(f);
    if (s >= 0 && files::exists(files::join(files::join(output_dir, f), kComplete))) complete.emplace_back(s, f);
  }
  std::sort(complete.begin(), complete.end());
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < complete.size(); ++i) {
    if (complete[i].second == name) continue;
    remove_or_warn(files::join(output_dir, complete[i].second));
  }
  return final_dir;
}

CheckpointContents load_checkpoint(const std::string& dir) {
  if (!files::is_dir(dir)) fail_at(ErrorKind::Checkpoint, dir, "checkpoint directory not found");
  if (!files::exists(files::join(dir, kComplete)))
    fail_at(ErrorKind::Checkpoint, dir,
            files::exists(files::join(dir, kStateFile))
                ? "incomplete checkpoint (no COMPLETE marker: the save was interrupted)"
                : "not a checkpoint directory (no " + std::string(kStateFile) + ", no COMPLETE marker; a run's "
                  "checkpoints are its output_dir/checkpoint-N)");
  const std::string state_path = files::join(dir, kStateFile);
  {
    // COMPLETE's "trainer_state.json fnv1a64 HASH" line (checkpoints of earlier versions have none).
    const std::string marker = files::read_file(files::join(dir, kComplete));
    const std::string tag = std::string(kStateFile) + " fnv1a64 ";
    if (const size_t at = marker.find(tag); at != std::string::npos) {
      const size_t from = at + tag.size();
      const std::string want = marker.substr(from, marker.find('\n', from) - from);
      if (!files::exists(state_path)) fail_at(ErrorKind::Checkpoint, state_path, "missing from the checkpoint");
      if (file_hash(state_path) != want)
        fail_at(ErrorKind::Checkpoint, state_path, "checksum mismatch with the COMPLETE marker (the file is corrupt or was edited)");
    }
  }
  Json state = read_json_file(state_path, ErrorKind::Checkpoint);
  JsonReader r{state, state_path, ErrorKind::Checkpoint};
  if (r.get_int("format_version") != kCheckpointFormatVersion)
    fail_key(ErrorKind::Checkpoint, state_path, "format_version",
             "version " + std::to_string(r.get_int("format_version")) + " is not the supported " +
                 std::to_string(kCheckpointFormatVersion));
  const Json& manifest = r.require("files");
  if (!manifest.is_object()) fail_key(ErrorKind::Checkpoint, state_path, "files", "must be a JSON object");
  for (const auto& item : manifest.items()) {
    const std::string& rel = item.key();
    if (rel.empty() || rel[0] == '/' || ("/" + rel + "/").find("/../") != std::string::npos)
      fail_key(ErrorKind::Checkpoint, state_path, "files." + rel, "is not a path inside the checkpoint");
    const Json& v = item.value();
    if (!v.is_object() || !v.contains("bytes") || !v["bytes"].is_number_integer() || !v.contains("fnv1a64") ||
        !v["fnv1a64"].is_string())
      fail_key(ErrorKind::Checkpoint, state_path, "files." + rel, "expected {\"bytes\": integer, \"fnv1a64\": string}");
    const std::string p = files::join(dir, rel);
    if (!files::exists(p)) fail_at(ErrorKind::Checkpoint, p, "missing from the checkpoint");
    const int64_t want = item.value().at("bytes").get<int64_t>();
    const int64_t have = files::file_size(p);
    if (have != want)
      fail_at(ErrorKind::Checkpoint, p, "is " + std::to_string(have) + " bytes, expected " + std::to_string(want) + " (truncated?)");
    if (file_hash(p) != item.value().at("fnv1a64").get<std::string>())
      fail_at(ErrorKind::Checkpoint, p, "checksum mismatch (the file is corrupt)");
  }
  CheckpointContents c;
  c.state.step = r.get_int("step");
  if (c.state.step < 0 || (checkpoint_step(files::base_name(dir)) >= 0 && checkpoint_step(files::base_name(dir)) != c.state.step))
    fail_key(ErrorKind::Checkpoint, state_path, "step",
             std::to_string(c.state.step) + " does not match the checkpoint (" + files::base_name(dir) + ")");
  const Json& data = r.require("data");
  c.state.data.epoch = data.at("epoch").get<int64_t>();
  c.state.data.index = data.at("index").get<int64_t>();
  c.state.seed = state.at("seed").get<uint64_t>();
  c.state.tokens_seen = r.get_int("tokens_seen", 0);
  c.state.config = r.require("config");
  c.state.train_file_hash = r.get_string("train_file_hash", "");
  c.state.reference_hash = r.get_string("reference_hash", "");
  c.state.total_steps = r.get_int("total_steps", 0);
  c.state.loss_scale = state.contains("loss_scale") && state.at("loss_scale").is_number() ? state.at("loss_scale").get<double>() : 0.0;
  c.state.loss_scale_good_steps = r.get_int("loss_scale_good_steps", 0);
  c.state.optimizer_steps = r.get_int("optimizer_steps", -1);
  c.state.train_records = r.get_int("train_records", -1);
  c.optimizer_shards = static_cast<int>(r.get_int("optimizer_shards", 0));
  auto read = [&](const std::string& f, std::vector<std::pair<std::string, at::Tensor>>& dst) {
    const std::string p = files::join(dir, f);
    if (!manifest.contains(f)) fail_at(ErrorKind::Checkpoint, p, "missing from the checkpoint's manifest");
    SafetensorsFile file(p, ErrorKind::Checkpoint);
    for (const auto& t : file.tensors()) dst.emplace_back(t.name, file.view(t.name).clone());
  };
  if (c.optimizer_shards > 0) {
    c.optimizer_shards_by_rank.resize(static_cast<size_t>(c.optimizer_shards));
    for (int k = 0; k < c.optimizer_shards; ++k)
      read(optimizer_shard_file(k, c.optimizer_shards), c.optimizer_shards_by_rank[static_cast<size_t>(k)]);
  } else {
    read("optimizer.safetensors", c.optimizer);
  }
  read("rng.safetensors", c.rng);
  return c;
}

std::optional<std::string> find_latest_checkpoint(const std::string& output_dir) {
  if (!files::is_dir(output_dir)) return std::nullopt;
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& f : files::list_dir(output_dir)) {
    if (f.rfind(".checkpoint-", 0) == 0)
      log::warn_rank0("ignoring the incomplete checkpoint " + files::join(output_dir, f) + " (a save that was interrupted)");
    int64_t s = checkpoint_step(f);
    if (s >= 0) found.emplace_back(s, files::join(output_dir, f));
  }
  std::sort(found.rbegin(), found.rend());
  for (const auto& [step, path] : found) {
    try {
      load_checkpoint(path);
      return path;
    } catch (const Error& e) {
      log::warn_rank0(std::string("ignoring checkpoint ") + path + ": " + e.what());
    }
  }
  return std::nullopt;
}

std::vector<std::string> set_aside_checkpoints_after(const std::string& output_dir, int64_t step) {
  std::vector<std::string> moved;
  if (!files::is_dir(output_dir)) return moved;
  for (const auto& f : files::list_dir(output_dir)) {
    if (checkpoint_step(f) <= step) continue;
    std::string to = f + ".abandoned";
    for (int i = 2; files::exists(files::join(output_dir, to)); ++i) to = f + ".abandoned-" + std::to_string(i);
    files::rename_path(files::join(output_dir, f), files::join(output_dir, to));
    moved.push_back(files::join(output_dir, to));
  }
  if (!moved.empty()) files::sync_path(output_dir);
  return moved;
}

std::string train_file_hash(const std::string& path) { return file_hash(path); }

std::string train_files_hash(const std::vector<std::string>& paths) {
  std::string out;
  for (const auto& p : paths) out += (out.empty() ? "" : "+") + file_hash(p);
  return out;
}

void check_resume_progress(const TrainerState& saved, const TrainerState& current, bool length_matters,
                           bool allow_changes, const std::string& checkpoint_dir, const std::string& config_file) {
  const std::string steps_key = current.config.contains("train") && current.config["train"].contains("steps") &&
                                        current.config["train"]["steps"] != 0
                                    ? "train.steps"
                                    : "train.epochs";
  if (current.total_steps < saved.step)
    fail_key(ErrorKind::Config, config_file, steps_key,
             "gives " + std::to_string(current.total_steps) + " steps, fewer than the " + std::to_string(saved.step) +
                 " that " + checkpoint_dir + " has done; ask for at least " + std::to_string(saved.step));
  std::vector<std::string> changed;
  if (length_matters && saved.total_steps > 0 && saved.total_steps != current.total_steps)
    changed.push_back("the schedule length (" + steps_key + "): " + std::to_string(saved.total_steps) + " -> " +
                      std::to_string(current.total_steps) + " steps, so the learning rate would jump");
  if (!saved.train_file_hash.empty() && saved.train_file_hash != current.train_file_hash)
    changed.push_back("data.train_file's content (hash " + saved.train_file_hash + " -> " + current.train_file_hash +
                      "), so the data order and any held-out split would differ");
  else if (saved.train_records >= 0 && current.train_records >= 0 && saved.train_records != current.train_records)
    changed.push_back("the training records as loaded (" + std::to_string(saved.train_records) + " -> " +
                      std::to_string(current.train_records) + ": data settings such as data.max_seq_len or "
                      "data.truncation), so the data order would differ");
  else if (saved.train_records < 0 && current.records_left_out > 0)
    changed.push_back("the training records as loaded: this version leaves out the " +
                      std::to_string(current.records_left_out) + " record(s) with no target token that the checkpoint's "
                      "version counted, so the data position points elsewhere");
  if (saved.reference_hash != current.reference_hash)
    changed.push_back("DPO's reference, lora.init_from's adapter file (hash " +
                      (saved.reference_hash.empty() ? std::string("none") : saved.reference_hash) + " -> " +
                      (current.reference_hash.empty() ? std::string("none") : current.reference_hash) +
                      "), so the loss would compare with another model");
  if (changed.empty()) return;
  std::string what;
  for (const auto& c : changed) what += (what.empty() ? "" : "; ") + c;
  if (allow_changes) {
    log::warn_rank0("resuming " + checkpoint_dir + " with changes (--resume-allow-changes): " + what);
    return;
  }
  fail_at(ErrorKind::Checkpoint, checkpoint_dir,
          "cannot resume: " + what + "; pass --resume-allow-changes to resume anyway");
}

void check_resume_compatible(const Json& saved, const Json& current, const std::string& checkpoint_dir,
                             bool allow_changes) {
  // The memory settings (micro-batch, the execution plan's train.memory) change how a step is computed, not what it
  // computes: a run stopped by out-of-memory resumes with them lowered. The train.* speed keys of earlier versions
  // (now train.memory's) may appear in a checkpoint's config and not in the current one.
  static const std::vector<std::string> kMayChange = {"train.steps",      "train.epochs",  "train.log_every",
                                                      "train.eval_every", "train.early_stopping_patience", "train.micro_batch_size", "train.memory",
                                                      "train.grad_checkpointing", "train.offload_activations", "train.mlp_chunk_tokens", "train.attention", "train.keep_attention", "train.fuse_projections", "train.keep_dequantized", "train.fuse_lora_swiglu", "train.lora_b_in_gemm", "train.keep_qkv", "train.keep_residual",
                                                      "train.shard", "train.shard_embeddings", "train.collective_timeout_s",
                                                      "optim.name",  // the moments are converted (AdamW::load_state)
                                                      "checkpoint",       "logging",          "output_dir"};
  // Where files are: a run moved to another machine or directory resumes with --resume-allow-changes (the training
  // file's content is checked by its hash in check_resume_progress; the model's is not).
  static const std::vector<std::string> kPaths = {"model.path", "data.train_file", "data.eval_file",
                                                  "eval.exact_match_file", "lora.init_from"};
  auto may_change = [](const std::string& key) {
    for (const auto& k : kMayChange)
      if (key == k || key.rfind(k + ".", 0) == 0) return true;
    return false;
  };
  auto is_path = [](const std::string& key) { return std::find(kPaths.begin(), kPaths.end(), key) != kPaths.end(); };
  std::map<std::string, Json> a, b;
  flatten(saved, "", a);
  flatten(current, "", b);
  std::vector<std::string> differ, moved;
  for (const auto& [k, v] : a)
    if (!may_change(k) && (!b.count(k) || b[k] != v))
      (is_path(k) && b.count(k) ? moved : differ).push_back(k + " (" + v.dump() + " -> " + (b.count(k) ? b[k].dump() : "absent") + ")");
  for (const auto& [k, v] : b)
    if (!may_change(k) && !a.count(k)) differ.push_back(k + " (absent -> " + v.dump() + ")");
  const auto join = [](const std::vector<std::string>& items) {
    std::string out;
    for (const auto& d : items) out += (out.empty() ? "" : "; ") + d;
    return out;
  };
  if (differ.empty() && moved.empty()) return;
  if (differ.empty() && allow_changes) {
    log::warn_rank0("resuming " + checkpoint_dir + " with files named by other paths (--resume-allow-changes): " + join(moved) +
              ". data.train_file's content is checked by its hash; the model's is not: it must hold the same weights");
    return;
  }
  std::string msg = differ.empty() ? "cannot resume: the run's files are named by other paths: " + join(moved) +
                                         " (pass --resume-allow-changes to resume with the files where they are now)"
                                   : "cannot resume: the run config differs in keys that must not change: " + join(differ);
  if (!differ.empty() && !moved.empty()) msg += "; and its files are named by other paths: " + join(moved);
  fail_at(ErrorKind::Checkpoint, checkpoint_dir, msg);
}

std::vector<std::pair<std::string, at::Tensor>> optimizer_state_for(
    const CheckpointContents& ck, const std::vector<std::pair<std::string, at::Tensor>>& params,
    const Parallel& parallel, const std::string& dir) {
  // The whole (row-padded, when it was sharded) tensor of each name: the shards of all ranks in rank order.
  std::map<std::string, std::vector<at::Tensor>> parts;
  if (ck.optimizer_shards > 0) {
    for (const auto& shard : ck.optimizer_shards_by_rank)
      for (const auto& [name, t] : shard) parts[name].push_back(t);
  } else {
    for (const auto& [name, t] : ck.optimizer) parts[name].push_back(t);
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto [part, world] = parallel.optimizer_part();
  const int saved_parts = std::max(1, ck.optimizer_shards);
  bool requantized = false;
  for (const auto& [name, p] : params) {
    const int64_t rows = parallel.full_rows(name, p);
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string key = name + suffix;
      std::vector<at::Tensor> whole;  // the state's parts in fp32
      auto codes = parts.find(key + ".q8"), absmax = parts.find(key + ".absmax");
      if (codes != parts.end() && absmax != parts.end()) {
        // 8-bit moments (optim.name adamw_8bit): this rank's part as saved where the checkpoint's layout is this
        // run's (bit for bit); else each part dequantized (its blocks are of its own flattened tensor) and
        // re-sliced as fp32 moments are, which the optimizer quantizes again.
        if (codes->second.size() != absmax->second.size())
          fail_at(ErrorKind::Checkpoint, dir, "optimizer state for '" + key + "' has codes and absmax of other parts");
        for (size_t k = 0; k < codes->second.size(); ++k)
          if (absmax->second[k].numel() != q8_blocks(codes->second[k].numel()) ||
              codes->second[k].scalar_type() != at::kByte)
            fail_at(ErrorKind::Checkpoint, dir, "optimizer state for '" + key + "' (8-bit) has " +
                                                    std::to_string(absmax->second[k].numel()) + " block scales for " +
                                                    std::to_string(codes->second[k].numel()) + " codes");
        if (saved_parts == world && static_cast<int>(codes->second.size()) == world &&
            codes->second[static_cast<size_t>(part)].sizes() == p.sizes()) {
          out.emplace_back(key + ".q8", codes->second[static_cast<size_t>(part)].to(p.device()));
          out.emplace_back(key + ".absmax", absmax->second[static_cast<size_t>(part)].to(p.device()));
          continue;
        }
        for (size_t k = 0; k < codes->second.size(); ++k)
          whole.push_back(dequantize_blockwise({codes->second[k], absmax->second[k].reshape({-1})},
                                               /*is_signed=*/std::string(suffix) == ".exp_avg"));
        requantized = true;
      } else {
        auto it = parts.find(key);
        if (it == parts.end()) fail_at(ErrorKind::Checkpoint, dir, "optimizer state for '" + key + "' is missing");
        whole = it->second;
      }
      at::Tensor full = whole.size() == 1 ? whole[0] : at::cat(whole, 0);
      if (full.dim() < 1 || full.size(0) < rows)
        fail_at(ErrorKind::Checkpoint, dir, "optimizer state for '" + key + "' has " +
                                                (full.dim() ? std::to_string(full.size(0)) : "no") + " rows, expected " +
                                                std::to_string(rows));
      full = full.narrow(0, 0, rows).to(p.device());
      out.emplace_back(key, parallel.shard_of(name, full));
    }
  }
  if (requantized)
    log::warn_rank0("the 8-bit optimizer state of " + dir + " was saved as " + std::to_string(saved_parts) +
                    " part(s) and is re-quantized for this run's " + std::to_string(world) +
                    ": the run resumes, not bit for bit as it would on the same layout");
  return out;
}

}  // namespace qt
