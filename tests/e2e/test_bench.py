"""`qlora-train bench` on the CPU: a model of random weights shaped by a directory's config.json trains for the
warm-up and timed steps on random tokens; the JSON line reports the median step, batch x seq tokens per second
and the model FLOPs per token (checked here against the formula from config.json); MFU and peak memory are null
off the GPU. `bench --generate` times generation through the key / value cache against the uncached path. Bad
arguments end with errors naming them."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_bench_"))


def bench(*args):
    return subprocess.run([BIN, "bench", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def check_context_search():
    """scripts/bench.py --max-context's search on a fake run that completes up to 21,848 tokens (Unsloth's published
    8B limit on 12 GB): doubling, then bisection, to the longest multiple of 1024 below the limit."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_script", pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench.py")
    bench_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_script)
    seen = []
    def run(seq):
        seen.append(seq)
        return dict(seq=seq, tok_per_s=100) if seq <= 21848 else dict(seq=seq, error="out of memory")
    best, tried = bench_script.max_context(run, 2048)
    check(best is not None and best["seq"] == 21504 and len(tried) == len(seen) and seen[:5] == [2048, 4096, 8192, 16384, 32768],
          f"the context search finds the longest 1024-multiple that completes (21,504 of 21,848; probes {seen})")
    best, tried = bench_script.max_context(lambda seq: dict(seq=seq, error="out of memory"), 2048)
    check(best is None and len(tried) == 1, "nothing completing at the row's length: none, after one probe")
    # The table: with Unsloth in three modes at a budget, a line for its best that completed, ours against it.
    row = dict(model="llama-3.1-8b", batch=2, seq=2048)
    results = [dict(row, system="qlora-train", budget_gib=80.0, tok_per_s=17000, peak_gib=33.0, device_gib=34.0,
                    model_flops_per_token=3.2e10),
               dict(row, system="qlora-train", budget_gib=8.0, tok_per_s=11000, peak_gib=6.5, device_gib=7.9,
                    allocator=dict(alloc_retries_timed=0, device_allocs_timed=5, device_frees_timed=5)),
               dict(row, system="unsloth", grad_ckpt="1", budget_gib=80.0, tok_per_s=10000, peak_gib=7.0, device_gib=9.0),
               dict(row, system="unsloth", grad_ckpt="u", budget_gib=80.0, tok_per_s=9500, peak_gib=6.0, device_gib=8.0),
               dict(row, system="unsloth", grad_ckpt="0", budget_gib=80.0, tok_per_s=15000, peak_gib=21.0, device_gib=30.0),
               dict(row, system="unsloth", grad_ckpt="0", budget_gib=8.0, error="out of memory"),
               dict(row, system="unsloth", grad_ckpt="u", budget_gib=8.0, tok_per_s=9000, peak_gib=6.0, device_gib=7.9)]
    lines = bench_script.table([("llama-3.1-8b", 2, 2048, 0)], results, 8e14)
    best = [l for l in lines if "best" in l]
    check(len(best) == 2 and "unsloth's best (0) | 80.0 | 15,000" in best[0] and "1.13x speed" in best[0]
          and "unsloth's best (u) | 8.0 | 9,000" in best[1],
          f"the table names Unsloth's best mode at each budget, ours against it: {best}")
    # --ab under budgets: every variant at every budget (the holder's), each its own line of the table.
    import argparse, contextlib, io
    calls = []
    def fake_ours(binary, work, shape, b, s, steps, warm, sets, budget, docs, env=None):
        calls.append((pathlib.Path(work).name, budget, tuple(sets)) + ((tuple(sorted(env.items())),) if env else ()))
        return dict(system="qlora-train", model=shape, batch=b, seq=s, budget_gib=budget, tok_per_s=int(1000 + len(sets)),
                    peak_gib=1.0, device_gib=2.0, model_flops_per_token=4e11)
    bench_script.run_ours = fake_ours
    bench_script.matrix_rate_if_cuda = lambda: 8e14  # the GPU's matrix rate, as measured before the variants run
    a = argparse.Namespace(ab=["auto=", "s24=--set train.memory.streamed_blocks=24",
                               "lt=--env TORCH_BLAS_PREFER_CUBLASLT=1"], budget="9,14", rounds=1,
                           binary="qt", work=str(TMP / "ab"), out=str(TMP / "ab"), steps=2, warm=1, set=[])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_script.ab(a, [("llama-3.1-8b", 1, 8192, 0)])
    table = [l for l in out.getvalue().splitlines() if l.startswith("| llama-3.1-8b")]
    check(sorted((c[0], c[1]) for c in calls) == [("auto", 9.0), ("auto", 14.0), ("lt", 9.0), ("lt", 14.0),
                                                   ("s24", 9.0), ("s24", 14.0)]
          and ("s24", 9.0, ("train.memory.streamed_blocks=24",)) in calls
          and ("lt", 14.0, (), (("TORCH_BLAS_PREFER_CUBLASLT", "1"),)) in calls and len(table) == 6
          and "| llama-3.1-8b 1x8192 at 9.0 GiB | s24 | 1,001 |" in table[1],
          f"--ab runs each variant under each --budget (its --set, its --env), one table line each: {calls} {table}")
    header = [l for l in out.getvalue().splitlines() if l.startswith("| row | variant")]
    check(len(header) == 1 and "at 800 TFLOP/s" in header[0] and table[0].endswith("| 50.0% |")
          and table[1].endswith("| 50.0% |"),
          f"--ab's table gives each variant's MFU at the run's matrix rate (1,000 tok/s x 4e11 / 8e14): {header} {table}")
    # --hand-search: the plan command's alternatives (the real binary, no GPU needed with a budget) each forced,
    # every run told the budget; the picked plan against the fastest measured (a fake run: the second alternative
    # 5% faster, so that the picked plan is flagged).
    hand = []
    def fake_hand(binary, work, shape, b, s, steps, warm, sets, budget, docs):
        hand.append((budget, tuple(sets)))
        fast = len(hand) == 3
        return dict(system="qlora-train", model=shape, batch=b, seq=s, budget_gib=budget,
                    tok_per_s=1050 if fast else 1000, peak_gib=1.0, device_gib=2.0)
    bench_script.run_ours = fake_hand
    a = argparse.Namespace(budget="9", hand_search=3, binary=BIN, work=str(TMP / "hand"), out=str(TMP / "hand"), steps=2,
                           warm=1, set=[])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        hand_lines = bench_script.hand_search(a, [("llama-3.1-8b", 1, 8192, 0)])
    forced = [dict(kv.split("=", 1) for kv in sets) for _, sets in hand]
    check(len(hand) == 4 and all(b == 9.0 for b, _ in hand)
          and all(f.get("train.memory.gpu_memory_gib") == "9.0" for f in forced)
          and len(forced[0]) == 1 and all("train.memory.streamed_blocks" in f and "train.memory.keep" in f for f in forced[1:])
          and len(hand_lines) == 1 and "| 1,000 | 1,050 (alt2" in hand_lines[0] and "| 0.952 | NO |" in hand_lines[0],
          f"--hand-search runs the picked plan and 3 alternatives forced, each told the budget: {hand} {hand_lines}")
    ours = [l for l in lines if "| qlora-train |" in l]
    check(len(ours) == 2 and "cudaFree" not in ours[0] and "11,000 (5 cudaFree in the timed steps)" in ours[1],
          f"a run whose allocator gave memory back in its timed steps is marked so: {ours}")


