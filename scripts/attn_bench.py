#!/usr/bin/env python3
"""Causal attention at the Llama-3.1-8B head shapes (32 query heads, 8 key/value heads, head_dim 128, bf16):
forward and forward+backward time of each torch SDPA backend this torch offers on the GPU, with grouped K/V
(enable_gqa) and with K/V expanded to every query head, in the [B, S, heads, D] layout the trainer keeps
(q.transpose(1, 2) views) and contiguous [B, heads, S, D]. A tool for choosing the trainer's attention call,
not a test. Prints one JSON line per case and a table.

Usage (GPU machine): python3 scripts/attn_bench.py [B x S ...]   (default 2x2048 1x8192 1x32768)
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 32, 8, 128


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def case(b, s, backend, gqa, layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h: torch.randn(b, s, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(HQ), mk(HKV), mk(HKV)
    if not gqa:
        k = k.repeat_interleave(HQ // HKV, dim=2)
        v = v.repeat_interleave(HQ // HKV, dim=2)
    for t in (q, k, v):
        t.requires_grad_(True)

    def prep(t):
        t = t.transpose(1, 2)
        return t.contiguous() if layout == "contig" else t

    def fwd():
        return F.scaled_dot_product_attention(prep(q), prep(k), prep(v), is_causal=True, enable_gqa=gqa)

    reps = 20 if s <= 8192 else 6
    with sdpa_kernel([backend]):
        try:
            with torch.no_grad():
                f_ms = timed(fwd, reps)
            go = torch.randn(b, HQ, s, D, device="cuda", dtype=torch.bfloat16, generator=g)
            fb_ms = timed(lambda: torch.autograd.grad(fwd(), (q, k, v), go), reps)
        except RuntimeError as e:
            return dict(error=str(e).splitlines()[0][:120])
    flops_f = 2 * b * HQ * s * s * D  # causal: half of 4 * b * h * s^2 * d
    return dict(fwd_ms=round(f_ms, 3), fwd_bwd_ms=round(fb_ms, 3), fwd_tflops=round(flops_f / f_ms / 1e9, 1),
                fwd_bwd_tflops=round(3.5 * flops_f / fb_ms / 1e9, 1))


def main():
    shapes = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:]] or [(2, 2048), (1, 8192), (1, 32768)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cudnn {torch.backends.cudnn.version()}")
    print("priority order:", getattr(torch._C, "_get_sdp_priority_order", lambda: "n/a")())
    rows = []
    for b, s in shapes:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for gqa in (True, False):
                for layout in ("bshd", "contig"):
                    r = dict(b=b, s=s, backend=backend.name, gqa=gqa, layout=layout, **case(b, s, backend, gqa, layout))
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    print("| B x S | backend | K/V | layout | fwd ms (TFLOP/s) | fwd+bwd ms (TFLOP/s) |")
    for r in rows:
        kv = "grouped" if r["gqa"] else "expanded"
        if "error" in r:
            print(f"| {r['b']}x{r['s']} | {r['backend']} | {kv} | {r['layout']} | {r['error']} | |")
        else:
            print(f"| {r['b']}x{r['s']} | {r['backend']} | {kv} | {r['layout']} | {r['fwd_ms']} ({r['fwd_tflops']}) "
                  f"| {r['fwd_bwd_ms']} ({r['fwd_bwd_tflops']}) |")


if __name__ == "__main__":
    main()
