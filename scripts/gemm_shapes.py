#!/usr/bin/env python3
"""The base GEMMs of a block at the trainer's shapes, with LoRA's columns folded in and without (a tool, not a test).

The trainer folds LoRA's rank-r work into the base GEMMs (lib/model/projection_group.cpp, qlora_linear.cpp):
forward [x | x A^T] [W | B]^T (K wider by sum r, rounded up to 8), input gradient dy [W | B | 0] = [dx | dy B] (N
wider) and down_proj's [dy | dy B] [W; A] (K wider). The profiles ran the base GEMMs at about 90% of the rate one
8192^3 GEMM reaches. This times each GEMM at its folded shape against the base GEMM alone plus the rank-r GEMM apart,
so that a shape whose widened side costs more than the separate product shows (tile and wave quantization), and
with the widened side padded further (zero columns) to a multiple of 64, 128 or 256 beyond the base's. Then LoRA's
x A^T in the trainer's layouts against contiguous operands, and the rank-r term added after a base GEMM against the
base GEMM accumulating onto it.

    python3 scripts/gemm_shapes.py            # 8B at 4096 tokens, 1B at 8192 (bf16, CUDA events, the variants interleaved, median of 9 rounds)
"""
import argparse

import torch

MODELS = {  # hidden, intermediate, q out, kv out, tokens of the bench row, LoRA r (q/k/v/o/gate/up/down 16 each)
    "8b": (4096, 14336, 4096, 1024, 4096),
    "1b": (2048, 8192, 2048, 512, 8192),
}