def check_memory_history():
    """scripts/memory_history.py on a history of the allocator's format (torch.cuda.memory._snapshot): the peak of
    bytes in use and what held it, grouped by the first frames of our code; frees replayed."""
    import pickle
    frames = lambda fn: [{"name": "c10::cuda::CUDACachingAllocator::malloc", "filename": "", "line": 0},
                         {"name": f"qt::{fn}(at::Tensor const&)", "filename": "", "line": 0},
                         {"name": "qt::train(qt::RunConfig const&)", "filename": "", "line": 0}]
    gib = 2 ** 30
    events = [{"action": "alloc", "addr": 1, "size": gib, "frames": frames("embed")},
              {"action": "alloc", "addr": 2, "size": 3 * gib, "frames": frames("attention_backward")},
              {"action": "free_requested", "addr": 2, "size": 3 * gib},
              {"action": "free_completed", "addr": 2, "size": 3 * gib},
              {"action": "alloc", "addr": 3, "size": 2 * gib, "frames": frames("mlp_chunk")},
              {"action": "oom", "size": gib, "device_free": 0}]
    path = TMP / "history.pickle"
    path.write_bytes(pickle.dumps({"device_traces": [events], "segments": [{"total_size": 4 * gib, "allocated_size": 3 * gib}]}))
    script = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "memory_history.py"
    p = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True)
    peak = p.stdout.split("peak (event 1 of 6): ")[-1].split("\n\n")[0] if p.returncode == 0 else ""
    end = p.stdout.split("at the history's end: ")[-1].split("\n\n")[0] if p.returncode == 0 else ""
    check(peak.startswith("4.000 GiB in 2 blocks") and "3.000 GiB      1  qt::attention_backward <- qt::train" in peak
          and "1.000 GiB      1  qt::embed <- qt::train" in peak,
          f"memory_history.py: the peak and what held it, by our frames (exit {p.returncode}): {peak or p.stderr[-300:]}")
    check(end.startswith("3.000 GiB in 2 blocks") and "qt::mlp_chunk" in end and "attention_backward" not in end
          and "out of memory at event 5" in p.stdout, f"... the history's end after the frees, and the failure: {end}")


