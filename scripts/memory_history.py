#!/usr/bin/env python3
"""What held the GPU's memory at a run's peak: reads the caching allocator's history that `QT_MEMORY_HISTORY=FILE
qlora-train ...` writes (FILE after step 1, FILE.oom at an out-of-memory error in a step; the format of
torch.cuda.memory._dump_snapshot), replays its allocations and frees, and prints the peak of bytes in use with the
tensors alive there, grouped by the first frames of our code (qt::) in their C++ stacks, largest first; and the same
at the history's end.

Usage: python3 scripts/memory_history.py FILE [--top 25] [--depth 2]"""
import argparse
import collections
import pickle
import sys

GIB = 2 ** 30


def origin(frames, depth):
    """The first `depth` frames of our code (qt::, skipping the allocator's and ATen's), or the first frame."""
    ours = [f.get("name", "?") for f in frames if "qt::" in f.get("name", "")]
    if not ours:  # inlined or unnamed: the first frames outside the allocator and the libraries
        lib = ("c10::", "at::", "torch::", "std::", "??", "_start", "__libc")
        ours = [f.get("name", "?") for f in frames if not f.get("name", "??").startswith(lib)] or ["?"]
    return " <- ".join(n.split("(")[0][:90] for n in ours[:depth])


def report(live, title, top, depth):
    groups = collections.defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        g = groups[origin(frames, depth)]
        g[0] += size
        g[1] += 1
    total = sum(s for s, _ in live.values())
    print(f"\n{title}: {total / GIB:.3f} GiB in {len(live)} blocks")
    for name, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {size / GIB:8.3f} GiB {n:6d}  {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--depth", type=int, default=2)
    a = ap.parse_args()
    with open(a.file, "rb") as f:
        snap = pickle.load(f)
    traces = [t for t in snap.get("device_traces", []) if t]
    if not traces:
        sys.exit(f"{a.file}: no allocation history in it (was QT_MEMORY_HISTORY set from the start?)")
    events = traces[0]
    frees = {"free_completed"} if any(e["action"] == "free_completed" for e in events) else {"free_requested"}
    def replay(until):
        live, in_use, peak, peak_index = {}, 0, -1, -1
        for i, e in enumerate(events[:until]):
            act = e["action"]
            if act == "alloc":
                live[e["addr"]] = (e["size"], e.get("frames", []))
                in_use += e["size"]
                if in_use > peak:
                    peak, peak_index = in_use, i
            elif act in frees and e["addr"] in live:
                in_use -= live.pop(e["addr"])[0]
        return live, peak_index

    counts = collections.Counter(e["action"] for e in events)
    for i, e in enumerate(events):
        if e["action"] == "oom":
            print(f"out of memory at event {i}: {e.get('size', 0) / GIB:.3f} GiB asked, "
                  f"{e.get('device_free', 0) / GIB:.3f} GiB free on the device")
    live, peak_index = replay(len(events))
    at_peak, _ = replay(peak_index + 1)
    print(f"{len(events)} events {dict(counts)}; allocations made before the history started are not counted")
    report(at_peak, f"peak (event {peak_index} of {len(events)})", a.top, a.depth)
    report(live, "at the history's end", a.top, a.depth)
    segs = snap.get("segments", [])
    print(f"\nsegments at the end: {sum(s['total_size'] for s in segs) / GIB:.3f} GiB reserved in {len(segs)}, "
          f"{sum(s.get('allocated_size', 0) for s in segs) / GIB:.3f} GiB allocated")


if __name__ == "__main__":
    main()
