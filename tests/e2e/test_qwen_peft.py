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
from test_peft_roundtrip import run_ok, last_json, peft_loss, dequantized_model, tiny_training_config
from checks import finish, run_binary

BIN = os.environ["QT_BINARY"]


def model_class(arch):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    return (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)


def make_qwen_dir(model_dir: pathlib.Path, seed: int, arch: str):
    sp = tiny_lm.make_tokenizer(model_dir)
    tiny_lm.make_qwen_model(model_dir, arch, sp.get_piece_size(), seed)
    return sp


def check(arch: str):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"qt_{arch}_peft_"))
    sp = make_qwen_dir(tmp / "model", 13, arch)
    data = tmp / "eval.jsonl"
    tiny_lm.write_text_jsonl(data, 10, 14)
    tiny_lm.write_text_jsonl(tmp / "train.jsonl", 64, 15)
    p = run_binary(BIN, tiny_training_config(tmp, {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]}))
    if p.returncode != 0:
        return [f"{arch} training exited {p.returncode}: {p.stderr[-2000:]}"]
    adapter = tmp / "run" / "adapter"
    run_ok("quantize", "--model", tmp / "model", "--out", tmp / "model_nf4")
    failures = []
    checks = [(f"{arch}, nf4 (quantize on load)", (), dequantized_model(tmp / "model", tmp / "model_nf4", model_class(arch)[1])),
              (f"{arch}, 16-bit base (--quant none)", ("--quant", "none"),
               model_class(arch)[1].from_pretrained(tmp / "model", dtype=torch.float32).eval())]
    for name, extra, base in checks:
        ref, count = peft_loss(base, adapter, sp, data)
        ours = last_json(run_ok("eval", "--model", tmp / "model", "--adapter", adapter, "--data", data, *extra))
        plain = last_json(run_ok("eval", "--model", tmp / "model", "--data", data, *extra))
        rel = abs(ours["loss"] - ref) / ref
        print(f"{name}: eval --adapter {ours['loss']:.6f}, PEFT {ref:.6f}, rel {rel:.2e} "
              f"(without adapter {plain['loss']:.6f})")
        if rel > 1e-5 or ours["tokens"] != count:
            failures.append(f"{name}: {ours} vs PEFT loss {ref} over {count} tokens")
        if abs(plain["loss"] - ours["loss"]) < 1e-3:
            failures.append(f"{name}: the trained adapter does not change the loss ({plain['loss']} vs {ours['loss']})")
        # Without the adapter: transformers' Qwen2 on the same base gives our plain eval loss.
        pref, _ = reference_loss(base, sp, [json.loads(l) for l in data.read_text().splitlines()], 512)
        if abs(pref - plain["loss"]) / pref > 1e-5:
            failures.append(f"{name}: eval without adapter {plain['loss']}, transformers {pref}")
    return failures


def main():
    failures = check("qwen2") + check("qwen3")
    finish("Qwen2 / Qwen3 PEFT round-trip checks", failures)


if __name__ == "__main__":
    main()
