"""Out of device memory in a training step (CPU, through the QT_TEST_OOM_AT_STEP hook, which throws torch's
c10::OutOfMemoryError as CUDA's caching allocator does): exit code 9 (Device), one message naming the step, the
micro-batch shape and the settings that lower memory, and the checkpoint from before intact (a resume from it
ends as a run that never failed)."""
import json, os, pathlib, shutil, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))

from checks import check, finish, ref_then_failing_run, run_binary, tiny_cpu_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_oom_"))

def write_config(name):
    return tiny_cpu_config(TMP, name, {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "seed": 3, "log_every": 1},
                           {"lr": 2e-3}, {"every": 2, "keep_last": 3})

def losses(name):
    out = {}
    for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines()):
        if "loss" in j and "step" in j:
            out[j["step"]] = j["loss"]
    return out


def train(config, *extra, env=None):
    return run_binary(BIN, config, *extra, env=env)

def main():
    p, err, last = ref_then_failing_run(BIN, TMP, write_config, "oom", 48, {"QT_TEST_OOM_AT_STEP": "3"})
    cfg = TMP / "oom.json"
    check(p.returncode == 9, f"an out-of-memory error exits 9 (Device), got {p.returncode}")
    for part in ("step 3", "out of GPU memory", "2 x 32 tokens", "train.micro_batch_size", "data.max_seq_len",
                 "train.memory.gpu_memory_gib", "last checkpoint", str(TMP / "oom")):
        check(part in last, f"the message names '{part}'")
    check(sum("out of GPU memory" in l for l in err) == 1, "one message, said once")
    check((TMP / "oom" / "checkpoint-2" / "COMPLETE").exists() and not (TMP / "oom" / "checkpoint-4").exists(),
          "checkpoint-2 is complete, nothing after it")
    # cuBLAS's allocation failure is a plain c10::Error from a status check: the same message and exit code.
    p = train(cfg, "--resume", "auto", env={"QT_TEST_OOM_AT_STEP": "4:cublas"})
    last = (p.stderr.strip().splitlines() or [""])[-1]
    check(p.returncode == 9 and "step 4: out of GPU memory" in last and "CUBLAS_STATUS_ALLOC_FAILED" in last,
          f"cuBLAS's allocation failure is reported the same way (exit {p.returncode}): {last}")
    check((TMP / "oom" / "checkpoint-2" / "COMPLETE").exists() and not (TMP / "oom" / "checkpoint-4").exists(),
          "checkpoint-2 is still the newest")
    # A copy resumed with the memory settings changed (micro-batches of 1, no activation checkpointing): they change
    # how a step is computed, not what, so its losses are the reference's to fp32 rounding of the accumulation.
    shutil.copytree(TMP / "oom", TMP / "oom2")
    p = train(write_config("oom2"), "--resume", "auto", "--set", "train.micro_batch_size=1",
              "--set", "train.memory.checkpointing=false")
    check(p.returncode == 0 and "checkpoint-2" in p.stderr,
          f"a resume may change the memory settings (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    if p.returncode == 0:
        ref, got = losses("ref"), losses("oom2")
        check(all(abs(got[s] - ref[s]) / ref[s] < 1e-5 for s in (3, 4)), f"with them the losses go on as before {got} vs {ref}")
    p = train(cfg, "--resume", "auto")
    check(p.returncode == 0 and "checkpoint-2" in p.stderr, f"the run resumes from checkpoint-2 (exit {p.returncode})")
    a = (TMP / "oom" / "adapter" / "adapter_model.safetensors")
    check(a.exists() and a.read_bytes() == (TMP / "ref" / "adapter" / "adapter_model.safetensors").read_bytes(),
          "resumed after the error, the run ends with the adapter of a run that never failed")
    finish("out-of-memory checks")

if __name__ == "__main__":
    main()
