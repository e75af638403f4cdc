"""GPU checks beyond the tests (tooling, run by scripts/gpu-check.sh extra): FullyShard through NCCL with one
rank under mpirun and torchrun against the unsharded run, a real CUDA out-of-memory, and peak memory at long
contexts on the 8B shape. Prints one JSON line per check.
Usage: python3 scripts/gpu_extra_checks.py BINARY WORKDIR [fsdp,oom,long]"""
import json, os, pathlib, random, subprocess, sys

def run(binary, work, name, shape, batch, seq, steps, extra=(), launcher=()):
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"ids_{batch}x{seq}.jsonl"
    if not data.exists():
        rnd = random.Random(0)
        data.write_text("".join(json.dumps({"input_ids": [rnd.randrange(0, 32000) for _ in range(seq)]}) + "\n"
                                for _ in range(batch)))
    out = work / name
    cfg = {"output_dir": str(out), "model": {"init": "random", "shape": shape, "quant": "nf4", "device": "cuda"},
           "lora": {"r": 16, "alpha": 16},
           "data": {"train_file": str(data), "format": "tokenized", "max_seq_len": seq, "packing": False, "shuffle": False},
           "train": {"steps": steps, "batch_size": batch, "seed": 0, "log_every": 1},
           "optim": {"lr": 1e-3, "schedule": "constant"}, "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    subprocess.run(["rm", "-rf", str(out)])
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    p = subprocess.run([*launcher, binary, "--config", str(path), *extra], capture_output=True, text=True, env=env)
    m = []
    if (out / "metrics.jsonl").exists():
        m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    return p, m

def main():
    binary, work = sys.argv[1], pathlib.Path(sys.argv[2])
    which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["fsdp", "oom", "long"]
    if "fsdp" in which:
        _, base = run(binary, work, "plain", "llama-3.2-1b", 4, 1024, 6)
        for launcher, tag in ((["mpirun", "-np", "1"], "mpirun"),
                              (["torchrun", "--no-python", "--nproc-per-node", "1"], "torchrun")):
            p, m = run(binary, work, f"shard_{tag}", "llama-3.2-1b", 4, 1024, 6, ["--set", "train.shard=blocks"], launcher)
            ok = p.returncode == 0 and len(m) == 6 and len(base) == 6
            diff = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(m, base)) if ok else None
            print(json.dumps(dict(check=f"fullyshard nccl 1 rank ({tag})", rc=p.returncode, max_rel_loss_diff=diff,
                                  losses=[round(x["loss"], 4) for x in m], unsharded=[round(x["loss"], 4) for x in base],
                                  tok_per_s=round(m[-1]["tokens_per_s"]) if m else None,
                                  unsharded_tok_per_s=round(base[-1]["tokens_per_s"]) if base else None,
                                  ok=bool(ok and diff < 1e-2), err=p.stderr[-400:] if p.returncode else "")), flush=True)
    if "oom" in which:
        p, _ = run(binary, work, "oom", "llama-3.1-8b", 64, 8192, 1, ["--set", "train.memory.checkpointing=false"])
        line = [l for l in p.stderr.splitlines() if "out of GPU memory" in l]
        print(json.dumps(dict(check="real CUDA out of memory", rc=p.returncode, ok=p.returncode == 9 and bool(line),
                              message=(line[0] if line else p.stderr[-600:])[:900])), flush=True)
    if "long" in which:
        for seq in (65536, 131072):
            p, m = run(binary, work, f"long_{seq}", "llama-3.1-8b", 1, seq, 2)
            print(json.dumps(dict(check=f"8B 1 x {seq}", rc=p.returncode,
                                  peak_gib=max((x["gpu_mem_gib"] for x in m), default=None),
                                  step_s=m[-1]["step_s"] if m else None,
                                  tok_per_s=round(seq / m[-1]["step_s"]) if m else None,
                                  err=p.stderr[-300:] if p.returncode else "")), flush=True)

if __name__ == "__main__":
    main()
