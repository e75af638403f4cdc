"""train.memory.gate_up_kept_blocks through the binary (issue 27): checkpointed blocks that keep their MLP's gate / up
output for the recomputation. On the CPU (fp32) a run keeping it in 2 blocks ends with the adapter of the run that
recomputes it, byte for byte; the plan's log line and metrics.jsonl name it; forced where it cannot apply (keep
"input", packed rows) it is refused naming the key."""
import json, pathlib, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, run_binary, tiny_cpu_config
import os
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_keep_ladder_"))


def config(name, memory, train_file="train.jsonl"):
    path = tiny_cpu_config(TMP, name, {"steps": 6, "batch_size": 4, "seed": 3, "log_every": 2},
                           {"lr": 1e-2, "warmup_steps": 2}, {"every": 6, "keep_last": 1})
    cfg = json.loads(path.read_text())
    cfg["data"]["train_file"] = str(TMP / train_file)
    cfg["train"]["memory"] = {"checkpointing": True, **memory}
    path.write_text(json.dumps(cfg))
    return path


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    # Records longer than a row (32 tokens): every row one whole document, as the keep ladder takes them.
    lines = tiny_lm.corpus(96, 21)
    (TMP / "train.jsonl").write_text("".join(json.dumps({"text": " ".join(lines[i:i + 6])}) + "\n"
                                             for i in range(0, 96, 6)))
    tiny_lm.write_text_jsonl(TMP / "short.jsonl", 64, 21)  # lines shorter than a row: packed several a row
    runs = {name: run_binary(BIN, config(name, memory)) for name, memory in
            (("recomputed", {"keep": "residual"}), ("kept", {"keep": "residual", "gate_up_kept_blocks": 2}))}
    for name, p in runs.items():
        check(p.returncode == 0, f"{name}: the run completes (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if any(p.returncode for p in runs.values()):
        return finish("keep ladder checks")
    adapter = lambda name: (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()
    check(adapter("kept") == adapter("recomputed"),
          "gate / up kept by 2 blocks ends with the adapter of the run that recomputes it, byte for byte")
    check("gate / up kept by 2 blocks" in runs["kept"].stderr and "gate / up kept" not in runs["recomputed"].stderr,
          "the plan's log line names the kept gate / up outputs, only where they are")
    plans = [json.loads(l)["plan"] for l in (TMP / "kept" / "metrics.jsonl").read_text().splitlines() if '"plan"' in l]
    check(plans and plans[0].get("gate_up_kept_blocks") == 2,
          f"metrics.jsonl's plan says gate_up_kept_blocks 2 ({plans[0].get('gate_up_kept_blocks') if plans else None})")

    for name, memory, data, says in (("keep_input", {"keep": "input", "gate_up_kept_blocks": 2}, "train.jsonl", "keep"),
                                     ("packed", {"keep": "residual", "gate_up_kept_blocks": 2}, "short.jsonl",
                                      "whole document")):
        p = run_binary(BIN, config(name, memory, data))
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        check(p.returncode != 0 and "train.memory.gate_up_kept_blocks" in p.stderr and says in p.stderr,
              f"{name}: refused naming train.memory.gate_up_kept_blocks and '{says}' (exit {p.returncode}: {last})")
    finish("keep ladder checks")


if __name__ == "__main__":
    main()
