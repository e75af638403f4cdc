"""model.init "random" end to end (CPU): a run from a config.json alone (no weights, no tokenizer), a run from a
named shape's config with pre-tokenized data (loss falls on a repeated batch), text data without a tokenizer and
an unknown shape refused with the key named. The execution plan: its record opens metrics.jsonl, and a GPU memory
budget its leanest plan cannot fit is refused before the model loads, with the figure it needs."""
import json, os, pathlib, subprocess, sys, tempfile

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_random_"))

def run(name, model, data_format="tokenized", steps=8, env=None, memory=None):
    cfg = {"output_dir": str(TMP / name), "model": {"init": "random", "device": "cpu", **model},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / ("ids.jsonl" if data_format == "tokenized" else "text.jsonl")),
                    "format": data_format, "max_seq_len": 32, "packing": False, "shuffle": False},
           "train": {"steps": steps, "batch_size": 2, "seed": 1, "log_every": 1, "memory": memory or {}},
           "optim": {"lr": 1e-2, "schedule": "constant"}, "logging": {"progress": "lines"}}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return subprocess.run([BIN, "--config", str(path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

def losses(name):
    return [json.loads(l)["loss"] for l in (TMP / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

def main():
    model_dir = TMP / "cfg_only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=500, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2)))
    import random
    rnd = random.Random(0)
    rows = [[rnd.randrange(3, 500) for _ in range(32)] for _ in range(2)]
    (TMP / "ids.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    (TMP / "text.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")

    p = run("from_config", {"path": str(model_dir)}, env={"QT_PROFILE_STEP": "3", "QT_PROFILE_STEPS": "2"})
    check(p.returncode == 0, f"random init from a config.json trains (rc {p.returncode}) {p.stderr[-800:]}")
    if p.returncode == 0:
        l = losses("from_config")
        check(len(l) == 8 and l[-1] < l[0] - 0.5, f"the loss falls on a repeated batch: {l[0]:.3f} -> {l[-1]:.3f}")
        ad = json.loads((TMP / "from_config" / "adapter" / "adapter_config.json").read_text())
        check(ad["base_model_name_or_path"] == str(model_dir), "the adapter names its base")
        trace = json.loads((TMP / "from_config" / "profile_trace.json").read_text())
        names = {e.get("name", "") for e in trace.get("traceEvents", [])}
        check(any("mm" in n for n in names), "QT_PROFILE_STEP wrote a trace of the step's ops")
        updates = sum(e.get("name", "") == "aten::_fused_adamw_" for e in trace.get("traceEvents", []))
        check(updates == 2, f"QT_PROFILE_STEPS=2: the trace holds two steps' updates ({updates})")
        phases = {e.get("name") for e in trace.get("traceEvents", []) if e.get("cat") == "user_annotation"}
        check({"qt::next_batch", "qt::forward", "qt::backward", "qt::optimizer", "qt::read_loss_and_norm",
               "qt::log_step"} <= phases, f"the trainer's host phases are named in the trace: {sorted(phases)}")
        check((TMP / "from_config" / "profile_kernels.txt").read_text().startswith("GPU time by kernel"),
              "and the kernel table")

        plan = json.loads((TMP / "from_config" / "metrics.jsonl").read_text().splitlines()[0])
        check("plan" in plan and plan["plan"]["checkpointing"] and plan["plan"]["budget_gib"] is None and
              plan["plan"]["predicted_gib"]["total"] > 0 and plan["plan"]["predicted_step_s"]["total"] > 0 and
              plan["step"] == 0,
              f"metrics.jsonl opens with the plan, its predicted memory and step time, no budget on the CPU: {plan}")
        check("plan: checkpointing" in p.stderr, "the log names the plan")

    # A budget is honoured on any device when given: the 8B shape cannot fit 2 GiB, refused before it is built.
    p = run("tight", {"shape": "llama-3.1-8b"}, steps=1, memory={"gpu_memory_gib": 2})
    last = (p.stderr.strip().splitlines() or [""])[-1]
    check(p.returncode == 3 and "train.memory.gpu_memory_gib 2.00 GiB" in last and "needs" in last and
          "train.micro_batch_size" in last and not (TMP / "tight" / "metrics.jsonl").exists(),
          f"a budget the leanest plan cannot fit is refused before the model loads (exit {p.returncode}): {last}")
    p = run("forced", {"path": str(model_dir)}, steps=1, memory={"checkpointing": False, "keep": "qkv"})
    check(p.returncode == 3 and "train.memory.keep" in p.stderr and "train.memory.checkpointing" in p.stderr,
          f"a forced setting the plan cannot honour names both keys (exit {p.returncode})")

    p = run("text_no_tok", {"shape": "tinyllama-1.1b"}, data_format="text", steps=1)
    check(p.returncode != 0 and "tokenized" in p.stderr, f"text data without a tokenizer is refused: {p.stderr[-300:]}")
    p = run("bad_shape", {"shape": "llama-4-giant"})
    check(p.returncode != 0 and "model.shape" in p.stderr and "llama-3.1-8b" in p.stderr,
          f"an unknown shape names the key and the known shapes: {p.stderr[-300:]}")
    p = run("both", {"shape": "llama-3.2-1b", "path": str(model_dir)})
    check(p.returncode != 0 and "model.shape" in p.stderr, "shape and path together are refused")
    finish()

if __name__ == "__main__":
    main()
