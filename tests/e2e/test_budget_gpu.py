"""The GPU memory budget as a user meets it (issue 26), on the GPU with the rest of its memory held by another process
(scripts/bench.py's holder): a budget the plan accepts is one the run completes in, within the device memory the plan
claims; a budget the plan refuses (exit 3, naming the figure its leanest plan needs) is one that plan would not fit:
forced onto it (train.memory.gpu_memory_gib set to that figure while the holder leaves less), the run runs out of
memory (and no leaner plan is left to start again under). A run told 8% more than it has completes, under a leaner
plan where the first runs out of memory before its first step (train.memory.replan_on_oom). QT_MEMORY_HISTORY writes
the caching allocator's history, which scripts/memory_history.py reads. Llama-3.2-1B-shaped random NF4 weights,
2 x 1024 tokens, a few steps each."""
import importlib.util, json, os, pathlib, re, subprocess, sys, tempfile

from checks import check, finish

BIN = os.environ["QT_BINARY"]
ROOT = pathlib.Path(__file__).resolve().parents[2]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_budget_gpu_"))
SHAPE, BATCH, SEQ = "llama-3.2-1b", 2, 1024


def bench_script():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "scripts" / "bench.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def leanest_need():
    """The device memory the plan's leanest plan needs for the row (its refusal of a budget too small names it)."""
    p = subprocess.run([BIN, "plan", "--shape", SHAPE, "--batch", str(BATCH), "--seq", str(SEQ), "--gpu-memory-gib",
                        "0.2", "--host-gib", "64"], capture_output=True, text=True)
    m = re.search(r"needs ([0-9.]+) GiB", p.stderr)
    check(p.returncode == 3 and m is not None, f"the plan refuses 0.2 GiB and names what it needs: {p.stderr[-300:]}")
    return float(m.group(1)) if m else None


def main():
    bench = bench_script()
    need = leanest_need()
    if need is None:
        return finish("budget checks on the GPU")
    run = lambda budget, extra=(): bench.run_ours(BIN, TMP, SHAPE, BATCH, SEQ, 3, 1, list(extra), budget)

    # Room above the leanest plan: the plan accepts, the run completes within the budget and near the plan's claim.
    budget = round(need + 1.0, 2)
    r = run(budget)
    plan = r.get("plan") or {}
    claimed = (plan.get("predicted_gib") or {}).get("total")
    check("tok_per_s" in r and claimed is not None and claimed <= budget and not r.get("replans"),
          f"{budget} GiB left free: the run completes with the first plan, claiming {claimed} GiB "
          f"(replans: {r.get('replans')}; {r.get('error', '')[-300:]})")
    if "tok_per_s" in r:
        check(r["device_gib"] <= budget + 0.1, f"... and takes {r['device_gib']} GiB of the device (budget {budget})")
        print(json.dumps({k: r.get(k) for k in ("budget_gib", "tok_per_s", "peak_gib", "device_gib")} | {"claimed": claimed}))

    # Told 8% more than it has: a plan that does not fit runs out of memory before its first step completes, and the
    # run starts again under a leaner plan (train.memory.replan_on_oom), at most twice, and completes.
    told = round(budget * 1.08, 2)
    r = run(budget, [f"train.memory.gpu_memory_gib={told}"])
    plan = r.get("plan") or {}
    claimed = (plan.get("predicted_gib") or {}).get("total")
    # (A first plan that fits although it claims more than is free is a prediction on the safe side: it completes.)
    check("tok_per_s" in r,
          f"{budget} GiB left free, the plan told {told}: completes ({r.get('replans', 0)} plan(s) out of memory first; "
          f"the last claims {claimed} GiB, took {r.get('device_gib')}) {r.get('error', '')[-300:]}")

    # Below the leanest plan: refused before the model loads, naming the figure.
    small = round(0.85 * need, 2)
    r = run(small)
    check(r.get("exit") == 3 and "does not fit" in r.get("error", "") and "needs" in r.get("error", ""),
          f"{small} GiB left free: refused (exit {r.get('exit')}): {r.get('error', '')[-300:]}")
    # ... and indeed too small: the leanest plan forced onto it runs out of device memory.
    told = round(need + 0.05, 2)  # (the figure is rounded to 2 decimals: a little above it)
    r = run(small, [f"train.memory.gpu_memory_gib={told}"])
    err = r.get("error", "")
    check("tok_per_s" not in r and r.get("exit") == 9 and
          any(s in err for s in ("out of memory", "out of GPU memory", "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")),
          f"{small} GiB left free, the plan told it has {told}: out of memory (exit {r.get('exit')}): {err[-300:]}")
    # The caching allocator's history (QT_MEMORY_HISTORY, written after step 1) names what held the memory.
    hist = TMP / "history.pickle"
    env = {**os.environ, "QT_MEMORY_HISTORY": str(hist)}
    p = subprocess.run([BIN, "bench", "--shape", SHAPE, "--batch", str(BATCH), "--seq", str(SEQ), "--steps", "1",
                        "--warmup", "0", "--device", "cuda", "--out", str(TMP / "hist")], capture_output=True, text=True,
                       env=env)
    q = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_history.py"), str(hist)], capture_output=True,
                       text=True) if hist.exists() else None
    check(p.returncode == 0 and q is not None and q.returncode == 0 and "peak (event" in q.stdout and "qt::" in q.stdout,
          f"QT_MEMORY_HISTORY: the allocator's history after step 1, read by scripts/memory_history.py (exit "
          f"{p.returncode}): {(q.stdout[:600] if q else p.stderr[-400:])}")
    finish("budget checks on the GPU")


if __name__ == "__main__":
    main()
