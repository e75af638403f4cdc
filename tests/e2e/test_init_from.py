"""lora.init_from on a tiny NF4 model (CPU): a run starts from a saved adapter instead of a fresh init (the
adapter goes through the trainer unchanged at a vanishing learning rate, and its first loss is the trained
adapter's, below a fresh start's), and an adapter whose shape differs from the lora section is refused by name."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, save_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_init_from_"))

def write_config(name, lora=None, **over):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8, **(lora or {})},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": {"steps": 3, "batch_size": 4, "seed": 3, "log_every": 1},
           "optim": {"lr": 2e-3, "warmup_steps": 0, "schedule": "constant"},
           "checkpoint": {"every": 0, "keep_last": 1}, "logging": {"progress": "lines"}}
    return save_config(TMP, name, cfg, over)

def train(config, *extra, check_rc=True):
    p = subprocess.run([BIN, "--config", str(config), *extra], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check_rc and p.returncode != 0:
        sys.exit(f"training {config} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p

def losses(name):
    return {j["step"]: j["loss"] for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines()) if "loss" in j}

def adapter_bytes(name):
    return (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()

def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 48, 21)

    # A: 3 steps from the fresh init -> A/adapter.
    train(write_config("a"))
    la = losses("a")
    src = str(TMP / "a" / "adapter")
    # B: starts from A's adapter at a learning rate too small to move an fp32 weight: the adapter it writes is
    # A's, byte for byte (the start is exactly the adapter, and nothing else is re-initialised).
    p = train(write_config("b", lora={"init_from": src}, train__steps=1, optim__lr=1e-30))
    check("initialised from" in p.stderr, "the run logs where its adapters come from")
    check(adapter_bytes("b") == adapter_bytes("a"), "a run from init_from at lr 1e-30 writes the adapter it started from")
    lb = losses("b")
    # Its step-1 loss is that of A's trained adapter on the first batch (fresh runs see the same first batch),
    # below the fresh init's step-1 loss; C (init_from at the normal lr) has the same step-1 loss exactly.
    check(lb[1] < la[1], f"step-1 loss from the adapter {lb[1]:.5f} < the fresh init's {la[1]:.5f}")
    train(write_config("c", lora={"init_from": src}))
    lc = losses("c")
    check(lc[1] == lb[1], f"step-1 loss from the adapter does not depend on the learning rate ({lc[1]} vs {lb[1]})")
    # Each step's batch is the same in A and C (same seed), and C has had 3 more steps of training at each of them.
    check(all(lc[s] < la[s] for s in (1, 2, 3)), f"every step's loss is below the fresh run's ({lc} vs {la})")
    check(adapter_bytes("c") != adapter_bytes("a"), "training goes on from the adapter (C's adapter moved from A's)")
    # A PEFT adapter (target_modules saved by PEFT as an unordered set, a different order) is accepted too.
    cfgj = json.loads((TMP / "a" / "adapter" / "adapter_config.json").read_text())
    peft_dir = TMP / "peft_adapter"
    peft_dir.mkdir()
    cfgj["target_modules"] = list(reversed(cfgj["target_modules"]))
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfgj))
    (peft_dir / "adapter_model.safetensors").write_bytes(adapter_bytes("a"))
    train(write_config("d", lora={"init_from": str(peft_dir)}, train__steps=1))
    check(losses("d")[1] == lb[1], "target_modules in another order are the same targets")

    # Differences from the lora section are refused, naming each key with both values.
    p = train(write_config("e", lora={"r": 8, "init_from": src}), check_rc=False)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode == 3 and "lora.r: config 8, adapter 4" in p.stderr, f"a different r exits 3 naming lora.r (exit {p.returncode}): {last}")
    p = train(write_config("f", lora={"alpha": 16, "targets": ["q_proj", "v_proj"], "init_from": src}), check_rc=False)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode == 3 and "lora.alpha: config 16, adapter 8" in p.stderr and "lora.targets" in p.stderr
          and "lora.r" not in p.stderr, f"a different alpha and targets are both named (exit {p.returncode}): {last}")
    p = train(write_config("g", lora={"init_from": str(TMP / "nowhere")}), check_rc=False)
    check(p.returncode == 6 and "nowhere" in p.stderr, f"a missing adapter directory exits 6 naming it (exit {p.returncode})")
    p = train(write_config("h", lora={"init_from": 5}), check_rc=False)
    check(p.returncode == 3 and "lora.init_from" in p.stderr, f"a non-string init_from is a config error (exit {p.returncode})")
    finish("init_from checks")

if __name__ == "__main__":
    main()
