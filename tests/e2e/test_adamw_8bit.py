"""optim.name "adamw_8bit" (bitsandbytes' AdamW8bit: 8-bit blockwise moments for tensors of 4,096 elements or more;
the update itself is held to bitsandbytes in tests/test_train.cpp) end to end on a tiny NF4 model on the CPU (hidden
size 128, LoRA r 32, so that most adapters are that large): the run trains as fp32 AdamW does (its losses within a
few percent), its checkpoints hold the 8-bit codes and block scales (under half of fp32 AdamW's optimizer file), a
run resumed from one ends with the straight run's adapter byte for byte, alone and under FullyShard on 2 ranks; the
state on the host gives the run of the state on the device; a checkpoint resumes with the other optimizer (the
moments converted) and on another world size (re-quantized, with a warning); wrong names are refused naming the
key, with the HF spellings answered."""
import json, os, pathlib, shutil, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, run_binary, tiny_cpu_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_adamw8_"))
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}


def config(name, optim_name, shard=False, optimizer=None):
    path = tiny_cpu_config(TMP, name, {"steps": 12, "batch_size": 4, "seed": 3, "log_every": 1},
                           {"name": optim_name, "lr": 2e-2, "warmup_steps": 2, "weight_decay": 0.1},
                           {"every": 6, "keep_last": 3}, lora={"r": 32, "alpha": 32})
    cfg = json.loads(path.read_text())
    if shard:
        cfg["train"]["shard"] = "blocks"
    if optimizer:  # train.memory.optimizer, every block checkpointed (the CPU's default, said outright)
        cfg["train"]["memory"] = {"optimizer": optimizer, "checkpointing": True}
    path.write_text(json.dumps(cfg))
    return path


def run(cfg, *extra, np=0):
    if np == 0:
        return run_binary(BIN, cfg, *extra)
    return subprocess.run(["mpirun", "-np", str(np), "--oversubscribe", BIN, "--config", str(cfg), *extra],
                          capture_output=True, text=True, env=ENV)


