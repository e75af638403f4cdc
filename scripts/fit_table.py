"""Will it fit my GPU? A markdown table of what `qlora-train plan` decides for each model, context and card: no GPU
needed (the plan's footprint and cost model, calibrated on an H200: docs/PERFORMANCE.md).

A card sold as N GB holds about N x 0.93 GiB for a process (issue 26); a run reads that free memory and keeps a 0.1
GiB margin (lib/model/exec_plan.cpp, kFreeMarginGiB: a run with B GiB free plans within B - 0.1, measured on an H200
in the eleventh session); each cell is the plan at that budget for one
row of that many tokens (batch 1, LoRA r=16 on all seven linears, bf16, NF4 base): "fits" with what the plan had to
do beyond its fastest plan (blocks streamed from the host, lm_head streamed, AdamW on the host, MLP chunks), or
"no" with the GiB its leanest plan needs (or, where the host is what is short, the host memory it would pin: a plan
pins at most three quarters of --host-gib, default 64).

With --longest: the longest batch-1 row the plan fits on each card instead (a search over multiples of --step
tokens; LoRA r as --r), with its predicted step time and tokens/s at an H200's rates, and "host-limited" where the
card would hold a longer row but the host's pinned share (three quarters of --host-gib) would not: predicted, not
measured.

Usage: python3 scripts/fit_table.py [--binary build/qlora-train] [--shapes llama-3.1-8b,llama-3.1-70b]
                                    [--seqs 2048,8192,32768] [--cards 6,8,12,16,24,40,48,80] [--host-gib 64]
                                    [--longest [--r 32] [--step 128] [--max-seq 1048576]]
"""
import argparse, json, re, subprocess, sys

GIB_PER_GB = 0.93
FREE_MARGIN_GIB = 0.1  # what a run keeps back of the free memory it reads (exec_plan.cpp's kFreeMarginGiB)


def budget_of(card_gb):
    """The budget a run plans within on a card sold as card_gb GB (its free memory less the run's margin)."""
    return card_gb * GIB_PER_GB - FREE_MARGIN_GIB


def plan(binary, shape, seq, budget, host_gib, r=None):
    """(decision JSON or None, stderr) of `qlora-train plan` for one cell."""
    lora = ["--set", f"lora.r={r}", "--set", f"lora.alpha={r}"] if r else []
    p = subprocess.run([binary, "plan", "--shape", shape, "--batch", "1", "--seq", str(seq), "--gpu-memory-gib",
                        f"{budget:.2f}", "--host-gib", str(host_gib), "--log-level", "error", *lora],
                       capture_output=True, text=True)
    if p.returncode == 0:
        return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr
    if p.returncode != 3:
        sys.exit(f"qlora-train plan {shape} 1x{seq} at {budget:.2f} GiB: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return None, p.stderr


def cell(decision, stderr, layers, budget):
    if decision is None:
        need = re.search(r"needs ([0-9.]+) GiB", stderr)
        host = re.search(r"would pin ([0-9.]+) GiB of host memory", stderr)
        if need and host and float(need.group(1)) <= budget:  # the GPU would hold its leanest plan, the host not
            return f"no (host: {host.group(1)} GiB pinned)"
        return f"no ({need.group(1)} GiB)" if need else "no"
    notes = []
    if decision["weights"] == "host":
        notes.append(f"{decision['streamed_blocks']}/{layers} blocks streamed")
    if decision["lm_head"] == "host":
        notes.append("lm_head streamed")
    if decision["optimizer"] == "host":
        notes.append("AdamW on host")
    if decision["mlp_chunk_tokens"]:
        notes.append(f"MLP chunks {decision['mlp_chunk_tokens']}")
    return "fits" + (f" ({', '.join(notes)})" if notes else "")


def layers_of(binary, shape):
    p = subprocess.run([binary, "plan", "--shape", shape, "--batch", "1", "--seq", "128", "--gpu-memory-gib", "10000",
                        "--host-gib", "64", "--log-level", "error", "--set", "train.memory.checkpointing=true",
                        "--set", "train.memory.weights=host"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"qlora-train plan --shape {shape}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["streamed_blocks"]


def longest(binary, shape, budget, host_gib, r, step, max_seq):
    """The longest multiple of `step` tokens (at most max_seq) whose batch-1 row the plan fits, its decision, and
    what stops the next length: "host" (the card would hold it, the host's pinned share not), "max" (max_seq
    reached) or "" (the card); (0, None, "") where not even `step` tokens fit. A bisection: a longer row never
    needs less."""
    lo, hi, best = 0, max_seq // step, None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        d, _ = plan(binary, shape, mid * step, budget, host_gib, r)
        if d is None:
            hi = mid - 1
        else:
            lo, best = mid, d
    if best is None:
        return 0, None, ""
    if lo == max_seq // step:
        return lo * step, best, "max"
    _, stderr = plan(binary, shape, (lo + 1) * step, budget, host_gib, r)
    need = re.search(r"needs ([0-9.]+) GiB", stderr)
    host = "would pin" in stderr and need is not None and float(need.group(1)) <= budget
    return lo * step, best, "host" if host else ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="build/qlora-train")
    ap.add_argument("--shapes", default="llama-3.1-8b,llama-3.1-70b")
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--cards", default="6,8,12,16,24,40,48,80", help="card sizes in GB")
    ap.add_argument("--host-gib", type=float, default=64)
    ap.add_argument("--longest", action="store_true", help="the longest row each card fits, instead of --seqs")
    ap.add_argument("--r", type=int, default=32, help="--longest: LoRA rank (Unsloth's published contexts: 32)")
    ap.add_argument("--step", type=int, default=128, help="--longest: lengths searched in multiples of this")
    ap.add_argument("--max-seq", type=int, default=1 << 20, help="--longest: the longest length tried")
    a = ap.parse_args()
    cards = [int(c) for c in a.cards.split(",")]
    if a.longest:
        print(f"| model | " + " | ".join(f"{c} GB ({c * GIB_PER_GB:.1f} GiB)" for c in cards) + " |")
        print("|---|" + "---|" * len(cards))
        for shape in a.shapes.split(","):
            cells = []
            for c in cards:
                seq, d, limit = longest(a.binary, shape, budget_of(c), a.host_gib, a.r, a.step, a.max_seq)
                if d is None:
                    cells.append("-")
                    continue
                s = d["predicted_step_s"]["total"]
                note = {"host": ", host-limited", "max": ", --max-seq reached"}[limit] if limit else ""
                cells.append(f"{'>= ' if limit == 'max' else ''}{seq:,} ({s:.1f} s, {seq / s:,.0f} tok/s{note})")
            print(f"| {shape} | " + " | ".join(cells) + " |")
        return
    print(f"| model | tokens | " + " | ".join(f"{c} GB ({c * GIB_PER_GB:.1f} GiB)" for c in cards) + " |")
    print("|---|---|" + "---|" * len(cards))
    for shape in a.shapes.split(","):
        layers = layers_of(a.binary, shape)
        for seq in (int(s) for s in a.seqs.split(",")):
            cells = [cell(*plan(a.binary, shape, seq, budget_of(c), a.host_gib), layers, budget_of(c)) for c in cards]
            print(f"| {shape} | {seq:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
