"""End-to-end training benchmark: our trainer and the peers on the same machine, one table last.

Runs `qlora-train bench` (our trainer for a fixed number of steps on random NF4 weights of a named shape, no model
directory) on each row, then the peers of ../shared/peers (carried as .peerscripts, .peers,
.usite: see that README) on the same rows, and prints tokens/s, peak GPU memory, MFU and our ratio to each peer.

MFU, the same formula for everyone (issue 14): (6 N + 8 L S d) FLOPs per token, N the parameters of the block
linears and lm_head, L layers, S the sequence length, d the hidden size, times tokens/s, over the bf16 matrix rate
measured in this run (torch.matmul of 8192^3).

Usage: python3 scripts/bench.py [--binary build-gpu/qlora-train] [--rows 1b-4x2048,8b-2x2048,...]
                                [--peers unsloth,hf_qlora | none] [--steps 8] [--warm 3] [--out DIR]
Rows: NAME-BxS with NAME in 1b, 3b, 8b (e.g. 8b-1x32768). Peer checkpointing modes follow issue 14: on the GPU
up to 2048 tokens per row, offloaded ("u") for Unsloth beyond.
"""
import argparse, json, os, pathlib, subprocess, sys, time

SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
DIMS = {  # H, I, L, heads, kv heads, vocab, tied
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128256, True),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
}
DEFAULT_ROWS = "1b-4x2048,8b-2x2048,8b-1x8192,8b-1x32768"


def flops_per_token(shape, seq):
    H, I, L, heads, kv, V, tied = DIMS[shape]
    hd = H // heads
    n = L * (2 * H * heads * hd + 2 * H * kv * hd + 3 * H * I) + V * H
    return 6 * n + 8 * L * seq * H


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
    return 2 * 8192 ** 3 * n / (time.perf_counter() - t0)


def run_ours(binary, work, shape, batch, seq, steps, warm, extra):
    """`qlora-train bench` (random NF4 weights of the shape, LoRA r=16 on all seven linears, random tokens, one
    document a row, gradient checkpointing on): median step after `warm` untimed ones."""
    out = work / f"bench_{shape}_{batch}x{seq}"
    cmd = [binary, "bench", "--shape", shape, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps),
           "--warmup", str(warm), "--device", "cuda", "--out", str(out)]
    for kv in extra:
        cmd += ["--set", kv]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return dict(system="qlora-train", model=shape, batch=batch, seq=seq, error=p.stderr.strip()[-400:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(system="qlora-train", model=shape, batch=batch, seq=seq, step_s=round(r["step_s"], 4),
                tok_per_s=round(r["tokens_per_s"]), peak_gib=round(r["peak_gib"], 2))


def run_peer(script, shape, batch, seq, ckpt, env, timeout=900):
    cmd = [sys.executable, script, shape, str(batch), str(seq), ckpt]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    except subprocess.TimeoutExpired:
        lines = []
    if not lines:
        return dict(model=shape, batch=batch, seq=seq, error="no result (timeout or crash)")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build-gpu/qlora-train")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--peers", default="unsloth,hf_qlora")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--work", default="/tmp/qt_bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--set", action="append", default=[], help="extra config key=value for our runs")
    a = ap.parse_args()
    rows = []
    for r in a.rows.split(","):
        name, bs = r.split("-")
        b, s = bs.split("x")
        rows.append((SHAPES[name], int(b), int(s)))
    rate = matrix_rate()
    print(f"bf16 matrix rate: {rate / 1e12:.0f} TFLOP/s", flush=True)
    here = pathlib.Path.cwd()
    peers_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 "PEER_STEPS": str(a.steps), "PEER_WARM": str(a.warm)}
    P = here / ".peerscripts"
    results = []
    for shape, b, s in rows:
        r = run_ours(a.binary, pathlib.Path(a.work), shape, b, s, a.steps, a.warm, a.set)
        print(json.dumps(r), flush=True)
        results.append(r)
        for peer in [p for p in a.peers.split(",") if p and p != "none"]:
            if not P.is_dir():
                results.append(dict(system=peer, model=shape, batch=b, seq=s, error=".peerscripts not carried"))
                continue
            if peer == "unsloth":
                env = {**peers_env, "PYTHONPATH": f"{here}/.usite:{here}/.peers:{P}"}
                rr = run_peer(str(P / "unsloth_baseline.py"), shape, b, s, "1" if b * s <= 8192 and s <= 2048 else "u", env)
            else:
                env = {**peers_env, "PYTHONPATH": f"{here}/.peers:{P}"}
                rr = run_peer(str(P / "hf_qlora_baseline.py"), shape, b, s, "1", env)
            rr["system"] = peer
            print(json.dumps(rr), flush=True)
            results.append(rr)
    pathlib.Path(a.out, "bench.json").write_text(json.dumps(dict(matrix_rate=rate, results=results), indent=1))
    print(f"\n| row | system | tok/s | peak GiB | MFU | ours / this |  (bf16 matrix rate {rate / 1e12:.0f} TFLOP/s)")
    print("|---|---|---|---|---|---|")
    for shape, b, s in rows:
        mine = next((r for r in results if r["system"] == "qlora-train" and r["model"] == shape
                     and r["batch"] == b and r["seq"] == s), {})
        for r in [x for x in results if x.get("model") == shape and x.get("batch") == b and x.get("seq") == s]:
            if "tok_per_s" not in r:
                print(f"| {shape} {b}x{s} | {r['system']} | {r.get('error', '?')[:60]} | | | |")
                continue
            mfu = r["tok_per_s"] * flops_per_token(shape, s) / rate
            ratio = (f"{mine['tok_per_s'] / r['tok_per_s']:.2f}x speed, {mine['peak_gib'] / r['peak_gib']:.2f}x mem"
                     if "tok_per_s" in mine and r is not mine else "")
            print(f"| {shape} {b}x{s} | {r['system']} | {r['tok_per_s']:,} | {r['peak_gib']} | {100 * mfu:.1f}% | {ratio} |")


if __name__ == "__main__":
    main()
