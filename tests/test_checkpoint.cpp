// Checkpoint files: round trip, corruption detection, pruning, resume compatibility.
#include <ATen/ATen.h>

#include <fstream>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/safetensors.h"
#include "lib/train/checkpoint.h"
#include "tests/catch.h"
#include "tests/test_util.h"

namespace {

qt::CheckpointContents sample_contents(int64_t step) {
  qt::CheckpointContents c;
  c.state.step = step;
  c.state.data = {2, 17};
  c.state.seed = 1234;
  c.state.tokens_seen = 999;
  c.state.config = {{"model", {{"path", "m"}}}, {"train", {{"steps", 10}}}};
  c.optimizer = {{"a.exp_avg", at::randn({3, 4})}, {"a.exp_avg_sq", at::rand({3, 4})}};
  c.rng = qt::capture_rng_states();
  return c;
}

void fake_adapter(const std::string& dir) {
  qt::save_safetensors(dir + "/adapter_model.safetensors", {{"x.lora_A.weight", at::randn({2, 5})}});
  std::ofstream(dir + "/adapter_config.json") << "{\"peft_type\": \"LORA\"}\n";
}

template <typename F>
void require_checkpoint_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const qt::Error& e) {
    INFO(e.what());
    CHECK(e.kind() == qt::ErrorKind::Checkpoint);
    for (const auto& n : needles) CHECK(std::string(e.what()).find(n) != std::string::npos);
    return;
  }
  FAIL("expected a checkpoint error");
}

}  // namespace

TEST_CASE("checkpoint round trip keeps step data position optimizer state and RNG", "[checkpoint]") {
  const std::string out = qt::test::scratch_dir("ckpt_roundtrip");
  qt::CheckpointContents c = sample_contents(5);
  std::string path = qt::save_checkpoint(out, c, fake_adapter, 3);
  CHECK(path == out + "/checkpoint-5");
  CHECK(qt::files::exists(path + "/COMPLETE"));
  CHECK(qt::files::exists(path + "/adapter_model.safetensors"));
  qt::CheckpointContents back = qt::load_checkpoint(path);
  CHECK(back.state.step == 5);
  CHECK(back.state.data.epoch == 2);
  CHECK(back.state.data.index == 17);
  CHECK(back.state.seed == 1234);
  CHECK(back.state.tokens_seen == 999);
  CHECK(back.state.config == c.state.config);
  REQUIRE(back.optimizer.size() == 2);
  CHECK(at::equal(back.optimizer[0].second, c.optimizer[0].second));
  // Restoring the RNG state replays the same random numbers.
  qt::restore_rng_states(back.rng);
  at::Tensor r1 = at::randn({8});
  qt::restore_rng_states(back.rng);
  at::Tensor r2 = at::randn({8});
  CHECK(at::equal(r1, r2));
}

TEST_CASE("corrupt truncated or incomplete checkpoints are reported and skipped by auto resume", "[checkpoint]") {
  const std::string out = qt::test::scratch_dir("ckpt_corrupt");
  qt::save_checkpoint(out, sample_contents(2), fake_adapter, 5);
  qt::save_checkpoint(out, sample_contents(4), fake_adapter, 5);
  REQUIRE(qt::find_latest_checkpoint(out) == out + "/checkpoint-4");
  const std::string opt = out + "/checkpoint-4/optimizer.safetensors";
  SECTION("a flipped bit") {
    std::fstream f(opt, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-5, std::ios::end);
    char c;
    f.get(c);
    f.seekp(-5, std::ios::end);
    f.put(static_cast<char>(c ^ 0x10));
    f.close();
    require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-4"); }, {"optimizer.safetensors", "checksum"});
  }
  SECTION("a truncated file") {
    std::string bytes = qt::files::read_file(opt);
    std::ofstream(opt, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 7);
    require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-4"); }, {"optimizer.safetensors", "truncated"});
  }
  SECTION("no completion marker") {
    qt::files::remove_tree(out + "/checkpoint-4/COMPLETE");
    require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-4"); }, {"checkpoint-4", "incomplete"});
  }
  // Auto resume falls back to the previous complete checkpoint.
  CHECK(qt::find_latest_checkpoint(out) == out + "/checkpoint-2");
  // A directory that was never a checkpoint (a model directory given to --resume) is named as such.
  const std::string other = qt::test::scratch_dir("ckpt_not_one");
  qt::files::make_dirs(other);
  require_checkpoint_error([&] { qt::load_checkpoint(other); }, {"ckpt_not_one", "not a checkpoint directory"});
}

