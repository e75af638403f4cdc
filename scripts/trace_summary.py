#!/usr/bin/env python3
"""GPU time of the profiled steps (QT_PROFILE_STEP's profile_trace.json; QT_PROFILE_STEPS=2 takes a step boundary in)
by ATen op and input shapes, and the idle time between kernels on the compute stream: by the ops around each gap,
and the longest gaps one by one with what the host ran meanwhile.

    python3 scripts/trace_summary.py RUN_DIR/profile_trace.json [--top 45]

Each kernel is attributed to the innermost CPU op that launched it (the trace's "External id"); ops launched
outside any recorded op show as their kernel's name.
"""
import argparse
import bisect
import collections
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--gaps", type=int, default=8, help="the longest gaps listed one by one")
    ap.add_argument("--kernels", default="", help="also list the GPU time of every kernel whose name contains one of "
                    "these comma-separated strings, by kernel name, grid and the op that launched it")
    args = ap.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops = {}
    kernels = []
    cpu_ops = collections.defaultdict(list)
    phases = []
    launches = {}  # correlation id -> when the host launched it
    for e in events:
        cat = e.get("cat", "")
        a = e.get("args", {})
        if cat == "cpu_op" and "External id" in a:
            ops[a["External id"]] = (e["name"], a.get("Input Dims"))
            cpu_ops[e.get("tid")].append(e)
        elif cat == "user_annotation" and e.get("name", "").startswith("qt::"):
            phases.append(e)  # the trainer's host phases (RECORD_USER_SCOPE in lib/train/trainer.cpp)
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(e)
        elif cat == "cuda_runtime" and "correlation" in a:
            launches[a["correlation"]] = e["ts"]
    # The op that encloses each op on its thread (its caller), so that a copy_ shows what asked for it.
    parent = {}
    for evs in cpu_ops.values():
        stack = []
        for e in sorted(evs, key=lambda e: (e["ts"], -e.get("dur", 0))):
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            if stack:
                parent[e["args"]["External id"]] = stack[-1]["name"]
            stack.append(e)
    if not kernels:
        print("no GPU kernels in the trace")
        return
    by_stream = collections.Counter()
    for k in kernels:
        by_stream[k["args"].get("stream")] += k["dur"]
    main_stream = by_stream.most_common(1)[0][0]
    total = sum(k["dur"] for k in kernels)
    rows = collections.defaultdict(lambda: [0.0, 0, ""])
    for k in kernels:
        eid = k["args"].get("External id")
        op = ops.get(eid)
        name, dims = op if op else (k["name"][:60], None)
        if name in ("aten::copy_", "aten::fill_", "aten::add", "aten::sum") and eid in parent:
            name += " < " + parent[eid].replace("torch::autograd::", "")[:50]
        if k["args"].get("stream") != main_stream:
            name = "[side stream] " + name
        shape = ",".join("x".join(str(d) for d in dim) for dim in (dims or []) if dim)
        r = rows[(name, shape)]
        r[0] += k["dur"]
        r[1] += 1
        r[2] = k["name"][:48]
    print(f"GPU time {total / 1e3:.1f} ms in {len(kernels)} kernels; streams (ms): "
          + ", ".join(f"{s}: {d / 1e3:.1f}" for s, d in by_stream.most_common()))
    print(f"{'ms':>8} {'calls':>6}  op [input shapes]  (a kernel)")
    for (name, shape), (us, n, kname) in sorted(rows.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us / 1e3:8.2f} {n:6d}  {name} [{shape[:70]}]  ({kname})")
    if args.kernels:
        # Kernels by name: where an op's row sums several kernels (a node's backward), each one's own time.
        wanted = [w for w in args.kernels.split(",") if w]
        by_name = collections.defaultdict(lambda: [0.0, 0])
        for k in kernels:
            if any(w in k["name"] for w in wanted):
                op = ops.get(k["args"].get("External id"))
                key = (k["name"][:70], str(k["args"].get("grid")), (op[0] if op else "").replace("torch::autograd::", "")[:40])
                by_name[key][0] += k["dur"]
                by_name[key][1] += 1
        print(f"kernels matching {args.kernels}:")
        print(f"{'ms':>8} {'calls':>6} {'us/call':>8}  kernel  grid  (op)")
        for (name, grid, op), (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
            print(f"{us / 1e3:8.2f} {n:6d} {us / n:8.1f}  {name}  {grid}  ({op})")
    main_k = sorted((k for k in kernels if k["args"].get("stream") == main_stream), key=lambda k: k["ts"])
    gaps = []
    for prev, nxt in zip(main_k, main_k[1:]):
        g = nxt["ts"] - (prev["ts"] + prev["dur"])
        if g > 0:
            gaps.append((g, prev, nxt))
    span = main_k[-1]["ts"] + main_k[-1]["dur"] - main_k[0]["ts"]
    idle = sum(g for g, _, _ in gaps)
    print(f"compute stream: span {span / 1e3:.1f} ms, busy {sum(k['dur'] for k in main_k) / 1e3:.1f} ms, "
          f"idle {idle / 1e3:.1f} ms in {len(gaps)} gaps")
    hist = collections.Counter()
    for g, _, _ in gaps:
        hist["<5us" if g < 5 else "5-20us" if g < 20 else "20-100us" if g < 100 else "100us-1ms" if g < 1000 else ">1ms"] += g
    print("idle by gap size (ms): " + ", ".join(f"{b}: {v / 1e3:.1f}" for b, v in hist.items()))

    def label(k):
        op = ops.get(k["args"].get("External id"))
        return op[0] if op else k["name"][:40]

    ctx = collections.defaultdict(lambda: [0.0, 0])
    for g, prev, nxt in gaps:
        c = ctx[(label(prev), label(nxt))]
        c[0] += g
        c[1] += 1
    print("idle by (op before -> op after), top 15:")
    for (a, b), (us, n) in sorted(ctx.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"{us / 1e3:8.2f} ms {n:6d}  {a} -> {b}")
    # How far ahead of the GPU the host was: each compute-stream kernel's start less its launch on the host. Near zero,
    # the GPU was waiting for the host to launch it (host-bound); large, the host was ahead.
    lead = sorted(k["ts"] - launches[k["args"]["correlation"]] for k in main_k
                  if k["args"].get("correlation") in launches)
    if lead:
        q = lambda f: lead[min(len(lead) - 1, int(f * len(lead)))] / 1e3
        print(f"host lead (kernel start - its launch), ms: median {q(0.5):.3f}, 10% {q(0.1):.3f}, 90% {q(0.9):.3f}; "
              f"{sum(x < 20 for x in lead)} of {len(lead)} kernels started within 20 us of their launch")
    # The longest gaps one by one (a step's boundary among them when QT_PROFILE_STEPS > 1), with what the host ran
    # meanwhile: the CPU ops that began inside the gap, by total time (nested ops count within their callers).
    all_cpu = sorted((e for evs in cpu_ops.values() for e in evs), key=lambda e: e["ts"])
    starts = [e["ts"] for e in all_cpu]
    print(f"longest gaps, top {args.gaps}, with the CPU ops that began in each:")
    for g, prev, nxt in sorted(gaps, key=lambda t: -t[0])[: args.gaps]:
        a, b = prev["ts"] + prev["dur"], nxt["ts"]
        host = collections.Counter()
        for e in all_cpu[bisect.bisect_left(starts, a): bisect.bisect_right(starts, b)]:
            host[e["name"]] += e.get("dur", 0)
        # the trainer's phases that overlap the gap, with how much of it each covers
        inside = collections.Counter()
        for ph in phases:
            o = min(b, ph["ts"] + ph.get("dur", 0)) - max(a, ph["ts"])
            if o > 0:
                inside[ph["name"]] += o
        print(f"{g / 1e3:8.2f} ms at +{(a - main_k[0]['ts']) / 1e3:.1f} ms  {label(prev)} -> {label(nxt)};  host: "
              + ", ".join(f"{n} {d / 1e3:.2f}" for n, d in host.most_common(6))
              + ("; phases: " + ", ".join(f"{n} {d / 1e3:.2f}" for n, d in inside.most_common()) if inside else ""))


if __name__ == "__main__":
    main()
