"""End-to-end training benchmark: our trainer and the peers on the same machine, one table last.

Runs `qlora-train bench` (our trainer for a fixed number of steps on random NF4 weights of a named shape, no model
directory) on each row, then the peers of ../shared/peers (carried as .peerscripts, .peers, .usite: see that
README) on the same rows, and prints tokens/s, memory, MFU and our ratio to each peer.

MFU counts model FLOPs (issue 27): 4 N + causal attention forward and backward per token, whatever a plan
recomputes. The one formula is the trainer's (apps/trainer/bench.h, `model_flops_per_token` in its JSON); the peers
of a row are measured against the same figure, over the bf16 matrix rate measured in this run (torch.matmul of
8192^3).

Memory, two figures per case:
  peak_gib    the allocator's peak (torch.cuda.max_memory_allocated or ours): what the tensors take;
  device_gib  the most device memory the GPU had in use while the case ran, less what it had in use before it
              started (nvidia-smi polled every 50 ms): context, library workspaces, the allocator's reserve and
              fragmentation included. That, not the peak, decides whether a run fits a card.
Budgets (issue 26): with --budget B[,B...] each case runs with the rest of the GPU held by a holder process
(this script with --hold), so it sees only B GiB free, as on a smaller card; --min-budget searches, for each row and
system, the least budget in 0.25 GiB steps at which the case completes; --max-context (rows of batch 1) the longest
row, in 1024-token steps from the row's length, that each system completes at each budget (for Unsloth: over its checkpointing modes
--unsloth-modes, its best that completes).

A/B of our settings or builds (--ab NAME=SETTINGS, repeatable; SETTINGS as `--set k=v --set k2=v2` and / or
`--binary PATH`, empty for the defaults): every variant on every row (and under each --budget, the rest of the GPU held),
interleaved over --rounds rounds, the median tokens/s of each; no peers.
Hand search (--hand-search N, issue 27's "the plan picked is within 3% of the best found by hand"): at each row and
budget, ours under the plan it picks and under each of the N fastest other plans that fit (`qlora-train plan
--alternatives N`, forced through their train.memory fields), each run told the budget; a line per row and budget.
Smoke (--smoke): a Llama-3.2-1B-shaped model made with transformers and saved as an HF directory (the loading
path, not random weights), a repeated batch of random ids, QLoRA r=16, checkpointing: the loss must fall by 0.5.

Usage: python3 scripts/bench.py [--binary build-gpu/qlora-train] [--rows 1b-4x2048,8b-2x2048,...]
                                [--peers unsloth,hf_qlora | none] [--steps 8] [--warm 3] [--out DIR]
                                [--budget 8,9 [--min-budget | --max-context]] [--set key=value]...
                                [--ab NAME=SETTINGS ... [--rounds 2]] [--hand-search N]
                                [--smoke [--smoke-shape 4x2048x12]] [--dry-run]
Rows: NAME-BxS with NAME in 1b, 3b, 8b, 70b (Llama-3.2-1B, -3B, Llama-3.1-8B, -70B), q2.5-7b, q3-8b (Qwen2.5-7B, Qwen3-8B)
(e.g. 8b-1x32768, q3-8b-2x2048); NAME-BxSpD: packed rows of random documents of median length D (e.g.
8b-1x8192p330, SFT-like data; the peer: Unsloth padding-free on the same documents, scripts/peers/unsloth_packed.py,
Llama shapes). Unsloth's checkpointing mode per row: on the GPU up to 2048 tokens per
row, offloaded ("u") beyond, unless --unsloth-modes names several (then the best that completes).
Qwen rows: the peer is Unsloth alone, run by scripts/peers/unsloth_qwen.py (.peerscripts' unsloth_baseline.run() on
a Qwen2 / Qwen3 model of the same shape made with transformers; hf_qlora reports no peer script). One GPU call
(device tool, carry .usite .peers .peerscripts; the build first, as gpu-check.sh does):
    BENCH_ROWS=q2.5-7b-2x2048,q3-8b-2x2048 BENCH_PEERS=unsloth bash scripts/gpu-check.sh peers
or, with build-gpu/qlora-train built:
    python3 scripts/bench.py --rows q2.5-7b-2x2048,q3-8b-2x2048 --peers unsloth --out $OUT
--dry-run prints each row's commands and runs nothing (no GPU needed).
"""
import argparse, json, os, pathlib, signal, subprocess, sys, tempfile, threading, time

SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b", "70b": "llama-3.1-70b", "q2.5-7b": "qwen2.5-7b", "q3-8b": "qwen3-8b"}
# Peers that run a shape family: .peerscripts' scripts know the Llama shapes; Qwen rows get Unsloth through our
# scripts/peers/unsloth_qwen.py (its run() on a Qwen2 / Qwen3 model made with transformers), no HF + bnb peer.
PEERS_DIR = pathlib.Path(__file__).resolve().parent / "peers"
DEFAULT_ROWS = "1b-4x2048,8b-2x2048,8b-1x8192,8b-1x32768"
GIB = 2 ** 30


def hold(budget_gib):
    """Holds all of the GPU's memory but budget_gib, prints 'holding', sleeps until killed."""
    import torch
    torch.cuda.init()
    free, _ = torch.cuda.mem_get_info()
    held = []
    while free - budget_gib * GIB > 2 ** 25:
        n = int(min(free - budget_gib * GIB, 2 ** 34)) // 2 ** 21 * 2 ** 21
        if n <= 0:
            break
        held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
        free, _ = torch.cuda.mem_get_info()
    print(f"holding {free / GIB:.2f}", flush=True)
    while True:
        time.sleep(3600)


class Held:
    """The GPU with only `budget` GiB free while inside (no holder when budget is None)."""

    def __init__(self, budget):
        self.budget, self.proc, self.free = budget, None, None

    def __enter__(self):
        if self.budget is not None:
            self.proc = subprocess.Popen([sys.executable, __file__, "--hold", str(self.budget)],
                                         stdout=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if not line.startswith("holding"):
                raise RuntimeError(f"the holder for {self.budget} GiB did not start: {line!r}")
            self.free = float(line.split()[1])
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            time.sleep(1)  # the driver returns the holder's memory


def gpu_used_mib():
    p = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                       capture_output=True, text=True)
    return float(p.stdout.strip().splitlines()[0])


class DevicePeak:
    """The most device memory in use while inside, less what was in use on entry (nvidia-smi, every 50 ms)."""

    def __enter__(self):
        self.base = self.peak = gpu_used_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, gpu_used_mib())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def gib(self):
        return round((self.peak - self.base) / 1024, 2)


def library_overhead():
    """What lies outside the caching allocator, step by step, in one process with torch's CUDA libraries (the
    ones qlora-train links): the device memory in use (cudaMemGetInfo) less what the allocator holds, after each
    library's first use. Prints one JSON line per step (GiB, cumulative)."""
    import torch
    import torch.nn.functional as F
    free0, total = torch.cuda.mem_get_info()  # creates the context
    out = []

    def mark(what):
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        out.append(dict(after=what, outside_allocator_gib=round((total - free - torch.cuda.memory_reserved()) / GIB, 3),
                        reserved_gib=round(torch.cuda.memory_reserved() / GIB, 3)))
        print(json.dumps(out[-1]), flush=True)

    mark("context")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a @ a
    mark("cuBLAS bf16 GEMM")
    torch.addmm(a[0], a, a)
    mark("cuBLASLt addmm epilogue")
    q = torch.randn(1, 32, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True).sum().backward()
    mark("cuDNN attention forward + backward")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    mark("flash attention forward + backward")
    return out


def matrix_rate():
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * 8192 ** 3 * n / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return rate


def mfu_text(tok_per_s, flops_per_token, rate):
    """MFU as the tables print it: model FLOPs (4 N + attention a token) per second over the matrix rate."""
    return f"{100 * tok_per_s * flops_per_token / rate:.1f}%" if rate and flops_per_token else "?"


def matrix_rate_if_cuda():
    """matrix_rate() where torch sees a GPU, else None (--ab's tests run on the CPU)."""
    import torch
    return matrix_rate() if torch.cuda.is_available() else None


def tokens_of(work, shape, batch, seq):
    """The token file `qlora-train bench` writes for a row under `work` (run_ours' --out)."""
    return pathlib.Path(work) / f"bench_{shape}_{batch}x{seq}" / "tokens.jsonl"


