"""Out of device memory in a training step (CPU, through the QT_TEST_OOM_AT_STEP hook, which throws torch's
c10::OutOfMemoryError as CUDA's caching allocator does): exit code 9 (Device), one message naming the step, the
micro-batch shape and the settings that lower memory, and the checkpoint from before intact (a resume from it
ends as a run that never failed). Out of memory before the first step completes (QT_TEST_OOM_PLANS=N[:load]: the
first N plans fail in their first step, or as their model loads): the run starts again under a leaner plan and ends
as a run started under that plan would; after three leaner plans, or with train.memory.replan_on_oom false, it stops
with exit 9; pinned host memory running out stops at once. The micro-batch is the plan's: under a budget the whole batch does not fit, micro-batches that train as
a run told them."""
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

def plan_records(name):
    return [j for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines()) if "plan" in j]


def check_replan():
    """The demo's model and data (32 x 128 tokens a step: the activations are a fifth of the footprint, so that a
    plan 5% leaner exists; the tiny model's footprint is its constant terms)."""
    demo = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo"
    memory = lambda budget, **kw: {"memory": {"gpu_memory_gib": budget, **kw}}

    def conf(name, mem):
        cfg = {"output_dir": str(TMP / name), "model": {"path": str(demo / "base"), "quant": "nf4", "device": "cpu"},
               "lora": {"r": 8, "alpha": 16},
               "data": {"train_file": str(demo / "task_train.jsonl"), "format": "chat", "chat_template": "llama2",
                        "max_seq_len": 128},
               "train": {"steps": 2, "batch_size": 32, "seed": 3, "log_every": 1, **mem}, "optim": {"lr": 2e-3},
               "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
        (TMP / f"{name}.json").write_text(json.dumps(cfg))
        return TMP / f"{name}.json"

    p = train(conf("replan", memory(100.0)), env={"QT_TEST_OOM_PLANS": "1"})
    warn = [l for l in p.stderr.splitlines() if "Starting again under a leaner plan" in l]
    check(p.returncode == 0 and len(warn) == 1 and "step 1: out of GPU memory under the plan" in warn[0],
          f"out of memory in step 1: one warning, then the run completes under a leaner plan (exit {p.returncode}) "
          f"{warn} {p.stderr[-600:] if p.returncode else ''}")
    if p.returncode != 0:
        return
    (rec,) = plan_records("replan")
    (first,) = rec.get("out_of_memory_under", [None])
    check(first is not None and first["budget_gib"] == 100.0 and "out of GPU memory" in first["error"]
          and first["plan"] != "" and rec["plan"]["budget_gib"] < first["predicted_gib"],
          f"metrics.jsonl's plan record names the plan that ran out and a budget below its prediction: {rec}")
    # The run is the one started under the leaner plan's budget: the same plan, byte-identical adapter.
    budget = min(100.0, first["predicted_gib"]) * 0.95
    check(abs(rec["plan"]["budget_gib"] - budget) < 1e-3, f"the budget is 5% under the plan that ran out: {budget}")
    p = train(conf("direct", memory(budget)))
    check(p.returncode == 0, f"the run started at that budget completes (exit {p.returncode})")
    if p.returncode == 0:
        (direct,) = plan_records("direct")
        a, b = (TMP / n / "adapter" / "adapter_model.safetensors" for n in ("replan", "direct"))
        check(direct["plan"]["predicted_gib"] == rec["plan"]["predicted_gib"] and a.read_bytes() == b.read_bytes(),
              "... under the same plan, with a byte-identical adapter (the seed, the data and the model started anew)")
    # Out of memory while the model loads (a library's allocation, the weights): the same, before the first step.
    p = train(conf("replan_load", memory(100.0)), env={"QT_TEST_OOM_PLANS": "1:load"})
    warn = [l for l in p.stderr.splitlines() if "Starting again under a leaner plan" in l]
    check(p.returncode == 0 and len(warn) == 1 and "before the first step: out of GPU memory under the plan" in warn[0],
          f"out of memory as the model loads: one warning, then the run completes under a leaner plan "
          f"(exit {p.returncode}) {warn} {p.stderr[-400:] if p.returncode else ''}")
    if p.returncode == 0:
        a, b = (TMP / n / "adapter" / "adapter_model.safetensors" for n in ("replan_load", "direct"))
        check(a.read_bytes() == b.read_bytes(), "... with the adapter of the run started at that budget")
    # The micro-batch is the plan's (train.micro_batch_size 0): a budget the whole batch of 32 rows does not fit
    # without checkpointing takes micro-batches of 16 (2 a step), and trains as a run told micro-batches of 16 does.
    p = train(conf("micro_auto", memory(0.3)))
    rec = plan_records("micro_auto") if p.returncode == 0 else [{}]
    check(p.returncode == 0 and rec[0].get("micro_batch") == 16 and "2 micro-batch(es) of 16 per rank" in p.stderr,
          f"0.3 GiB: the plan takes micro-batches of 16 (exit {p.returncode}, {rec[0].get('micro_batch')}) "
          f"{p.stderr[-300:] if p.returncode else ''}")
    q = train(conf("micro_16", {"micro_batch_size": 16}))
    if p.returncode == 0 and q.returncode == 0:
        a, b = (TMP / n / "adapter" / "adapter_model.safetensors" for n in ("micro_auto", "micro_16"))
        check(a.read_bytes() == b.read_bytes(), "... the adapter of the run told micro-batches of 16")
    # Every plan out of memory: three leaner plans, then exit 9 naming them.
    p = train(conf("replan3", memory(100.0)), env={"QT_TEST_OOM_PLANS": "4"})
    last = (p.stderr.strip().splitlines() or [""])[-1]
    warns = sum("Starting again under a leaner plan" in l for l in p.stderr.splitlines())
    check(p.returncode == 9 and "out of GPU memory" in last and warns <= 3 and
          ("3 plan(s) before this one ran out of memory too" in last or "No leaner plan fits" in last),
          f"with every plan out of memory: exit 9 after at most three leaner plans ({warns}): {last}")
    # Pinned host memory that runs out (the offload's pool) is not the device's: a leaner device plan may pin more
    # of the host, so the run stops with exit 9 naming it, without starting again.
    p = train(conf("pinned", memory(100.0)), env={"QT_TEST_OOM_AT_STEP": "1:pinned"})
    last = (p.stderr.strip().splitlines() or [""])[-1]
    check(p.returncode == 9 and "pinned host memory" in last and "Starting again" not in p.stderr,
          f"pinned host memory out in step 1: exit 9 at once, no leaner plan (exit {p.returncode}): {last}")
    p = train(conf("noreplan", memory(100.0, replan_on_oom=False)), env={"QT_TEST_OOM_PLANS": "1"})
    last = (p.stderr.strip().splitlines() or [""])[-1]
    check(p.returncode == 9 and "step 1: out of GPU memory" in last and "Starting again" not in p.stderr,
          f"train.memory.replan_on_oom false: exit 9 at once: {last}")


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
    # Without a checkpoint at step 2, step 2 is still to be read back (steps overlap) when step 3 runs out of memory:
    # its log line is written before the error ends the run.
    cfg_late = tiny_cpu_config(TMP, "oom_late", {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "seed": 3,
                                                 "log_every": 1}, {"lr": 2e-3}, {"every": 4, "keep_last": 3})
    p = train(cfg_late, env={"QT_TEST_OOM_AT_STEP": "3"})
    late = losses("oom_late")
    check(p.returncode == 9 and sorted(late) == [1, 2] and late[2] == losses("ref")[2],
          f"out of memory in step 3 with step 2 not yet read back: step 2 is logged first (exit {p.returncode}, "
          f"steps logged {sorted(late)})")
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
    check_replan()
    finish("out-of-memory checks")

if __name__ == "__main__":
    main()
