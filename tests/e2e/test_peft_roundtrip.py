"""An adapter written by qlora-train loads in PEFT, and `qlora-train eval --adapter` gives the loss that transformers
+ PEFT give with that adapter on the base as training sees it (NF4, quantized on load: here the dequantized values
of our own `qlora-train quantize` bytes, read back through bitsandbytes' dequantize_4bit), and on the 16-bit base
with --quant none. Bad adapters exit with the checkpoint error code and name the file. The same for DoRA
(use_dora): a PEFT DoRA adapter through our writer, and one trained by qlora-train (lora.use_dora, with dropout and
activation checkpointing), load in PEFT and give our `eval --adapter` loss; its merged export loads in transformers
and gives that loss too."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
import tiny_lm
import bnb_cpu
from checks import exit_case_failures, finish, run_binary, tiny_cpu_config
from test_eval import reference_loss

BIN = os.environ["QT_BINARY"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)


def run_ok(*args):
    p = run(*args)
    if p.returncode != 0:
        sys.exit(f"FAILED: {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
    return p


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_setup(tmp: pathlib.Path, seed=5, r=8, alpha=16, targets=TARGETS, b_std=0.1, use_dora=False):
    """tiny model dir, eval data, and a PEFT adapter with random non-zero A and B (and DoRA magnitudes moved from
    their initial row norms) (base_model_name_or_path set)."""
    from peft import LoraConfig, get_peft_model
    model, sp = tiny_lm.make_model_dir(tmp / "model", seed=seed)
    data = tmp / "eval.jsonl"
    tiny_lm.write_text_jsonl(data, 10, seed + 1)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM",
                                            use_dora=use_dora))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in n:
                p.copy_(torch.randn_like(p) * (0.2 if "lora_A" in n else b_std))
    peft.save_pretrained(tmp / "peft_adapter")
    cfg_path = tmp / "peft_adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp / "model")
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return sp, data


def dequantized_model(model_dir: pathlib.Path, nf4_dir: pathlib.Path, model_class=None):
    """The fp32 transformers model (model_class, LlamaForCausalLM unless given) whose block linears hold the
    dequantized NF4 weights of nf4_dir."""
    bnb_cpu.make_row_safe()
    import bitsandbytes.functional as F
    from safetensors import safe_open
    from transformers import LlamaForCausalLM
    model = (model_class or LlamaForCausalLM).from_pretrained(model_dir, dtype=torch.float32).eval()
    f = safe_open(str(nf4_dir / "model.safetensors"), "pt")
    keys = set(f.keys())
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name + ".weight.absmax" in keys:
            prefix = name + ".weight."
            qs = F.QuantState.from_dict({k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)},
                                        device=torch.device("cpu"))
            with torch.no_grad():
                module.weight.copy_(F.dequantize_4bit(f.get_tensor(name + ".weight"), qs).float())
            n += 1
    assert n == 7 * model.config.num_hidden_layers, n
    return model


def peft_loss(base_model, adapter_dir, sp, data):
    from peft import PeftModel
    records = [json.loads(l) for l in data.read_text().splitlines()]
    model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    loss, count = reference_loss(model, sp, records, 512)
    model.unload()
    return loss, count


def compare_with_peft(name, model_dir, adapter, extra, base, sp, data):
    """`eval --adapter` against PEFT's loss on `base` (transformers) with the same adapter, and against eval without
    the adapter (it must change the loss); returns (failures, our eval's JSON)."""
    failures = []
    ref, count = peft_loss(base, adapter, sp, data)
    ours = last_json(run_ok("eval", "--model", model_dir, "--adapter", adapter, "--data", data, *extra))
    plain = last_json(run_ok("eval", "--model", model_dir, "--data", data, *extra))
    rel = abs(ours["loss"] - ref) / ref
    print(f"{name}: eval --adapter {ours['loss']:.6f}, PEFT {ref:.6f}, rel {rel:.2e} (without adapter {plain['loss']:.6f})")
    if rel > 1e-5 or ours["tokens"] != count:
        failures.append(f"{name}: {ours} vs PEFT loss {ref} over {count} tokens")
    if abs(plain["loss"] - ours["loss"]) < 1e-3:
        failures.append(f"{name}: the adapter does not change the loss ({plain['loss']} vs {ours['loss']})")
    return failures, ours, plain


def check_merged(name, merged_dir, model_class, sp, data, loss):
    """The merged export (export --merge --dtype fp32) in transformers gives `loss` (eval --adapter's)."""
    records = [json.loads(l) for l in data.read_text().splitlines()]
    merged = model_class.from_pretrained(merged_dir, dtype=torch.float32).eval()
    mref, _ = reference_loss(merged, sp, records, 512)
    print(f"{name}, merged export in transformers: {mref:.6f}")
    return [] if abs(mref - loss) / loss <= 1e-5 else [f"{name}: the merged export gives {mref} in transformers, eval --adapter {loss}"]


def tiny_training_config(tmp: pathlib.Path, lora: dict):
    """tmp/run.json: 4 steps of LoRA r 4 (and `lora`'s keys) on tmp/model with checkpointing, output in tmp/run."""
    return tiny_cpu_config(tmp, "run", {"steps": 4, "batch_size": 4, "seed": 3, "memory": {"checkpointing": True}},
                           {"lr": 1e-2, "warmup_steps": 1}, {"every": 100}, lora)


def check_dora(tmp: pathlib.Path):
    """DoRA adapters: PEFT's through our writer, and one trained here, give in PEFT the loss of `eval --adapter`."""
    import safetensors.torch
    from transformers import LlamaForCausalLM
    failures = []
    sp, data = make_setup(tmp, seed=9, r=4, alpha=8, use_dora=True)
    run_ok("export", "--adapter", tmp / "peft_adapter", "--out", tmp / "ours")
    run_ok("quantize", "--model", tmp / "model", "--out", tmp / "model_nf4")
    nf4_base = dequantized_model(tmp / "model", tmp / "model_nf4")

    # A DoRA adapter trained by qlora-train: B and the magnitudes move away from their initial values.
    tiny_lm.write_text_jsonl(tmp / "train.jsonl", 64, 11)
    p = run_binary(BIN, tiny_training_config(tmp, {"dropout": 0.1, "use_dora": True,
                                                   "targets": ["q_proj", "v_proj", "down_proj"]}))
    if p.returncode != 0:
        return [f"DoRA training exited {p.returncode}: {p.stderr[-2000:]}"]
    trained = tmp / "run" / "adapter"
    saved = json.loads((trained / "adapter_config.json").read_text())
    tensors = safetensors.torch.load_file(str(trained / "adapter_model.safetensors"))
    mags = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    if not saved.get("use_dora") or len(mags) != 3 * 2:
        failures.append(f"trained DoRA adapter: use_dora {saved.get('use_dora')}, {len(mags)} magnitudes")
    # The magnitude starts at the row norms of the NF4 base; training moves it.
    q0 = nf4_base.model.layers[0].self_attn.q_proj.weight.detach().norm(dim=1)
    m0 = mags.get("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
    if m0 is None or torch.allclose(m0, q0, rtol=1e-5, atol=0):
        failures.append("trained DoRA adapter: the q_proj magnitude did not move from its initial value")

    run_ok("export", "--adapter", trained, "--out", tmp / "merged", "--merge", "--dtype", "fp32")
    checks = [("PEFT DoRA adapter, our writer, nf4", tmp / "ours", (), nf4_base),
              ("PEFT DoRA adapter, our writer, --quant none", tmp / "ours", ("--quant", "none"),
               LlamaForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32).eval()),
              ("DoRA trained by qlora-train, nf4", trained, (), nf4_base)]
    for name, adapter, extra, base in checks:
        found, ours, _ = compare_with_peft(name, tmp / "model", adapter, extra, base, sp, data)
        failures += found
        if adapter == trained:
            failures += check_merged(name, tmp / "merged", LlamaForCausalLM, sp, data, ours["loss"])
    return failures


def main():
    from transformers import LlamaForCausalLM
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_peft_"))
    sp, data = make_setup(tmp)
    failures = []

    # Our writer: export without --merge re-writes the adapter (base from base_model_name_or_path).
    out = last_json(run_ok("export", "--adapter", tmp / "peft_adapter", "--out", tmp / "ours"))
    if out["merged"] or sorted(os.listdir(tmp / "ours")) != ["adapter_config.json", "adapter_model.safetensors"]:
        failures.append(f"export without --merge: {out}, files {os.listdir(tmp / 'ours')}")
    run_ok("quantize", "--model", tmp / "model", "--out", tmp / "model_nf4")

    checks = [
        ("nf4 (quantize on load)", (), dequantized_model(tmp / "model", tmp / "model_nf4")),
        ("16-bit base (--quant none)", ("--quant", "none"),
         LlamaForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32).eval()),
    ]
    for name, extra, base in checks:
        failures += compare_with_peft(name, tmp / "model", tmp / "ours", extra, base, sp, data)[0]

    # Bad adapters: the checkpoint exit code (6) and a message naming the file.
    bad = tmp / "bad_rank"
    bad.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / f).write_bytes((tmp / "ours" / f).read_bytes())
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    cases = [
        (("eval", "--model", tmp / "model", "--data", data, "--adapter", tmp / "nope"), 6, ["nope"]),
        (("eval", "--model", tmp / "model", "--data", data, "--adapter", bad), 6, ["adapter_model.safetensors", "r=4"]),
        (("export", "--adapter", bad, "--out", tmp / "never"), 6, ["adapter_model.safetensors", "r=4"]),
        (("export", "--adapter", tmp / "ours", "--out", tmp / "ours"), 2, ["not empty"]),
    ]
    failures += exit_case_failures(run, cases)
    if (tmp / "never").exists():
        failures.append("a failed export left its output directory")
    failures += check_dora(pathlib.Path(tempfile.mkdtemp(prefix="qt_peft_dora_")))
    failures += check_peft_features(pathlib.Path(tempfile.mkdtemp(prefix="qt_peft_features_")))
    finish("PEFT round-trip checks", failures)