TEST_CASE("keep_last prunes old checkpoints only after the new one is complete", "[checkpoint]") {
  const std::string out = qt::test::scratch_dir("ckpt_prune");
  for (int64_t s : {1, 2, 3, 4}) qt::save_checkpoint(out, sample_contents(s), fake_adapter, 2);
  auto names = qt::files::list_dir(out);
  CHECK(names == std::vector<std::string>{"checkpoint-3", "checkpoint-4"});
  // A failing adapter writer (a full disk, say) leaves the existing checkpoints untouched.
  auto failing = [](const std::string&) { qt::fail(qt::ErrorKind::Io, "simulated write failure (disk full)"); };
  CHECK_THROWS_AS(qt::save_checkpoint(out, sample_contents(5), failing, 2), qt::Error);
  CHECK(qt::find_latest_checkpoint(out) == out + "/checkpoint-4");
  CHECK(qt::files::exists(out + "/checkpoint-3/COMPLETE"));
  // ... and takes its partial directory with it; one a killed save left is removed by the next complete save.
  CHECK(qt::files::list_dir(out) == std::vector<std::string>{"checkpoint-3", "checkpoint-4"});
  qt::files::make_dirs(out + "/.checkpoint-9.tmp-12345");
  qt::save_checkpoint(out, sample_contents(6), fake_adapter, 2);
  CHECK(qt::files::list_dir(out) == std::vector<std::string>{"checkpoint-4", "checkpoint-6"});
  // A directory named past int64's steps (made by hand) is no checkpoint: it was "internal error: stoll" at every
  // save and --resume auto.
  qt::files::make_dirs(out + "/checkpoint-99999999999999999999");
  CHECK(qt::find_latest_checkpoint(out) == out + "/checkpoint-6");
  qt::save_checkpoint(out, sample_contents(7), fake_adapter, 2);
  CHECK(qt::files::list_dir(out) ==
        std::vector<std::string>{"checkpoint-6", "checkpoint-7", "checkpoint-99999999999999999999"});
}

TEST_CASE("a full disk while copying or writing a file is an error naming it and never a shorter file", "[checkpoint]") {
  const std::string dir = qt::test::scratch_dir("files_full");
  const std::string src = dir + "/tokenizer.model";
  std::ofstream(src, std::ios::binary) << std::string(300000, 'x');
  // quantize and export --merge copied tokenizer.model with `out << in.rdbuf()`, which stopped where the disk filled
  // and said nothing: a 20 KB tokenizer.model, an empty tokenizer_config.json, exit 0.
  const std::string msg = qt::test::error_of([&] { qt::files::copy_file(src, "/dev/full"); });
  INFO(msg);
  CHECK(msg.find("/dev/full") != std::string::npos);
  CHECK(msg.find("write failed: No space left on device") != std::string::npos);
  // A file size limit (ulimit -f, its signal ignored) fails a write part-way: write_file_atomically leaves the
  // earlier file as it was and no temporary file beside it.
  const std::string json = dir + "/config.json";
  qt::files::write_file_atomically(json, "{}\n");
  std::string big, copy;
  {
    qt::test::FileSizeLimit limit(4096);
    big = qt::test::error_of([&] { qt::files::write_file_atomically(json, std::string(10000, 'y')); });
    copy = qt::test::error_of([&] { qt::files::copy_file(src, dir + "/copy.model"); });
  }
  INFO(big);
  CHECK(big.find(json + ".tmp: write failed: File too large") != std::string::npos);
  CHECK(qt::files::read_file(json) == "{}\n");
  CHECK(!qt::files::exists(json + ".tmp"));
  INFO(copy);
  CHECK(copy.find("copy.model: write failed: File too large") != std::string::npos);
}

TEST_CASE("a checkpoint saved again at its step takes the old one's place in one step", "[checkpoint]") {
  const std::string out = qt::test::scratch_dir("ckpt_resave");
  qt::save_checkpoint(out, sample_contents(4), fake_adapter, 1);
  qt::CheckpointContents again = sample_contents(4);
  again.state.tokens_seen = 1000;
  qt::save_checkpoint(out, again, fake_adapter, 1);
  CHECK(qt::files::list_dir(out) == std::vector<std::string>{"checkpoint-4"});
  CHECK(qt::load_checkpoint(out + "/checkpoint-4").state.tokens_seen == 1000);
  // The old one was moved aside (.checkpoint-4.tmp-PID.old) before the new one was renamed in: where that rename
  // failed (seen with an injected EIO) or the process died between the two, checkpoint-4 was gone, the aside copy was
  // removed by the next save as a killed save's, and --resume auto went back to an older checkpoint (or none with
  // keep_last 1). replace_path exchanges the two, and where it cannot, leaves `to` as it was.
  const std::string a = out + "/a", b = out + "/b";
  qt::files::make_dirs(a);
  qt::files::make_dirs(b);
  std::ofstream(a + "/x") << "new";
  std::ofstream(b + "/x") << "old";
  const std::string old = qt::files::replace_path(a, b, b + ".aside");
  CHECK(qt::files::read_file(b + "/x") == "new");
  CHECK(qt::files::read_file(old + "/x") == "old");
  CHECK(qt::test::has(qt::test::error_of([&] { qt::files::replace_path(out + "/gone", b, b + ".aside"); }), b));
  CHECK(qt::files::read_file(b + "/x") == "new");
  CHECK(qt::files::replace_path(old, out + "/c", out + "/c.aside").empty());
  CHECK(qt::files::read_file(out + "/c/x") == "old");
}