def timed(fn, reps=30, rounds=5):
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps * 1e3)
    return sorted(times)[len(times) // 2]


def interleaved(fns, rounds, reps):
    """Each variant's median time in us over `rounds` rounds, every round timing the variants in turn (the clocks
    drift between runs of one shape by 5-10% on an H100: a variant timed apart from another is not compared with it)."""
    runs = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            runs[k].append(timed(fn, reps=reps, rounds=1))
    return {k: sorted(v)[len(v) // 2] for k, v in runs.items()}


def header(*columns):
    """A markdown table's first two lines, after a blank line."""
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def pad8(n):
    return (n + 7) // 8 * 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,1b")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device=dev, dtype=dt)
    rate = 2 * 8192**3 / (timed(lambda: torch.mm(a, a), reps=10) * 1e-6)
    del a
    print(f"{torch.cuda.get_device_name()}: one 8192^3 bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    header("model", "GEMM", "M x N x K", "folded us (TFLOP/s, % of 8192^3)", "base alone us (TFLOP/s)",
           "rank-r part apart us", "folded / (base + apart)", "folded, the side padded to 64 / 128 / 256 us")
    for name in args.models.split(","):
        H, I, Q, KV, T = MODELS[name]
        r = 16
        cases = []
        # (label, M, N, K, extra: the folded side's widening, which side)
        qkv = Q + 2 * KV
        cases.append(("q/k/v forward", T, qkv, H, pad8(3 * r), "K"))
        cases.append(("gate/up forward", T, 2 * I, H, pad8(2 * r), "K"))
        cases.append(("q/k/v input gradient", T, H, qkv, pad8(3 * r), "N"))
        cases.append(("gate/up input gradient", T, H, 2 * I, pad8(2 * r), "N"))
        cases.append(("down_proj input gradient", T, I, H, pad8(r), "K"))
        for label, M, N, K, e, side in cases:
            # the variants' operands, then their timings interleaved over rounds
            fns = {}
            if side == "K":  # [M, K + e] x [K + e, N]: the rank-r part is [M, e] x [e, N] (an addmm over the output)
                x = torch.randn(M, K + 256, device=dev, dtype=dt)
                w = torch.randn(N, K + 256, device=dev, dtype=dt)  # stored [out, in] as the trainer's weights
                xb, wb = x[:, :K].contiguous(), w[:, :K].contiguous()
                xr, wr = x[:, K:K + e].contiguous(), w[:, K:K + e].contiguous()
                y = torch.empty(M, N, device=dev, dtype=dt)
                for ep in [e] + [(e + m - 1) // m * m for m in (64, 128, 256)]:
                    xp, wp = x[:, :K + ep].contiguous(), w[:, :K + ep].contiguous()
                    fns[ep] = (lambda xp=xp, wp=wp: torch.mm(xp, wp.t(), out=y))
                fns["base"] = lambda: torch.mm(xb, wb.t(), out=y)
                fns["apart"] = lambda: y.addmm_(xr, wr.t())
                shape = f"{M} x {N} x {K}+{e}"
            else:  # [M, K] x [K, N + e]: the rank-r part is [M, K] x [K, e] (reads all of dy again)
                dy = torch.randn(M, K, device=dev, dtype=dt)
                w = torch.randn(K, N + 256, device=dev, dtype=dt)  # [out, in + extra]: [W | B | 0]
                wb, wr = w[:, :N].contiguous(), w[:, N:N + e].contiguous()
                ob, orr = torch.empty(M, N, device=dev, dtype=dt), torch.empty(M, e, device=dev, dtype=dt)
                for ep in [e] + [(e + m - 1) // m * m for m in (64, 128, 256)]:
                    wp = w[:, :N + ep].contiguous()
                    op = torch.empty(M, N + ep, device=dev, dtype=dt)
                    fns[ep] = (lambda wp=wp, op=op: torch.mm(dy, wp, out=op))
                fns["base"] = lambda: torch.mm(dy, wb, out=ob)
                fns["apart"] = lambda: torch.mm(dy, wr, out=orr)
                shape = f"{M} x {N}+{e} x {K}"
            med = interleaved(fns, args.rounds, 20)
            flops = 2 * M * N * K
            tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731 (the base's FLOPs: the useful work)
            folded, base, apart = med[e], med["base"], med["apart"]
            padded = [med[k] for k in list(fns)[1:-2]]
            print(f"| {name} | {label} | {shape} | {folded:.1f} ({tf(folded):.0f}, {tf(folded) * 1e12 / rate:.0%}) | "
                  f"{base:.1f} ({tf(base):.0f}) | {apart:.1f} | {folded / (base + apart):.3f} | "
                  f"{' / '.join(f'{t:.1f}' for t in padded)} |")
            torch.cuda.empty_cache()

    # LoRA's x A^T (ATen's mm, as lib/kernels/lora_gemm.cpp's reference) in the trainer's layouts: q / k / v's and gate /
    # up's x are the first columns of the group's concatenated input [x | x A^T | 0] (K + sum r rounded up to 8) and
    # the product is written into its next columns; against contiguous operands (bench_lora_gemm's), the buffer's rows
    # padded to 64 elements, and the product into a contiguous [T, r] (a copy into the buffer after it).
    header("model", "x A^T", "T x K x r", "contiguous us (GB/s)", "trainer's layout us (GB/s)", "rows padded to 64 us",
           "out contiguous us")
    for name in args.models.split(","):
        H, I, Q, KV, T = MODELS[name]
        for label, K, r in (("q/k/v", H, 48), ("gate/up", H, 32), ("down_proj", I, 16)):
            a = torch.randn(r, K, device=dev, dtype=dt)
            x = torch.randn(T, K, device=dev, dtype=dt)
            out = torch.empty(T, r, device=dev, dtype=dt)
            bufs = {w: torch.randn(T, w, device=dev, dtype=dt) for w in (K + pad8(r), (K + r + 63) // 64 * 64)}
            fns = {"contiguous": lambda: torch.mm(x, a.t(), out=out)}
            for w, b in bufs.items():
                fns[w] = (lambda b=b: torch.mm(b[:, :K], a.t(), out=b[:, K:K + r]))
            b0 = bufs[K + pad8(r)]
            fns["out contiguous"] = lambda: torch.mm(b0[:, :K], a.t(), out=out)
            med = interleaved(fns, args.rounds, 50)
            gbs = lambda us: 2 * (T * K + r * K + T * r) / (us * 1e-6) / 1e9  # noqa: E731
            vals = list(med.values())
            print(f"| {name} | {label} | {T} x {K} x {r} | {vals[0]:.1f} ({gbs(vals[0]):.0f}) | {vals[1]:.1f} "
                  f"({gbs(vals[1]):.0f}) | {vals[2]:.1f} | {vals[3]:.1f} |")

    # The rank-r term added over a base GEMM's output where it is not folded (o_proj's and down_proj's forward,
    # o_proj's input gradient): y = x W^T, then y += t B^T (an addmm reading and writing y), against y = t B^T first
    # and the base GEMM accumulating onto it (beta 1: y is read in its epilogue).
    header("model", "y = x W^T + t B^T", "T x N x K, r", "base, then addmm us", "t B^T, then the base accumulating us",
           "base alone us")
    for name in args.models.split(","):
        H, I, Q, KV, T = MODELS[name]
        for label, N, K in (("o_proj forward", H, Q), ("down_proj forward", H, I), ("o_proj input gradient", Q, H)):
            r = 16
            x = torch.randn(T, K, device=dev, dtype=dt)
            w = torch.randn(N, K, device=dev, dtype=dt)
            t = torch.randn(T, r, device=dev, dtype=dt)
            b = torch.randn(N, r, device=dev, dtype=dt)
            y = torch.empty(T, N, device=dev, dtype=dt)

            def after():
                torch.mm(x, w.t(), out=y)
                y.addmm_(t, b.t())

            def onto():
                torch.mm(t, b.t(), out=y)
                y.addmm_(x, w.t())

            fns = {"after": after, "onto": onto, "base": lambda: torch.mm(x, w.t(), out=y)}
            med = interleaved(fns, args.rounds, 20)
            print(f"| {name} | {label} | {T} x {N} x {K}, {r} | {med['after']:.1f} | {med['onto']:.1f} | "
                  f"{med['base']:.1f} |")


if __name__ == "__main__":
    main()