def check_peft_features(tmp: pathlib.Path):
    """Found by fuzzing against PEFT 0.21 (the fourth round): target_modules entries matched as PEFT does (a dotted
    suffix such as "self_attn.q_proj": PEFT's loss; were refused as unknown modules); adapters on a subset of the
    layers, base-changing initialisations (PiSSA, OLoRA: read as plain LoRA, other losses with exit 0) and activated
    LoRA refused with exit 6 naming the key."""
    from transformers import LlamaForCausalLM
    failures = []
    sp, data = make_setup(tmp, seed=9, targets=["self_attn.q_proj", "mlp.down_proj"])
    base = LlamaForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32).eval()
    failures += compare_with_peft("dotted target_modules", tmp / "model", tmp / "peft_adapter", ("--quant", "none"),
                                  base, sp, data)[0]
    def variant(name, edit):
        d = tmp / name
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (d / f).write_bytes((tmp / "peft_adapter" / f).read_bytes())
        cfg = json.loads((d / "adapter_config.json").read_text())
        edit(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d
    layer0 = variant("layer0", lambda c: c.update(target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
    pissa = variant("pissa", lambda c: c.update(init_lora_weights="pissa_niter_4"))
    alora = variant("alora", lambda c: c.update(alora_invocation_tokens=[5, 6]))
    ev = ("eval", "--model", tmp / "model", "--data", data, "--quant", "none", "--adapter")
    cases = [
        ((*ev, layer0), 6, ["adapter_config.json", "target_modules", "subset of layers"]),
        (("export", "--adapter", layer0, "--out", tmp / "never"), 6, ["target_modules", "subset of layers"]),
        ((*ev, pissa), 6, ["adapter_config.json", "init_lora_weights", "changes the base weights"]),
        ((*ev, alora), 6, ["adapter_config.json", "alora_invocation_tokens"]),
    ]
    failures += exit_case_failures(run, cases)
    if (tmp / "never").exists():
        failures.append("a refused export left its output directory")
    # A key PEFT 0.21 does not have: named in a warning (as PEFT warns), the adapter read as before.
    future = variant("future", lambda c: c.update(future_feature=1))
    p = run(*ev, future)
    plain = run(*ev, tmp / "peft_adapter")
    if p.returncode != 0 or "future_feature" not in p.stderr or last_json(p)["loss"] != last_json(plain)["loss"]:
        failures.append(f"an unknown adapter_config.json key: exit {p.returncode}, {p.stderr[-300:]!r}")
    return failures


if __name__ == "__main__":
    main()