TEST_CASE("a checkpoint whose trainer_state.json names another step or a file outside it is refused", "[checkpoint]") {
  const std::string out = qt::test::scratch_dir("ckpt_step");
  qt::save_checkpoint(out, sample_contents(3), fake_adapter, 2);
  qt::files::rename_path(out + "/checkpoint-3", out + "/checkpoint-5");
  require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-5"); },
                           {"trainer_state.json", "step", "does not match the checkpoint (checkpoint-5)"});
  qt::files::rename_path(out + "/checkpoint-5", out + "/checkpoint-3");
  const std::string state = out + "/checkpoint-3/trainer_state.json";
  qt::Json j = qt::read_json_file(state, qt::ErrorKind::Checkpoint);
  j["files"]["../../elsewhere.jsonl"] = {{"bytes", 1}, {"fnv1a64", "0"}};
  qt::write_json_file(state, j);
  // The COMPLETE marker holds the state file's hash: an edited trainer_state.json is refused as such.
  require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-3"); },
                           {"trainer_state.json", "checksum mismatch with the COMPLETE marker"});
  // A marker without the hash (checkpoints of earlier versions): the manifest's paths are checked.
  {
    std::ofstream marker(out + "/checkpoint-3/COMPLETE", std::ios::trunc);
    marker << "checkpoint-3\n";
  }
  require_checkpoint_error([&] { qt::load_checkpoint(out + "/checkpoint-3"); },
                           {"trainer_state.json", "../../elsewhere.jsonl", "not a path inside the checkpoint"});
}

TEST_CASE("resume refuses config changes that matter and allows the rest", "[checkpoint]") {
  qt::Json saved = {{"model", {{"path", "m"}}},
                    {"lora", {{"r", 16}}},
                    {"train", {{"steps", 10}, {"batch_size", 8}}},
                    {"logging", {{"level", "info"}}}};
  qt::Json ok = saved;
  ok["train"]["steps"] = 20;
  ok["logging"]["level"] = "debug";
  ok["checkpoint"] = {{"every", 5}};
  CHECK_NOTHROW(qt::check_resume_compatible(saved, ok, "ck"));
  qt::Json bad = saved;
  bad["lora"]["r"] = 32;
  bad["train"]["batch_size"] = 16;
  require_checkpoint_error([&] { qt::check_resume_compatible(saved, bad, "ck"); }, {"lora.r", "train.batch_size"});
  // The model (or a data file) at another path: refused, naming the flag; resumed with it. Other changes are refused
  // with it too.
  qt::Json moved = saved;
  moved["model"]["path"] = "elsewhere/m";
  require_checkpoint_error([&] { qt::check_resume_compatible(saved, moved, "ck"); },
                           {"model.path", "elsewhere/m", "--resume-allow-changes"});
  CHECK_NOTHROW(qt::check_resume_compatible(saved, moved, "ck", /*allow_changes=*/true));
  moved["lora"]["r"] = 32;
  require_checkpoint_error([&] { qt::check_resume_compatible(saved, moved, "ck", true); }, {"lora.r", "model.path"});
}

TEST_CASE("a resume refuses a data position that counts other records", "[checkpoint]") {
  qt::TrainerState saved, now;
  saved.step = 2;
  now.total_steps = saved.total_steps = 10;
  saved.train_file_hash = now.train_file_hash = "abc";
  saved.train_records = now.train_records = 40;
  CHECK_NOTHROW(qt::check_resume_progress(saved, now, true, false, "ck", "run.json"));
  now.train_records = 36;
  require_checkpoint_error([&] { qt::check_resume_progress(saved, now, true, false, "ck", "run.json"); },
                           {"training records", "40 -> 36", "--resume-allow-changes"});
  CHECK_NOTHROW(qt::check_resume_progress(saved, now, true, /*allow_changes=*/true, "ck", "run.json"));
  // A checkpoint of a version that counted the records without a target (no count saved): refused where this run
  // left some out, resumed where it left none out.
  saved.train_records = -1;
  now.records_left_out = 4;
  require_checkpoint_error([&] { qt::check_resume_progress(saved, now, true, false, "ck", "run.json"); },
                           {"4 record(s) with no target token", "data position"});
  now.records_left_out = 0;
  CHECK_NOTHROW(qt::check_resume_progress(saved, now, true, false, "ck", "run.json"));
}
