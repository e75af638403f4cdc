"""FullyShard (train.shard "blocks") end to end on a tiny NF4 model, CPU, under mpirun: 1, 2 and 3 sharded ranks
give the losses and final LoRA weights of one unsharded process on the same global batch (to fp32 rounding),
each rank holds about 1/N of the block parameters, and a checkpoint written by 2 ranks (one optimizer shard
per rank) resumes on 3 ranks and on 1 with the straight run's next-step loss. One intra-op thread per rank."""
import json, os, pathlib, re, shutil, signal, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, save_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_fsdp_"))
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}

def write_config(name, **over):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 6, "alpha": 12},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True,
                    "eval_fraction": 0.2},
           # The global batch (6 rows) divides among 1, 2 and 3 ranks.
           "train": {"steps": 4, "batch_size": 6, "seed": 3, "log_every": 1, "eval_every": 2, "shard": "blocks"},
           "optim": {"lr": 2e-3, "warmup_steps": 1, "weight_decay": 0.01},
           "checkpoint": {"every": 2, "keep_last": 3}, "logging": {"progress": "lines"}}
    return save_config(TMP, name, cfg, over)

def run(config, np, *extra):
    cmd = [BIN, "--config", str(config), *extra]
    if np > 0:
        cmd = ["mpirun", "-np", str(np), "--oversubscribe"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    check(p.returncode == 0, f"{' '.join(cmd[:4])} {config.name} exits 0 ({p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    return p

def losses(name, key="loss"):
    out = {}
    for line in (TMP / name / "metrics.jsonl").read_text().splitlines():
        j = json.loads(line)
        if key in j:
            out[j["step"]] = j[key]
    return out

def adapter(name):
    from safetensors.torch import load_file
    return load_file(str(TMP / name / "adapter" / "adapter_model.safetensors"))

def optimizer_state(ck):
    """The whole AdamW state of a checkpoint: optimizer.safetensors, or the rank shards concatenated by rows."""
    from safetensors.torch import load_file
    import torch
    if (ck / "optimizer.safetensors").exists():
        return load_file(str(ck / "optimizer.safetensors"))
    parts = [load_file(str(f)) for f in sorted(ck.glob("optimizer-shard-*.safetensors"))]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

def state_matches(got, want):
    """Same names; each tensor's rows (past the shards' zero padding) equal to fp32 rounding."""
    if set(got) != set(want):
        return False, float("inf")
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        if g.shape[1:] != w.shape[1:] or g.shape[0] < w.shape[0]:
            return False, float("inf")
        if g.shape[0] > w.shape[0] and bool(g[w.shape[0]:].abs().max() > 0):  # the padding rows stay zero
            return False, float("inf")
        worst = max(worst, float((g[:w.shape[0]] - w).norm() / max(float(w.norm()), 1e-30)))
    return worst < 1e-4, worst

def close_losses(a, b, steps):
    return all(s in a and s in b and abs(a[s] - b[s]) <= 1e-5 * abs(b[s]) for s in steps)

def max_rel(a, b):
    worst = 0.0
    for k in b:
        worst = max(worst, float((a[k] - b[k]).norm() / max(float(b[k].norm()), 1e-12)))
    return worst

def signal_rank(proc, rank, sig):
    """Sends `sig` to the process of `rank` under the mpirun `proc`, then waits for the job (killed after 120 s:
    "(hung)" in the returned stderr). Returns (whether that rank's process was found, the job's stderr)."""
    victim = None
    for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            victim = int(child)
    if victim:
        os.kill(victim, sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err = "(hung) " + err
    return victim is not None, err

def signal_rank_mid_run(name, sig, **over):
    """Starts a long 2-rank run, sends `sig` to rank 1 once two lines are in metrics.jsonl; returns (found,
    stderr, proc) with proc.waited the seconds from the signal to the job's end."""
    cfg = write_config(name, train__steps=200, checkpoint__every=0, **over)
    proc = subprocess.Popen(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    metrics = TMP / name / "metrics.jsonl"
    while proc.poll() is None and time.time() - t0 < 120 and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    t1 = time.time()
    found, err = signal_rank(proc, 1, sig)
    proc.waited = time.time() - t1
    return found, err, proc

def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 48, 21)

    units_s3 = 0
    run(write_config("ref", train__shard="none"), 0)
    ref = losses("ref")
    ref_adapter = adapter("ref")
    ref_eval = losses("ref", "eval_loss")
    check(len(ref) == 4 and ref[4] < ref[1] and sorted(ref_eval) == [2, 4], f"the unsharded reference trains ({ref}, eval {ref_eval})")

    # s1/s2/s3: the blocks sharded; s3e: the embeddings and lm_head too.
    for np, name, over in ((1, "s1", {}), (2, "s2", {}), (3, "s3", {}), (3, "s3e", {"train__shard_embeddings": True})):
        p = run(write_config(name, **over), np)
        if p.returncode:
            continue
        got = losses(name)
        check(close_losses(got, ref, (1, 2, 3, 4)),
              f"{name}: {np} sharded rank(s) give the single-process losses {[got.get(s) for s in (1, 2, 3, 4)]} vs {[ref[s] for s in (1, 2, 3, 4)]}")
        ev = losses(name, "eval_loss")
        check(close_losses(ev, ref_eval, (2, 4)), f"{name}: held-out losses (each rank its share) {ev} equal the single process's {ref_eval}")
        a = adapter(name)
        check(set(a) == set(ref_adapter) and all(a[k].shape == ref_adapter[k].shape for k in a),
              f"{np} sharded rank(s) export the whole PEFT adapter ({len(a)} tensors)")
        if set(a) == set(ref_adapter):
            err = max_rel(a, ref_adapter)
            check(err < 1e-4, f"{np} sharded rank(s) end with the single-process LoRA weights (max rel. diff {err:.2e})")
        m = re.search(r"FullyShard: each rank holds (\d+) bytes of the sharded parameters \(of (\d+) unsharded\) over (\d+) rank", p.stderr)
        check(m is not None and int(m.group(3)) == np, f"{np} rank(s): the per-rank parameter bytes are logged")
        if m:
            ratio = int(m.group(1)) * np / int(m.group(2))
            check(1.0 <= ratio < 1.05, f"{name}: each rank holds 1/{np} of the sharded parameters "
                                       f"({m.group(1)} of {m.group(2)} bytes, x{np} = {ratio:.3f})")
        if name == "s3e":
            check(m is not None and int(m.group(2)) > units_s3, f"s3e: the sharded bytes include the embeddings ({m.group(2) if m else None} > {units_s3})")
        if name == "s3" and m:
            units_s3 = int(m.group(2))
        if np == 2:
            ck = TMP / name / "checkpoint-2"
            shards = sorted(f.name for f in ck.glob("optimizer-shard-*.safetensors"))
            check(shards == ["optimizer-shard-00000-of-00002.safetensors", "optimizer-shard-00001-of-00002.safetensors"]
                  and not (ck / "optimizer.safetensors").exists(), f"2 ranks save one optimizer shard each ({shards})")
        ok, err = state_matches(optimizer_state(TMP / name / "checkpoint-4"), optimizer_state(TMP / "ref" / "checkpoint-4"))
        check(ok, f"{np} rank(s): the optimizer shards together are the single-process AdamW state (rel. diff {err:.2e})")

    # A checkpoint of 2 ranks resumes on 3 ranks (sharded, embeddings too) and on 1 (unsharded): the optimizer
    # state is re-sliced.
    # And an unsharded checkpoint resumes on 2 sharded ranks.
    for np, name, over, src in ((3, "r3", {"train__shard_embeddings": True}, "s2"), (0, "r1", {"train__shard": "none"}, "s2"), (2, "r2", {}, "ref")):
        check((TMP / src / "checkpoint-2" / "COMPLETE").exists(), f"{src} wrote checkpoint-2")
        if (TMP / src / "checkpoint-2" / "COMPLETE").exists():
            (TMP / name).mkdir()
            shutil.copytree(TMP / src / "checkpoint-2", TMP / name / "checkpoint-2")
            shutil.copy(TMP / src / "metrics.jsonl", TMP / name / "metrics.jsonl")
            p = run(write_config(name, **over), np, "--resume", "auto")
            if p.returncode:
                continue
            got = losses(name)
            ranks = max(np, 1)
            check("resumed from" in p.stderr and close_losses(got, ref, (3, 4)),
                  f"{src}'s checkpoint-2 resumed on {ranks} rank(s) gives the straight run's next losses "
                  f"{[got.get(s) for s in (3, 4)]} vs {[ref[s] for s in (3, 4)]}")
            # The re-sliced moments carried on: two steps later the state is still the single-process one.
            ok, err = state_matches(optimizer_state(TMP / name / "checkpoint-4"), optimizer_state(TMP / "ref" / "checkpoint-4"))
            check(ok, f"{src}'s checkpoint resumed on {ranks} rank(s): the AdamW state at step 4 is the straight run's (rel. diff {err:.2e})")

    # A 16-bit base (model.quant "none"): the dense weights are sharded like the NF4 bytes.
    run(write_config("refd", model__quant="none", train__shard="none"), 0)
    p = run(write_config("s2d", model__quant="none"), 2)
    if p.returncode == 0:
        got, want = losses("s2d"), losses("refd")
        check(close_losses(got, want, (1, 2, 3, 4)) and max_rel(adapter("s2d"), adapter("refd")) < 1e-4,
              f"a 16-bit base on 2 sharded ranks gives the single-process losses and adapter {got} vs {want}")

    # DoRA: the magnitude vectors are sharded and trained like A and B.
    run(write_config("refdora", lora__use_dora=True, train__shard="none"), 0)
    p = run(write_config("s3dora", lora__use_dora=True), 3)
    if p.returncode == 0:
        got, want = losses("s3dora"), losses("refdora")
        a, b = adapter("s3dora"), adapter("refdora")
        check(close_losses(got, want, (1, 2, 3, 4)) and set(a) == set(b) and any("magnitude" in k for k in b)
              and max_rel(a, b) < 1e-4, f"DoRA on 3 sharded ranks gives the single-process losses and adapter {got} vs {want}")

    # modules_to_save: the trained embeddings and lm_head stay whole on every rank (their gradients summed over the
    # ranks) while the blocks are sharded; 2 sharded ranks give the single process's losses and adapter, and their
    # checkpoint-2 resumes on 3 sharded ranks (embeddings sharded too) with the straight run's next losses.
    mts = {"lora__modules_to_save": ["lm_head", "embed_tokens"]}
    run(write_config("mref", train__shard="none", **mts), 0)
    p = run(write_config("m2", **mts), 2)
    if p.returncode == 0:
        got, want = losses("m2"), losses("mref")
        a, b = adapter("m2"), adapter("mref")
        trained = [k for k in b if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight")]
        check(close_losses(got, want, (1, 2, 3, 4)) and set(a) == set(b) and len(trained) == 2 and max_rel(a, b) < 1e-4,
              f"modules_to_save on 2 sharded ranks: the single-process losses and adapter ({trained}) {got} vs {want}")
        (TMP / "m3r").mkdir()
        shutil.copytree(TMP / "m2" / "checkpoint-2", TMP / "m3r" / "checkpoint-2")
        shutil.copy(TMP / "m2" / "metrics.jsonl", TMP / "m3r" / "metrics.jsonl")
        p = run(write_config("m3r", train__shard_embeddings=True, **mts), 3, "--resume", "auto")
        if p.returncode == 0:
            got = losses("m3r")
            check("resumed from" in p.stderr and close_losses(got, want, (3, 4)) and max_rel(adapter("m3r"), b) < 1e-4,
                  f"its checkpoint-2 resumed on 3 sharded ranks ends as the single process {[got.get(s) for s in (3, 4)]} "
                  f"vs {[want[s] for s in (3, 4)]}")

    # The exact-match metric generates through gathered blocks (and embeddings) on every rank: the same
    # greedy answers as one unsharded process, logged once.
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    with open(TMP / "alpaca.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"instruction": f"Say {words[i % 8]} twice.", "input": "", "output": f"{words[i % 8]} {words[i % 8]}"}) + "\n")
    em_over = {"data__train_file": str(TMP / "alpaca.jsonl"), "data__format": "alpaca", "data__eval_fraction": 0.0, "data__max_seq_len": 192,
               "train__steps": 2, "train__eval_every": 0}
    em_lines = {}
    for np, name, over in ((0, "em_ref", {"train__shard": "none"}), (2, "em2", {"train__shard_embeddings": True}),
                           (2, "em_dp", {"train__shard": "none"})):
        cfg = json.loads(write_config(name, **em_over, **over).read_text())
        cfg["eval"] = {"exact_match_file": str(TMP / "alpaca.jsonl"), "max_examples": 3, "max_new_tokens": 4}
        (TMP / f"{name}.json").write_text(json.dumps(cfg))
        p = run(TMP / f"{name}.json", np)
        em_lines[name] = [l.strip() for l in p.stderr.splitlines() if "exact-match accuracy" in l or l.strip().startswith("e.g.")]
    check(len(em_lines["em_ref"]) >= 4 and em_lines["em2"] == em_lines["em_ref"],
          f"exact match on 2 sharded ranks logs once what one process logs ({em_lines['em2'][:2]} vs {em_lines['em_ref'][:2]})")
    # Data parallel: each rank answers its share (rank 0 records 0 and 2, rank 1 record 1; rank 0 alone answered all
    # three while rank 1 waited in its next collective, whose 10-minute timeout a long evaluation passed); the
    # counts summed over the ranks give the single process's accuracy lines (the examples are rank 0's).
    acc = lambda name: [l for l in em_lines[name] if "exact-match accuracy" in l]
    check(len(acc("em_ref")) == 2 and acc("em_dp") == acc("em_ref"),
          f"exact match on 2 data-parallel ranks sums their shares to one process's accuracy ({acc('em_dp')} vs {acc('em_ref')})")
    dp_metrics = [json.loads(l) for l in (TMP / "em_dp" / "metrics.jsonl").read_text().splitlines() if "exact_match" in l]
    check(len(dp_metrics) == 2 and all(m["exact_match_total"] == 3 for m in dp_metrics),
          f"metrics.jsonl holds the summed counts: {dp_metrics}")

    # Bad launches: ranks started with different configs stop at once naming the rank (MPMD launch) ...
    cfg_a, cfg_b = write_config("mm"), write_config("mm_b", optim__lr=1e-3)
    p = subprocess.run(["mpirun", "-np", "1", BIN, "--config", str(cfg_a), ":", "-np", "1", BIN, "--config", str(cfg_b)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    check(p.returncode == 3 and "run config differs across ranks: rank 1 differs" in p.stderr,
          f"ranks with different configs are refused at start, naming rank 1 (exit {p.returncode})")
    # ... and a rank that dies mid-run takes the job down with an error naming it, instead of a hang.
    found, err, proc = signal_rank_mid_run("die", signal.SIGKILL)
    check(found, "found rank 1's process")
    check(proc.returncode != 0 and "rank 1" in err and "signal 9" in err,
          f"killing rank 1 ends the job with an error naming it (exit {proc.returncode}): {err.strip().splitlines()[-3:] if err.strip() else ''}")

    # A rank that stalls (stopped: SIGSTOP) ends the job after train.collective_timeout_s with an error naming the
    # timeout and the key, instead of a hang until the 10-minute default.
    found, err, proc = signal_rank_mid_run("stall", signal.SIGSTOP, train__collective_timeout_s=3)
    waited = proc.waited
    check(found and proc.returncode != 0 and "within 3000 ms (train.collective_timeout_s)" in err and waited < 60,
          f"a stalled rank 1 ends the job after train.collective_timeout_s 3 in {waited:.0f}s (exit {proc.returncode}): "
          f"{err.strip().splitlines()[-3:] if err.strip() else ''}")

    # A rank that fails with an error (rank 0 cannot create the output directory: its parent is a file; the other
    # ranks do not create it) ends the job at once with that error and its rank named, instead of the other rank
    # waiting in a collective until the timeout.
    (TMP / "fail0file").write_text("not a directory")
    cfg = write_config("fail0")
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "output_dir": str(TMP / "fail0file" / "out")}))
    t0 = time.time()
    try:
        p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)], capture_output=True,
                           text=True, env=ENV, timeout=120)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, "(hung)"
    check(rc not in (0, None) and "cannot create directory" in err and "[[" in err and "],0]" in err
          and time.time() - t0 < 60, f"a failing rank 0 ends the 2-rank job in {time.time() - t0:.0f}s naming it (exit {rc})")

    # SIGTERM to one rank only: every rank stops after the same step with one complete checkpoint (the stop
    # flag is agreed on by all ranks), and the run resumes from it to the straight run's losses.
    cfg = write_config("term")
    proc = subprocess.Popen(["mpirun", "-np", "2", "--oversubscribe", BIN, "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "QT_TEST_STEP_DELAY_MS": "400"})
    metrics = TMP / "term" / "metrics.jsonl"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120 and not (metrics.exists() and '"step":1' in metrics.read_text()):
        time.sleep(0.02)
    found, err = signal_rank(proc, 1, signal.SIGTERM)
    done = sorted(int(d.name.split("-")[1]) for d in (TMP / "term").glob("checkpoint-*") if (d / "COMPLETE").exists())
    check(found and "stopped by a signal" in err and len(done) >= 1 and max(done) < 4,
          f"SIGTERM to rank 1 alone stops both ranks after one step with a checkpoint ({done}; exit {proc.returncode})")
    if done and max(done) < 4:
        p = run(cfg, 2, "--resume", "auto")
        got = losses("term")
        check(p.returncode == 0 and close_losses(got, ref, (1, 2, 3, 4)),
              f"the signalled run resumes to the straight run's losses {[got.get(s) for s in (1, 2, 3, 4)]}")

    # A world size that does not divide the global batch is refused, naming the key.
    p = subprocess.run(["mpirun", "-np", "4", "--oversubscribe", BIN, "--config", str(write_config("bad"))],
                       capture_output=True, text=True, env=ENV)
    check(p.returncode != 0 and "train.batch_size" in p.stderr and "world size 4" in p.stderr,
          f"4 ranks for a global batch of 6 are refused (exit {p.returncode})")
    # Sharding without grad checkpointing is refused at config time.
    p = subprocess.run([BIN, "--config", str(write_config("nock", train__memory={"checkpointing": False}))],
                       capture_output=True, text=True, env=ENV)
    check(p.returncode == 3 and "train.shard" in p.stderr and "train.memory.checkpointing" in p.stderr,
          f"train.shard blocks without grad checkpointing is a config error (exit {p.returncode})")
    # Qwen2 (q / k / v biases, tied embeddings) and Qwen3 (q / k norms, which stay whole on every rank): two
    # sharded ranks give the single process's losses.
    for arch in ("qwen2", "qwen3"):
        d = TMP / f"{arch}_model"
        sp = tiny_lm.make_tokenizer(d)
        tiny_lm.make_qwen_model(d, arch, sp.get_piece_size(), seed=6)
        r = run(write_config(f"{arch}_ref", train__shard="none", model__path=str(d)), 0)
        s2 = run(write_config(f"{arch}_s2", model__path=str(d)), 2)
        if r.returncode == 0 and s2.returncode == 0:
            got, want = losses(f"{arch}_s2"), losses(f"{arch}_ref")
            check(close_losses(got, want, (1, 2, 3, 4)),
                  f"{arch}: 2 sharded ranks give the single-process losses {[got.get(k) for k in (1, 2, 3, 4)]} vs "
                  f"{[want.get(k) for k in (1, 2, 3, 4)]}")

    finish("FullyShard checks")

if __name__ == "__main__":
    main()
