"""train.memory.gate_up_kept_blocks and gate_up_offloaded_blocks through the binary (issue 27): checkpointed blocks
that keep their MLP's gate / up output for the recomputation, on the device or (with offload on CUDA) in host memory.
On the CPU (fp32) a run keeping it in 2 blocks ends with the adapter of the run that recomputes it, byte for byte, on
rows of one whole document and on packed rows, and so does one with 1 block's "offloaded" (in memory on the CPU);
the plan's log line and metrics.jsonl name them; forced where they cannot apply (keep "input", offload false) they are
refused naming the keys."""
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
    runs = {name: run_binary(BIN, config(name, memory, data)) for name, memory, data in
            (("recomputed", {"keep": "residual"}, "train.jsonl"),
             ("kept", {"keep": "residual", "gate_up_kept_blocks": 2}, "train.jsonl"),
             ("offloaded", {"keep": "residual", "gate_up_offloaded_blocks": 1}, "train.jsonl"),
             ("packed_recomputed", {"keep": "residual"}, "short.jsonl"),
             ("packed_kept", {"keep": "residual", "gate_up_kept_blocks": 1}, "short.jsonl"))}
    for name, p in runs.items():
        check(p.returncode == 0, f"{name}: the run completes (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if any(p.returncode for p in runs.values()):
        return finish("keep ladder checks")
    adapter = lambda name: (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()
    check(adapter("kept") == adapter("recomputed"),
          "whole-document rows: gate / up kept by 2 blocks ends with the adapter of the run that recomputes it, byte for byte")
    check(adapter("offloaded") == adapter("recomputed"),
          "whole-document rows: gate / up offloaded by 1 block (kept in memory on the CPU) ends with the same adapter")
    check(adapter("packed_kept") == adapter("packed_recomputed") and adapter("packed_kept") != adapter("kept"),
          "packed rows: gate / up kept by 1 block (of 2) ends with the adapter of the run that recomputes it, byte for byte")
    check("gate / up kept by 2 blocks" in runs["kept"].stderr and "gate / up kept" not in runs["recomputed"].stderr,
          "the plan's log line names the kept gate / up outputs, only where they are")
    plans = [json.loads(l)["plan"] for l in (TMP / "kept" / "metrics.jsonl").read_text().splitlines() if '"plan"' in l]
    check(plans and plans[0].get("gate_up_kept_blocks") == 2,
          f"metrics.jsonl's plan says gate_up_kept_blocks 2 ({plans[0].get('gate_up_kept_blocks') if plans else None})")
    check("gate / up offloaded by 1 block" in runs["offloaded"].stderr and "offloaded by" not in runs["kept"].stderr,
          "the plan's log line names the offloaded gate / up outputs, only where they are")
    plans = [json.loads(l)["plan"] for l in (TMP / "offloaded" / "metrics.jsonl").read_text().splitlines() if '"plan"' in l]
    check(plans and plans[0].get("gate_up_offloaded_blocks") == 1,
          f"metrics.jsonl's plan says gate_up_offloaded_blocks 1 ({plans[0].get('gate_up_offloaded_blocks') if plans else None})")

    p = run_binary(BIN, config("keep_input", {"keep": "input", "gate_up_kept_blocks": 2}))
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode != 0 and "train.memory.gate_up_kept_blocks" in p.stderr and "train.memory.keep" in p.stderr,
          f"keep input: refused naming train.memory.gate_up_kept_blocks and train.memory.keep (exit {p.returncode}: {last})")
    p = run_binary(BIN, config("no_offload", {"keep": "residual", "offload": False, "gate_up_offloaded_blocks": 2}))
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode != 0 and "train.memory.gate_up_offloaded_blocks" in p.stderr and "train.memory.offload" in p.stderr,
          f"offload false: refused naming train.memory.gate_up_offloaded_blocks and train.memory.offload (exit "
          f"{p.returncode}: {last})")
    finish("keep ladder checks")


if __name__ == "__main__":
    main()