def adapter(name):
    return (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()


def losses(name):
    return [json.loads(l)["loss"] for l in (TMP / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def optimizer_files(ck):
    return sorted(ck.glob("optimizer*.safetensors"))


def resumed(src, name, optim_name, ck, np=0, shard=False):
    """src's run directory copied to `name` without the checkpoints after `ck` and the adapter, resumed there."""
    shutil.copytree(TMP / src, TMP / name)
    for d in (TMP / name).glob("checkpoint-*"):
        if d.name != f"checkpoint-{ck}":
            shutil.rmtree(d)
    shutil.rmtree(TMP / name / "adapter")
    (TMP / name / "metrics.jsonl").unlink()
    cfg = config(name, optim_name, shard=shard)
    return run(cfg, "--resume", str(TMP / name / f"checkpoint-{ck}"), np=np)


def main():
    from safetensors import safe_open
    tiny_lm.make_model_dir(TMP / "model", seed=5, hidden_size=128, intermediate_size=256)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 64, 21)
    runs = {n: run(config(n, n)) for n in ("adamw", "adamw_8bit")}
    for n, p in runs.items():
        check(p.returncode == 0, f"optim.name {n}: the run completes (exit {p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    if any(p.returncode for p in runs.values()):
        return finish("8-bit AdamW checks")

    # Training: the 8-bit run learns as the fp32 one does.
    l8, l32 = losses("adamw_8bit"), losses("adamw")
    check(len(l8) == 12 and l8[-1] < 0.97 * l8[0], f"the 8-bit run's loss falls ({l8[0]:.3f} -> {l8[-1]:.3f})")
    worst = max(abs(a - b) / b for a, b in zip(l8, l32))
    check(worst < 0.05, f"its losses within 5% of fp32 AdamW's at every step (worst {worst:.3%}; {l32[-1]:.4f} against {l8[-1]:.4f} at the end)")
    check(adapter("adamw_8bit") != adapter("adamw"), "and its adapter is its own (8-bit moments, not fp32 ones)")
    said = [l for l in runs["adamw_8bit"].stderr.splitlines() if "AdamW with 8-bit moments for" in l]
    check(len(said) == 1 and "AdamW with 8-bit moments" not in runs["adamw"].stderr,
          f"the run's start line says which tensors have 8-bit moments: {said[0][said[0].index('AdamW'):] if said else ''}")

    # The checkpoint: codes and block scales for the large tensors, fp32 moments for the small ones.
    ck8, ck32 = TMP / "adamw_8bit" / "checkpoint-6", TMP / "adamw" / "checkpoint-6"
    with safe_open(str(ck8 / "optimizer.safetensors"), "pt") as f:
        keys = list(f.keys())
        q8 = [k for k in keys if k.endswith(".exp_avg.q8")]
        fp = [k for k in keys if k.endswith(".exp_avg")]
        dtypes = {str(f.get_tensor(k).dtype) for k in q8}
        scales_ok = all(f.get_tensor(k[:-3] + ".absmax").numel() == -(-f.get_tensor(k).numel() // 256) for k in q8)
    check(len(q8) > 0 and len(fp) > 0 and dtypes == {"torch.uint8"} and scales_ok,
          f"checkpoint-6 holds 8-bit codes (uint8) with one scale a 256-element block for {len(q8)} tensors and fp32 "
          f"moments for the {len(fp)} under 4,096 elements")
    s8, s32 = (ck8 / "optimizer.safetensors").stat().st_size, (ck32 / "optimizer.safetensors").stat().st_size
    check(s8 < 0.45 * s32, f"its optimizer file is {s8 / s32:.2f} of fp32 AdamW's ({s8} against {s32} bytes)")

    # Resumed at step 6: the straight run's adapter, byte for byte.
    p = resumed("adamw_8bit", "resumed", "adamw_8bit", 6)
    check(p.returncode == 0 and adapter("resumed") == adapter("adamw_8bit"),
          f"resumed from checkpoint-6, the 8-bit run ends with the straight run's adapter byte for byte (exit {p.returncode})")
    # Resumed with the other optimizer: the moments converted, the run completes and its checkpoints take the new form.
    for src, other, key in (("adamw", "adamw_8bit", ".exp_avg.q8"), ("adamw_8bit", "adamw", ".exp_avg")):
        p = resumed(src, f"{src}_to_{other}", other, 6)
        ok = p.returncode == 0
        if ok:
            with safe_open(str(TMP / f"{src}_to_{other}" / "checkpoint-12" / "optimizer.safetensors"), "pt") as f:
                ok = any(k.endswith(key) for k in f.keys())
        check(ok, f"{src}'s checkpoint resumes as {other}, whose checkpoint holds its own moments (exit {p.returncode}) "
                  f"{p.stderr[-800:] if p.returncode else ''}")

    # The moments on the host (train.memory.optimizer, the plan's last rung): the update of the moments beside the
    # parameters, byte for byte.
    placed = {where: run(config(f"on_{where}", "adamw_8bit", optimizer=where)) for where in ("device", "host")}
    check(all(p.returncode == 0 for p in placed.values()) and adapter("on_host") == adapter("on_device"),
          f"with its 8-bit state on the host the run ends with the adapter of the state beside the parameters, byte for "
          f"byte (exits {[p.returncode for p in placed.values()]})")

    # FullyShard on 2 ranks: each rank's shard of the 8-bit state; resumed on 2 ranks, the same adapter byte for byte;
    # on 1 rank, re-quantized with a warning.
    p = run(config("sharded", "adamw_8bit", shard=True), np=2)
    check(p.returncode == 0, f"FullyShard on 2 ranks with 8-bit moments completes (exit {p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    if p.returncode == 0:
        files = optimizer_files(TMP / "sharded" / "checkpoint-6")
        check(len(files) == 2, f"its checkpoint holds one optimizer shard a rank ({[f.name for f in files]})")
        p = resumed("sharded", "sharded_resumed", "adamw_8bit", 6, np=2, shard=True)
        check(p.returncode == 0 and adapter("sharded_resumed") == adapter("sharded"),
              f"resumed on 2 ranks, it ends with the straight sharded run's adapter byte for byte (exit {p.returncode})")
        p = resumed("sharded", "sharded_on_1", "adamw_8bit", 6, np=1, shard=True)
        check(p.returncode == 0 and "re-quantized" in p.stderr,
              f"resumed on 1 rank, the 2 ranks' 8-bit state is re-quantized with a warning (exit {p.returncode}) "
              f"{p.stderr[-800:] if p.returncode else ''}")
        if p.returncode == 0:
            l1, l2 = losses("sharded_on_1"), losses("sharded")[6:]
            worst = max(abs(a - b) / b for a, b in zip(l1, l2))
            check(len(l1) == 6 and worst < 0.02, f"and follows the 2-rank run's losses within 2% (worst {worst:.2%})")

    # Names: HF's spellings answered, anything else refused naming the key.
    cases = [({"optim": {"name": "paged_adamw_8bit"}}, ["optim.name", "adamw_8bit", "train.memory.optimizer"]),
             ({"optim": {"name": "sgd"}}, ["optim.name", "'sgd'", "adamw or adamw_8bit"]),
             ({"optim": "adamw_8bit"}, ["optim", "{\"optim\": {\"name\": \"adamw_8bit\"}}"]),
             ({"train": {"optim": "adamw_8bit"}}, ["train.optim", "optim.name"])]
    for i, (over, needles) in enumerate(cases):
        cfg = json.loads(config(f"bad{i}", "adamw_8bit").read_text())
        for sec, val in over.items():
            if isinstance(val, dict) and isinstance(cfg.get(sec), dict):
                cfg[sec].update(val)
            else:
                cfg[sec] = val
        path = TMP / f"bad{i}.json"
        path.write_text(json.dumps(cfg))
        p = run_binary(BIN, path)
        msg = p.stderr + p.stdout
        check(p.returncode == 3 and all(n in msg for n in needles),
              f"{json.dumps(over)} is refused naming the key (exit {p.returncode}): "
              f"{msg.strip().splitlines()[-1] if msg.strip() else ''}")
    finish("8-bit AdamW checks")


if __name__ == "__main__":
    main()