def run_ours(binary, work, shape, batch, seq, steps, warm, extra, budget=None, docs=0, env=None):
    """`qlora-train bench` (random NF4 weights of the shape, LoRA r=16 on all seven linears, random tokens, one
    document a row or packed documents of median length `docs`, the default plan): median step after `warm`
    untimed ones. `env`: variables set for the run (an --ab variant's --env, e.g. TORCH_BLAS_PREFER_CUBLASLT=1)."""
    out = tokens_of(work, shape, batch, seq).parent
    cmd = [binary, "bench", "--shape", shape, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps),
           "--warmup", str(warm), "--device", "cuda", "--out", str(out), "--doc-tokens", str(docs)]
    for kv in extra:
        cmd += ["--set", kv]
    base = dict(system="qlora-train", model=shape, batch=batch, seq=seq, budget_gib=budget, **({"docs": docs} if docs else {}))
    with Held(budget), DevicePeak() as dev:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        return dict(base, exit=p.returncode, error=p.stderr.strip()[-2000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(base, step_s=round(r["step_s"], 4), tok_per_s=round(r["tokens_per_s"]), peak_gib=round(r["peak_gib"], 2),
                reserved_gib=round(r.get("reserved_peak_gib") or 0, 2), device_gib=dev.gib(), model_flops_per_token=r["model_flops_per_token"],
                **({"plan": r["plan"]} if "plan" in r else {}), **({"allocator": r["allocator"]} if r.get("allocator") else {}),
                **({"replans": len(r["out_of_memory_under"])} if r.get("out_of_memory_under") else {}),
                **({"micro_batch": r["micro_batch"]} if r.get("micro_batch", batch) != batch else {}))


def parse_rows(spec):
    """[(shape, batch, seq, median document length of packed rows or 0)] of `NAME-BxS[pD],...`; NAME may hold '-'
    (q2.5-7b): the last '-' ends it."""
    rows = []
    for r in spec.split(","):
        name, sep, bs = r.strip().rpartition("-")
        if not sep or name not in SHAPES:
            sys.exit(f"row {r!r}: expected NAME-BxS[pD] with NAME in {', '.join(SHAPES)}")
        b, x, s = bs.partition("x")
        s, _, docs = s.partition("p")
        if not (x and b.isdigit() and s.isdigit() and (docs == "" or docs.isdigit())):
            sys.exit(f"row {r!r}: expected NAME-BxS[pD], e.g. 8b-2x2048 or 8b-1x8192p330")
        rows.append((SHAPES[name], int(b), int(s), int(docs or 0)))
    return rows


def peer_case(peer, shape, batch, seq, here, unsloth_modes="", docs=0):
    """(script, PYTHONPATH, checkpointing modes) of a peer on a row, or an error string when there is none. Packed
    rows (docs > 0): Unsloth padding-free on our run's documents (scripts/peers/unsloth_packed.py, Llama shapes)."""
    P = here / ".peerscripts"
    if not P.is_dir():
        return ".peerscripts not carried"
    qwen = shape.startswith("qwen")
    if docs and (peer != "unsloth" or qwen):
        return f"no packed-row script for {peer} on {shape} (scripts/peers/unsloth_packed.py: Unsloth, Llama shapes)"
    if peer == "unsloth":
        script = (PEERS_DIR / "unsloth_packed.py" if docs else PEERS_DIR / "unsloth_qwen.py" if qwen
                  else P / "unsloth_baseline.py")
        modes = unsloth_modes.split(",") if unsloth_modes else ["1" if batch * seq <= 8192 and seq <= 2048 else "u"]
        return str(script), f"{here}/.usite:{here}/.peers:{P}", modes
    if peer == "hf_qlora":
        if qwen:
            return "no HF + bnb peer script for Qwen shapes (.peerscripts' know Llama ones)"
        return str(P / "hf_qlora_baseline.py"), f"{here}/.peers:{P}", ["1"]
    return f"unknown peer {peer!r} (unsloth, hf_qlora)"


def peer_model_ready(shape, seq):
    """Whether the peers' random model directory for this shape and row length is built (unsloth_baseline.py's
    make_model_dir: TMPDIR/rand-SHAPE-max(8192, seq) with its config.json)."""
    return (pathlib.Path(tempfile.gettempdir()) / f"rand-{shape}-{max(8192, seq)}" / "config.json").exists()


def run_peer(script, shape, batch, seq, ckpt, env, budget=None, timeout=900, docs=0, tokens=None):
    """A peer's case in its own process; packed rows (docs > 0) pass the token file our run trained on."""
    cmd = [sys.executable, script, shape, str(batch), str(seq), ckpt] + ([str(tokens)] if docs else [])
    base = dict(model=shape, batch=batch, seq=seq, grad_ckpt=ckpt, budget_gib=budget, **({"docs": docs} if docs else {}))
    try:
        with Held(budget), DevicePeak() as dev:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    except subprocess.TimeoutExpired:
        lines = []
    if not lines:
        return dict(base, error="no result (timeout or crash)")
    r = dict(base, **json.loads(lines[-1]))
    if "tok_per_s" in r:
        r["device_gib"] = dev.gib()
    return r


def ab(a, rows):
    """Each --ab variant on each row, interleaved over rounds; prints one JSON line per run and a table of medians."""
    import itertools, shlex, statistics
    variants = []
    for v in a.ab:
        name, _, spec = v.partition("=")
        extra = shlex.split(spec)
        sets = [extra[i + 1] for i in range(len(extra) - 1) if extra[i] == "--set"]
        binary = next((extra[i + 1] for i in range(len(extra) - 1) if extra[i] == "--binary"), a.binary)
        env = dict(extra[i + 1].partition("=")[::2] for i in range(len(extra) - 1) if extra[i] == "--env")
        variants.append((name, sets, binary, env))
    budgets = [float(x) for x in a.budget.split(",") if x] or [None]  # each variant under each (the holder)
    rate = matrix_rate_if_cuda()  # the variants' MFU at this run's own matrix rate (none without a GPU)
    if rate:
        print(f"bf16 matrix rate: {rate / 1e12:.0f} TFLOP/s", flush=True)
    runs = []
    for rnd in range(a.rounds):
        for shape, b, s, docs in rows:
            for budget in budgets:
                for name, sets, binary, env in variants:
                    r = run_ours(binary, pathlib.Path(a.work) / name, shape, b, s, a.steps, a.warm, a.set + sets, budget,
                                 docs, **({"env": env} if env else {}))
                    r.update(variant=name, round=rnd, **({"matrix_rate": rate} if rate else {}))
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out, "ab.json").write_text(json.dumps(runs, indent=1))
    print("\n| row | variant | tok/s (median of rounds) | runs | peak GiB | device GiB | MFU (4N + attention"
          + (f" at {rate / 1e12:.0f} TFLOP/s)" if rate else ")") + " |")
    print("|---|---|---|---|---|---|---|")
    for (shape, b, s, docs), budget, (name, _, _, _) in itertools.product(rows, budgets, variants):
        rs = [r for r in runs if r["variant"] == name and r["model"] == shape and r["batch"] == b and r["seq"] == s
              and r.get("docs", 0) == docs and r.get("budget_gib") == budget]
        ok = [r for r in rs if "tok_per_s" in r]
        label = f"{shape} {b}x{s}{f' packed {docs}' if docs else ''}{f' at {budget} GiB' if budget is not None else ''}"
        if not ok:
            print(f"| {label} | {name} | error: {rs[0].get('error', '')[-80:] if rs else '?'} | | | | |")
            continue
        t = statistics.median(r["tok_per_s"] for r in ok)
        mfu = mfu_text(t, ok[0].get("model_flops_per_token"), rate)
        print(f"| {label} | {name} | {t:,.0f} | {', '.join(format(r['tok_per_s'], ',') for r in ok)} | "
              f"{max(r['peak_gib'] for r in ok):.2f} | {max(r['device_gib'] for r in ok):.2f} | {mfu} |")


def memory_sets(fields):
    """`--set train.memory.KEY=VALUE` arguments forcing a plan's fields (`qlora-train plan`'s alternatives' "memory")."""
    return [f"train.memory.{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in fields.items()]


def hand_search(a, rows):
    """Issue 27's check of the plan: at each row and budget, our run under the plan the trainer picks and under each
    of the N fastest other plans that fit (`qlora-train plan --alternatives N`, each forced through its train.memory
    fields), each its own process with the rest of the GPU held; every run told the budget
    (train.memory.gpu_memory_gib), so that it weighs the plans `plan` weighed. Prints a JSON line per run and a line
    per row and budget: the picked plan against the fastest measured (the target: within 3%)."""
    budgets = [float(x) for x in a.budget.split(",") if x] or [None]
    runs, lines = [], []
    for shape, b, s, docs in rows:
        for budget in budgets:
            told = [f"train.memory.gpu_memory_gib={budget}"] if budget is not None else []
            cmd = [a.binary, "plan", "--shape", shape, "--batch", str(b), "--seq", str(s), "--alternatives",
                   str(a.hand_search)] + [x for kv in a.set + told for x in ("--set", kv)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                lines.append(f"| {shape} {b}x{s} | {budget} | plan refused: {p.stderr.strip()[-80:]} | | | |")
                continue
            decided = json.loads(p.stdout.strip().splitlines()[-1])
            variants = [("picked", [], decided["predicted_step_s"]["total"])]
            variants += [(f"alt{i + 1}: {alt['plan']}", memory_sets(alt["memory"]), alt["predicted_step_s"])
                         for i, alt in enumerate(decided.get("alternatives", []))]
            done = []
            for name, sets, predicted in variants:
                r = run_ours(a.binary, pathlib.Path(a.work) / "hand", shape, b, s, a.steps, a.warm, a.set + told + sets,
                             budget, docs)
                r.update(variant=name, predicted_step_s=predicted)
                print(json.dumps(r), flush=True)
                runs.append(r)
                if "tok_per_s" in r:
                    done.append(r)
            picked = next((r for r in done if r["variant"] == "picked"), None)
            best = max(done, key=lambda r: r["tok_per_s"], default=None)
            label = f"{shape} {b}x{s}{f' packed {docs}' if docs else ''}"
            if picked is None or best is None:
                lines.append(f"| {label} | {budget} | the picked plan did not complete | | | |")
                continue
            ratio = picked["tok_per_s"] / best["tok_per_s"]
            lines.append(f"| {label} | {budget if budget is not None else 'whole GPU'} | {picked['tok_per_s']:,} | "
                         f"{best['tok_per_s']:,} ({best['variant'][:70]}) | {ratio:.3f} | "
                         f"{'yes' if ratio >= 0.97 else 'NO'} |")
    pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out, "hand_search.json").write_text(json.dumps(runs, indent=1))
    print("\n| row | budget GiB | picked plan tok/s | fastest measured (plan) | picked / fastest | within 3% |")
    print("|---|---|---|---|---|---|")
    for line in lines:
        print(line)
    return lines


def smoke(a):
    """The trainer on an HF model directory made with transformers (Llama-3.2-1B's shape, random weights): the loss
    of a repeated batch must fall by 0.5; one JSON line with tokens/s and peak memory (metrics.jsonl)."""
    import torch
    batch, seq, steps = (int(x) for x in a.smoke_shape.split("x"))
    work = pathlib.Path(a.work) / "smoke"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama-3.2-1b"
    if not (model_dir / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                          max_position_embeddings=max(8192, seq), rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=8192), bos_token_id=128000, eos_token_id=128001)
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        m.save_pretrained(model_dir, safe_serialization=True)
        del m
        torch.cuda.empty_cache()
        # A tokenizer so that the directory is complete; the data below is already tokenized.
        tok = pathlib.Path(os.environ.get("QT_FIXTURES", "build-gpu/tests/fixtures")) / "tokenizer" / "bpe"
        if not (tok / "tokenizer.json").exists():
            sys.exit(f"no tokenizer.json fixture under {tok}")
        for f in tok.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (model_dir / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(1)
    # Ids below 256 exist in any byte-level BPE vocabulary (the copied tokenizer is a small test one).
    rows = [torch.randint(0, 256, (seq,), generator=g).tolist() for _ in range(batch)]
    data = work / "repeated.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    out = work / "run"
    config = {"output_dir": str(out), "model": {"path": str(model_dir), "quant": "nf4", "device": "cuda"},
              "lora": {"r": 16, "alpha": 16},
              "data": {"train_file": str(data), "format": "tokenized", "max_seq_len": seq, "packing": False, "shuffle": False},
              "train": {"steps": steps, "batch_size": batch, "seed": 0, "log_every": 1, "memory": {"checkpointing": True}},
              "optim": {"lr": 1e-3, "schedule": "constant"}, "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
    (work / "smoke.json").write_text(json.dumps(config))
    subprocess.run(["rm", "-rf", str(out)])
    p = subprocess.run([a.binary, "--config", str(work / "smoke.json")], capture_output=True, text=True)
    print(p.stderr[-2500:])
    if p.returncode != 0:
        sys.exit(f"qlora-train exited {p.returncode}")
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "loss" in x]
    timed = m[3:] if len(m) > 4 else m
    step_s = sorted(x["step_s"] for x in timed)[len(timed) // 2]
    res = dict(system="qlora-train", model="llama-3.2-1b (HF directory)", batch=batch, seq=seq, steps=len(m),
               first_loss=round(m[0]["loss"], 4), last_loss=round(m[-1]["loss"], 4), step_s=round(step_s, 4),
               tok_per_s=round(batch * seq / step_s), peak_gib=round(max(x.get("gpu_mem_gib", 0) for x in m), 2))
    print(json.dumps(res), flush=True)
    if not m[-1]["loss"] < m[0]["loss"] - 0.5:
        sys.exit("the loss did not fall on a repeated batch")


def min_budget(run, lo, hi):
    """The least budget in 0.25 GiB steps in [lo, hi] at which run(budget) completes (bisection: completing is
    taken as monotone in the budget; lo where nothing completes), with that run's result; None when it fails at
    hi."""
    snap = lambda x: round(x * 4) / 4
    lo, hi = snap(lo), snap(hi)
    best = run(hi)
    if "tok_per_s" not in best:
        return None
    while hi - lo > 0.25:
        mid = snap((lo + hi) / 2)
        if mid in (lo, hi):
            break
        r = run(mid)
        if "tok_per_s" in r:
            hi, best = mid, r
        else:
            lo = mid
    return best


def prepare_peer_dir(script, shape, seq, env):
    """The peer's random model directory for a row of `seq` tokens (its max_position_embeddings follows the length
    past 8192), made before a holder starts: the peers build it on the GPU, which a budget would not hold."""
    if peer_model_ready(shape, seq):
        return
    code = (f"import sys; sys.path.insert(0, {str(pathlib.Path(script).parent)!r}); "
            f"import {pathlib.Path(script).stem} as m; m.make_model_dir({shape!r}, {seq})")
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)


def context_search(a, rows, budgets, peers_env, here, emit, results, rate):
    """--max-context: per row (batch 1), budget and system, the longest row that completes; one table."""
    if any(b != 1 for _, b, _, _ in rows) or None in budgets:
        sys.exit("--max-context takes rows of batch 1 (NAME-1xS) and --budget")
    found = []
    for shape, _, s, docs in rows:
        for budget in budgets:
            ours = lambda seq: run_ours(a.binary, pathlib.Path(a.work), shape, 1, seq, a.steps, a.warm, a.set, budget, docs)
            best, tried = max_context(ours, s)
            for r in tried:
                emit(dict(r, search="max_context"))
            found.append(("qlora-train", shape, budget, best))
            for peer in [p for p in a.peers.split(",") if p and p != "none" and not docs]:
                case = peer_case(peer, shape, 1, s, here, a.unsloth_modes)
                if isinstance(case, str):
                    continue
                script, path, modes = case
                env = {**peers_env, "PYTHONPATH": path}
                for mode in modes:
                    def peer_run(seq, mode=mode, script=script, env=env):
                        prepare_peer_dir(script, shape, seq, env)
                        return dict(run_peer(script, shape, 1, seq, mode, env, budget), system=peer)
                    best_p, tried_p = max_context(peer_run, s)
                    for r in tried_p:
                        emit(dict(r, search="max_context"))
                    found.append((f"{peer} ({mode})", shape, budget, best_p))
    pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out, "bench.json").write_text(json.dumps(dict(matrix_rate=rate, results=results), indent=1))
    print("\n| row | budget GiB | system | longest row that completes | tok/s there | device GiB |")
    print("|---|---|---|---|---|---|")
    for system, shape, budget, best in found:
        print(f"| {shape} | {budget} | {system} | " + (f"{best['seq']:,} | {best['tok_per_s']:,} | {best.get('device_gib', '?')} |"
                                                     if best else "none from the row's length | | |"))


def max_context(run, start, step=1024, cap=1 << 20):
    """The longest row (batch 1) in multiples of `step` at which run(seq) completes (completing is taken as monotone
    in the length): doubling from `start` until a run fails or `cap`, then bisection between the last length that
    completed and the first that failed. Returns (the longest length's result or None, [every result])."""
    tried = []
    def probe(seq):
        r = run(seq)
        tried.append(r)
        return "tok_per_s" in r
    seq = max(step, start // step * step)
    best, fail = None, None
    while seq <= cap:
        if probe(seq):
            best, seq = tried[-1], seq * 2
        else:
            fail = seq
            break
    if best is None:
        return None, tried
    lo, hi = best["seq"], fail if fail is not None else None
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid in (lo, hi):
            break
        if probe(mid):
            lo, best = mid, tried[-1]
        else:
            hi = mid
    return best, tried


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--overhead", action="store_true", help="device memory outside the allocator, library by library")
    ap.add_argument("--binary", default="build-gpu/qlora-train")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"NAME-BxS[pD],... with NAME in {', '.join(SHAPES)}")
    ap.add_argument("--peers", default="unsloth,hf_qlora")
    ap.add_argument("--unsloth-modes", default="", help="checkpointing modes to try (1,u,0); default: one per row")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--work", default="/tmp/qt_bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", default="", help="GiB left free for each case, comma-separated")
    ap.add_argument("--min-budget", action="store_true", help="search each case's least budget (0.25 GiB steps)")
    ap.add_argument("--max-context", action="store_true",
                    help="with --budget: the longest batch-1 row (1024-token steps) each system completes at each "
                         "budget, from the row's length up (rows NAME-1xS)")
    ap.add_argument("--set", action="append", default=[], help="extra config key=value for our runs")
    ap.add_argument("--no-whole", action="store_true", help="with --budget: skip the whole-GPU run of each row, ours and the peers' (their model directory is made alone)")
    ap.add_argument("--ab", action="append", default=[], help="NAME=SETTINGS (`--set k=v ...`, `--binary B`, `--env VAR=VALUE`; empty: defaults)")
    ap.add_argument("--rounds", type=int, default=2, help="--ab: interleaved rounds")
    ap.add_argument("--hand-search", type=int, default=0, metavar="N",
                    help="ours under the plan it picks and under the N fastest other plans that fit (qlora-train plan "
                         "--alternatives), at each --budget (or the whole GPU): the picked plan against the fastest")
    ap.add_argument("--smoke", action="store_true", help="the loss falls on an HF directory made with transformers")
    ap.add_argument("--smoke-shape", default="4x2048x12", help="--smoke: BATCHxSEQxSTEPS")
    ap.add_argument("--dry-run", action="store_true", help="print what each row would run (ours, the peers), run nothing")
    a = ap.parse_args()
    if a.hold is not None:
        return hold(a.hold)
    if a.overhead:
        return library_overhead()
    rows = parse_rows(a.rows)  # (shape, batch, seq, median document length of packed rows or 0)
    here = pathlib.Path.cwd()
    if a.dry_run:
        for shape, b, s, docs in rows:
            print(f"{shape} {b}x{s}{f' packed {docs}' if docs else ''}: {a.binary} bench --shape {shape} --batch {b} --seq {s} ...")
            for peer in [p for p in a.peers.split(",") if p and p != "none"]:
                c = peer_case(peer, shape, b, s, here, a.unsloth_modes, docs)
                print(f"  {peer}: {c}" if isinstance(c, str) else
                      f"  {peer}: PYTHONPATH={c[1]} {sys.executable} {c[0]} {shape} {b} {s} {{{','.join(c[2])}}}"
                      + (f" {tokens_of(a.work, shape, b, s)}" if docs else ""))
        return
    if a.smoke:
        return smoke(a)
    if a.ab:
        return ab(a, rows)
    if a.hand_search:
        return hand_search(a, rows)
    rate = matrix_rate()
    print(f"bf16 matrix rate: {rate / 1e12:.0f} TFLOP/s", flush=True)
    peers_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 "PEER_STEPS": str(a.steps), "PEER_WARM": str(a.warm)}
    budgets = [float(x) for x in a.budget.split(",") if x] or [None]
    results = []

    def emit(r):
        print(json.dumps(r), flush=True)
        results.append(r)

    if a.max_context:
        return context_search(a, rows, budgets, peers_env, here, emit, results, rate)
    for shape, b, s, docs in rows:
        ours = lambda budget: run_ours(a.binary, pathlib.Path(a.work), shape, b, s, a.steps, a.warm, a.set, budget, docs)
        if not (a.no_whole and a.budget and not a.min_budget):
            free = ours(None)  # the whole GPU: also the upper end of a budget search
            emit(free)
        if a.min_budget and "device_gib" in free:
            # The plan gets leaner under a budget: the least can lie below the whole GPU's peak.
            r = min_budget(ours, max(1.0, 0.5 * free["peak_gib"]), free["device_gib"] + 1.0)
            emit(dict(r, search="min_budget") if r else dict(free, search="min_budget", error="no budget found"))
        for budget in budgets:
            if budget is not None:
                emit(ours(budget))
        for peer in [p for p in a.peers.split(",") if p and p != "none"]:
            case = peer_case(peer, shape, b, s, here, a.unsloth_modes, docs)
            if isinstance(case, str):
                emit(dict(system=peer, model=shape, batch=b, seq=s, error=case, **({"docs": docs} if docs else {})))
                continue
            script, path, modes = case
            env = {**peers_env, "PYTHONPATH": path}
            tokens = tokens_of(a.work, shape, b, s)  # packed rows: the documents our run (above) trained on
            for mode in modes:
                peer_run = lambda budget, mode=mode: dict(run_peer(script, shape, b, s, mode, env, budget, docs=docs,
                                                                   tokens=tokens), system=peer)
                # The whole-GPU run (skipped with --no-whole: the model directory made alone, on the GPU, before any
                # holder starts).
                r = None
                if a.no_whole and a.budget and not a.min_budget:
                    prepare_peer_dir(script, shape, s, env)
                else:
                    r = peer_run(None)
                    emit(r)
                if a.min_budget and r and "device_gib" in r:
                    m = min_budget(peer_run, max(1.0, r.get("peak_gib", 1.0)), r["device_gib"] + 1.0)
                    emit(dict(m, search="min_budget") if m else dict(r, search="min_budget", error="no budget found"))
                for budget in budgets:
                    if budget is not None:
                        emit(peer_run(budget))
    pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out, "bench.json").write_text(json.dumps(dict(matrix_rate=rate, results=results), indent=1))
    print("\n" + "\n".join(table(rows, results, rate)))