def main():
    check_context_search()
    check_memory_history()
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    c = json.loads((TMP / "model" / "config.json").read_text())
    p = bench("--model", TMP / "model", "--batch", 2, "--seq", 24, "--steps", 3, "--warmup", 1, "--device", "cpu",
              "--out", TMP / "b", "--set", "train.memory.attention=flash")
    check(p.returncode == 0, f"bench exits 0 ({p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if p.returncode == 0:
        r = json.loads(p.stdout.strip().splitlines()[-1])
        H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        hd = c.get("head_dim") or H // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        n = L * (H * q + 2 * H * kv + q * H + 3 * H * I) + V * H
        want = 4 * n + 6 * L * 24 * q  # forward + input gradient of the linears, causal attention forward + backward
        check(abs(r["model_flops_per_token"] - want) <= 1e-9 * want,
              f"model FLOPs per token {r['model_flops_per_token']} = 4N + 6LSq = {want}")
        steps = [json.loads(l) for l in (TMP / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
        timed = sorted(s["step_s"] for s in steps if "loss" in s)[:]
        check(len(timed) == 4, f"the run made 1 warm-up and 3 timed steps ({len(timed)})")
        med = sorted(s["step_s"] for s in steps if "loss" in s and s["step"] > 1)[1]
        check(r["steps"] == 3 and r["step_s"] == med and abs(r["tokens_per_s"] - 2 * 24 / med) < 1e-6 * r["tokens_per_s"],
              f"the median timed step {r['step_s']} s and 2 x 24 tokens per step: {r['tokens_per_s']:.1f} tok/s")
        check(r["mfu"] is None and r["matrix_tflops"] is None and r["peak_gib"] is None and r["reserved_peak_gib"] is None
              and r["allocator"] is None, "no MFU, GPU memory or allocator counts on the CPU")
        check(r["micro_batch"] == 2, f"the plan's micro-batch: the whole batch of 2 without a budget ({r['micro_batch']})")
        check(not any("gpu_alloc_retries" in s or "gpu_device_frees" in s for s in steps),
              "metrics.jsonl holds no allocator counts on the CPU")
    # Packed rows of SFT-like documents: several documents a row, every row filled to exactly --seq tokens.
    p = bench("--model", TMP / "model", "--batch", 2, "--seq", 48, "--steps", 1, "--warmup", 0, "--device", "cpu",
              "--doc-tokens", 6, "--out", TMP / "p", "--set", "train.memory.attention=flash")
    check(p.returncode == 0, f"packed bench exits 0 ({p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if p.returncode == 0:
        docs = [len(json.loads(l)["input_ids"]) for l in (TMP / "p" / "tokens.jsonl").read_text().splitlines()]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        span = sum(n * n for n in docs) / sum(docs)
        H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        hd = c.get("head_dim") or H // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        n = L * (H * q + 2 * H * kv + q * H + 3 * H * I) + V * H
        check(abs(r["attention_span_tokens"] - span) < 1e-9 * span and span < 48
              and abs(r["model_flops_per_token"] - (4 * n + 6 * L * span * q)) < 1e-9 * r["model_flops_per_token"],
              f"packed rows: attention counted over the documents' spans ({r['attention_span_tokens']:.2f} of 48 tokens)")
        rows, used = [], 0
        for n in docs:  # the trainer's packing: documents in order while they fit
            if not rows or used + n > 48:
                rows.append([])
                used = 0
            rows[-1].append(n)
            used += n
        check(len(docs) > 2 and len(rows) == 2 and all(sum(r) == 48 for r in rows) and min(docs) >= 8,
              f"2 packed rows of 48 tokens from {len(docs)} documents of at least 8 tokens ({rows})")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        check(r["doc_tokens"] == 6 and r["tokens_per_s"] > 0, "the packed row's JSON names its median document length")
        # The Unsloth peer of packed rows reads the same documents: one row of 2 x 48 tokens, positions restarting
        # at each document, its first token no target.
        peer = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "peers" / "unsloth_packed.py"
        q = subprocess.run([sys.executable, str(peer), "--dry-run", str(TMP / "p" / "tokens.jsonl"), "2", "48"],
                           capture_output=True, text=True)
        d = json.loads(q.stdout) if q.returncode == 0 else {}
        check(d.get("tokens") == 96 and d.get("docs") == len(docs) and d.get("restarts") == len(docs)
              and d.get("targets") == 96 - len(docs), f"the packed peer's row from our documents: {d} {q.stderr[-300:]}")
        q = subprocess.run([sys.executable, str(peer), "--dry-run", str(TMP / "p" / "tokens.jsonl"), "2", "40"],
                           capture_output=True, text=True)
        check(q.returncode != 0 and "crosses a row of 40" in q.stderr,
              f"documents that do not fill rows of the given length are refused: {q.stderr[-200:]}")
    # --generate: the prompts together through the key / value cache, in batches of at most 2 x 12 cached tokens
    # (prompts of up to 9 tokens and 3 new ones: 2 prompts a batch at most), against each without it; in fp32 on the
    # CPU every prompt's greedy tokens are the same.
    p = bench("--model", TMP / "model", "--batch", 2, "--seq", 12, "--device", "cpu", "--generate", 5,
              "--prompt-tokens", 6, "--max-new-tokens", 3, "--uncached", 5, "--out", TMP / "g")
    check(p.returncode == 0, f"bench --generate exits 0 ({p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if p.returncode == 0:
        r = json.loads(p.stdout.strip().splitlines()[-1])
        check(r["mode"] == "generate" and r["prompts"] == 5 and r["uncached_prompts"] == 5 and r["same_tokens"] == 5
              and r["batch_tokens"] == 24 and r["cached_s"] > 0 and r["speedup"] > 0 and r["max_new_tokens"] == 3,
              f"the cached batches generate every prompt's uncached tokens: {r}")
        ph = r.get("phases", {})
        check(1 <= ph.get("rows", 0) <= 2 and ph.get("rows", 0) * (ph.get("prompt_columns", 99) + 3) <= 24
              and all(ph.get(k, 0) > 0 for k in ("prefill_s", "decode_forward_s", "logits_to_host_s", "choose_s")),
              f"the first batch's phases timed apart: {ph}")
    p = bench("--model", TMP / "model", "--device", "cpu", "--generate", 2, "--uncached", -1, "--out", TMP / "g2")
    check(p.returncode != 0 and "--uncached" in p.stderr, f"a negative --uncached is refused (exit {p.returncode})")
    p = bench("--model", TMP / "model", "--device", "cpu", "--generate", 2, "--seq", 8, "--max-new-tokens", 8,
              "--out", TMP / "g3")
    check(p.returncode == 2 and "--seq" in p.stderr, f"--seq not above --max-new-tokens is refused (exit {p.returncode})")
    p = bench("--model", TMP / "model", "--out", TMP / "e4", "--device", "cpu", "--doc-tokens", -3)
    check(p.returncode != 0 and "--doc-tokens" in p.stderr, f"a negative --doc-tokens is refused (exit {p.returncode})")
    p = bench("--shape", "llama-9-huge", "--out", TMP / "e1", "--device", "cpu")
    check(p.returncode == 3 and "--shape" in p.stderr and "llama-3.1-8b" in p.stderr,
          f"an unknown shape names the option and the known shapes (exit {p.returncode})")
    p = bench("--shape", "llama-3.2-1b", "--model", TMP / "model", "--out", TMP / "e2", "--device", "cpu")
    check(p.returncode != 0 and "--shape" in p.stderr and "--model" in p.stderr, f"--shape and --model together are refused (exit {p.returncode})")
    p = bench("--model", TMP / "model", "--out", TMP / "e3", "--device", "cpu", "--set", "train.atention=flash")
    check(p.returncode == 3 and "train.atention" in p.stderr, f"a misspelt --set key is named (exit {p.returncode})")
    finish("bench checks")


if __name__ == "__main__":
    main()
