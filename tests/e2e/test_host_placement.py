"""What the plan may keep in host memory (issue 26): train.memory.optimizer "host" (AdamW's moments in pinned host
memory, the update on the CPU: the ladder's last rung) and train.memory.weights "host" (every block's frozen weights
in pinned host memory, each block fetched before it runs and before its recomputation). On the CPU the same code
runs: each run ends with the adapter of the run with everything in place, byte for byte; the plan says where they
are (log line, metrics.jsonl); a run resumed halfway ends the same; a value other than auto / device / host, and
weights "host" without checkpointing, are refused naming the keys."""
import json, pathlib, shutil, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, run_binary, tiny_cpu_config
import os
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_host_place_"))


def config(name, place, key="optimizer", memory=None):
    path = tiny_cpu_config(TMP, name, {"steps": 12, "batch_size": 4, "seed": 3, "log_every": 4},
                           {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.1}, {"every": 6, "keep_last": 3})
    cfg = json.loads(path.read_text())
    cfg["train"]["memory"] = {key: place, "checkpointing": True, **(memory or {})}
    path.write_text(json.dumps(cfg))
    return path


def adapter(name):
    return (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 64, 21)
    runs = {place: run_binary(BIN, config(place, place)) for place in ("device", "host")}
    for place, p in runs.items():
        check(p.returncode == 0, f"optimizer {place}: the run completes (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if any(p.returncode for p in runs.values()):
        return finish("host placement checks")
    check(adapter("host") == adapter("device"), "AdamW on the host ends with the adapter of AdamW beside the parameters, byte for byte")
    plans = [json.loads(l)["plan"] for l in (TMP / "host" / "metrics.jsonl").read_text().splitlines() if '"plan"' in l]
    check(plans and plans[0].get("optimizer") == "host", f"metrics.jsonl's plan says optimizer host ({plans[0].get('optimizer') if plans else None})")
    check("AdamW on the host" in runs["host"].stderr and "AdamW on the host" not in runs["device"].stderr,
          "the plan's log line says AdamW on the host, only where it is")

    shutil.copytree(TMP / "host", TMP / "host_resumed")
    shutil.rmtree(TMP / "host_resumed" / "checkpoint-12")
    shutil.rmtree(TMP / "host_resumed" / "adapter")
    cfg = json.loads(config("host_resumed", "host").read_text())
    p = run_binary(BIN, TMP / "host_resumed.json", "--resume", str(TMP / "host_resumed" / "checkpoint-6"))
    check(p.returncode == 0 and adapter("host_resumed") == adapter("host") and cfg["train"]["memory"]["optimizer"] == "host",
          f"resumed at step 6, the host-optimizer run ends with the straight run's adapter (exit {p.returncode})")

    bad = config("bad", "cpu")
    p = run_binary(BIN, bad)
    check(p.returncode != 0 and "train.memory.optimizer" in p.stderr and '"host"' in p.stderr,
          f"optimizer \"cpu\" is refused naming the key and the values (exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''})")

    # The block weights streamed from the host: the device run's adapter, the plan's record, resume.
    p = run_binary(BIN, config("weights", "host", key="weights"))
    check(p.returncode == 0, f"weights host: the run completes (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if p.returncode == 0:
        check(adapter("weights") == adapter("device"),
              "block weights streamed from the host end with the adapter of weights in place, byte for byte")
        check("block weights streamed from the host" in p.stderr, "the plan's log line says the weights are streamed")
        shutil.copytree(TMP / "weights", TMP / "weights_resumed")
        shutil.rmtree(TMP / "weights_resumed" / "checkpoint-12")
        shutil.rmtree(TMP / "weights_resumed" / "adapter")
        config("weights_resumed", "host", key="weights")
        p = run_binary(BIN, TMP / "weights_resumed.json", "--resume", str(TMP / "weights_resumed" / "checkpoint-6"))
        check(p.returncode == 0 and adapter("weights_resumed") == adapter("weights"),
              f"resumed at step 6, the streamed-weights run ends with the straight run's adapter (exit {p.returncode})")
    p = run_binary(BIN, config("weights_nockpt", "host", key="weights", memory={"checkpointing": False}))
    check(p.returncode != 0 and "train.memory.weights" in p.stderr and "train.memory.checkpointing" in p.stderr,
          f"weights host without checkpointing is refused naming both keys (exit {p.returncode})")
    finish("host placement checks")


if __name__ == "__main__":
    main()