def table(rows, results, rate):
    """The markdown table of a run: every case, its MFU and our ratio at the same budget; and where a peer ran in
    several modes (Unsloth's checkpointing 1, u, 0), a line for its best that completed at each budget, with ours
    against it (issue 27: ours against the peer's best mode that fits)."""
    out = [f"| row | system | budget GiB | tok/s | peak GiB | device GiB | MFU | ours / this |  "
           f"(bf16 matrix rate {rate / 1e12:.0f} TFLOP/s; MFU: 4N + attention)", "|---|---|---|---|---|---|---|---|"]
    for shape, b, s, docs in rows:
        row = [x for x in results if x.get("model") == shape and x.get("batch") == b and x.get("seq") == s
               and x.get("docs", 0) == docs]
        name = f"{shape} {b}x{s}{f' packed {docs}' if docs else ''}"
        flops = next((x["model_flops_per_token"] for x in row if "model_flops_per_token" in x), None)

        def line(r, system):
            label = (f"least: {r.get('budget_gib')}" if r.get("search")
                     else r["budget_gib"] if r.get("budget_gib") is not None else "whole GPU")
            if "tok_per_s" not in r:
                return f"| {name} | {system} | {label} | {r.get('error', '?')[:60]} | | | | |"
            mine = next((x for x in row if x["system"] == "qlora-train" and x.get("budget_gib") == r.get("budget_gib")
                         and bool(x.get("search")) == bool(r.get("search")) and "tok_per_s" in x), None)
            mfu = mfu_text(r['tok_per_s'], flops, rate)
            ratio = (f"{mine['tok_per_s'] / r['tok_per_s']:.2f}x speed, {mine['device_gib'] / r['device_gib']:.2f}x device mem"
                     if mine and r is not mine and r.get("device_gib") else "")
            frees = (r.get("allocator") or {}).get("device_frees_timed", 0)
            churn = f" ({frees} cudaFree in the timed steps)" if frees else ""
            if r.get("replans"):
                churn += f" (after {r['replans']} plan(s) ran out of memory)"
            return (f"| {name} | {system} | {label} | {r['tok_per_s']:,}{churn} | {r['peak_gib']} | "
                    f"{r.get('device_gib', '?')} | {mfu} | {ratio} |")

        for r in row:
            out.append(line(r, r["system"] + (f" ({r['grad_ckpt']})" if "grad_ckpt" in r and r["system"] == "unsloth" else "")
                            + (f" (micro-batches of {r['micro_batch']})" if r.get("micro_batch") else "")))
        peers = sorted({x["system"] for x in row if x["system"] != "qlora-train"})
        for peer in peers:
            for budget in dict.fromkeys(x.get("budget_gib") for x in row if x["system"] == peer and not x.get("search")):
                done = [x for x in row if x["system"] == peer and x.get("budget_gib") == budget and not x.get("search")
                        and "tok_per_s" in x]
                if len({x.get("grad_ckpt") for x in row if x["system"] == peer and x.get("budget_gib") == budget}) > 1 and done:
                    best = max(done, key=lambda x: x["tok_per_s"])
                    out.append(line(best, f"{peer}'s best ({best.get('grad_ckpt')})"))
    return out


if __name__ == "__main__":
    main()
