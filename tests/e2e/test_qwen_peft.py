"""A LoRA adapter trained by qlora-train on a tiny Qwen2 model (q / k / v biases, tied embeddings, model_type qwen2)
and on a tiny Qwen3 model (q / k norms before RoPE, head_dim given, untied) loads in PEFT on transformers'
Qwen2ForCausalLM / Qwen3ForCausalLM, and `qlora-train eval --adapter` gives the loss transformers + PEFT
give with it on the base as training sees it (NF4: the dequantized values of our `qlora-train quantize` bytes, read
back through bitsandbytes) and on the 16-bit base (--quant none)."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
import tiny_lm
from test_eval import reference_loss
from test_peft_roundtrip import (check_merged, compare_with_peft, dequantized_model, run_ok,
                                 tiny_training_config)
from checks import finish, run_binary

BIN = os.environ["QT_BINARY"]


def model_class(arch):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    return (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)


def make_qwen_dir(model_dir: pathlib.Path, seed: int, arch: str):
    sp = tiny_lm.make_tokenizer(model_dir)
    tiny_lm.make_qwen_model(model_dir, arch, sp.get_piece_size(), seed)
    return sp


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check(arch: str):
    """LoRA on every linear, DoRA, and LoRA with lm_head trained in full (modules_to_save; Qwen2's is tied to the
    embeddings: one tensor in both roles), each trained by qlora-train for 4 steps, then evaluated by us and by
    PEFT on transformers' model (NF4 base; LoRA also on the 16-bit base) and merged (transformers loads it)."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"qt_{arch}_peft_"))
    sp = make_qwen_dir(tmp / "model", 13, arch)
    data = tmp / "eval.jsonl"
    tiny_lm.write_text_jsonl(data, 10, 14)
    tiny_lm.write_text_jsonl(tmp / "train.jsonl", 64, 15)
    run_ok("quantize", "--model", tmp / "model", "--out", tmp / "model_nf4")
    cls = model_class(arch)[1]
    nf4_base = lambda: dequantized_model(tmp / "model", tmp / "model_nf4", cls)
    failures = []
    for variant, lora in [("LoRA", {"targets": ALL}), ("DoRA", {"use_dora": True, "targets": ["q_proj", "v_proj", "down_proj"]}),
                          ("LoRA + lm_head trained", {"targets": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]})]:
        run_tmp = tmp / variant.replace(" ", "_").replace("+", "")
        run_tmp.mkdir()
        for f in ("model", "train.jsonl"):
            (run_tmp / f).symlink_to(tmp / f)
        p = run_binary(BIN, tiny_training_config(run_tmp, lora))
        if p.returncode != 0:
            failures.append(f"{arch} {variant}: training exited {p.returncode}: {p.stderr[-2000:]}")
            continue
        adapter = run_tmp / "run" / "adapter"
        checks = [(f"{arch} {variant}, nf4 (quantize on load)", (), nf4_base())]
        if variant == "LoRA":
            checks.append((f"{arch} {variant}, 16-bit base (--quant none)", ("--quant", "none"),
                           cls.from_pretrained(tmp / "model", dtype=torch.float32).eval()))
        for name, extra, base in checks:
            # Without the adapter: transformers' model on the same base gives our plain eval loss (taken before PEFT
            # wraps the model: modules_to_save replaces its lm_head in place).
            pref, _ = reference_loss(base, sp, [json.loads(l) for l in data.read_text().splitlines()], 512)
            found, ours, plain = compare_with_peft(name, tmp / "model", adapter, extra, base, sp, data)
            failures += found
            if abs(pref - plain["loss"]) / pref > 1e-5:
                failures.append(f"{name}: eval without adapter {plain['loss']}, transformers {pref}")
            if not extra:
                run_ok("export", "--adapter", adapter, "--model", tmp / "model", "--out", run_tmp / "merged", "--merge",
                       "--dtype", "fp32")
                failures += check_merged(name, run_tmp / "merged", cls, sp, data, ours["loss"])
    return failures


def main():
    failures = check("qwen2") + check("qwen3")
    finish("Qwen2 / Qwen3 PEFT round-trip checks", failures)


if __name__ == "__main__":
    main()
