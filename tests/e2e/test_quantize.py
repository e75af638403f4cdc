"""`qlora-train quantize` writes a directory that transformers + bitsandbytes load as 4-bit NF4, and that our
loader reads back without re-quantizing: the losses agree with transformers on those bytes and with
quantizing on load. Bad pre-quantized directories get clear errors."""
import json, os, pathlib, shutil, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
import tiny_lm
import bnb_cpu
from test_eval import reference_loss
from checks import finish

BIN = os.environ["QT_BINARY"]

def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True)

def eval_loss(model_dir, data, *extra):
    p = run("eval", "--model", str(model_dir), "--data", str(data), *extra)
    if p.returncode != 0:
        sys.exit(f"eval on {model_dir} exited {p.returncode}: {p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])["loss"]

def main():
    bnb_cpu.make_row_safe()
    from transformers import LlamaForCausalLM
    from safetensors.torch import load_file, save_file
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_quantize_"))
    _, sp = tiny_lm.make_model_dir(tmp / "model", seed=11)
    data = tmp / "eval.jsonl"
    tiny_lm.write_text_jsonl(data, 10, 8)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    failures = []

    p = run("quantize", "--model", str(tmp / "model"), "--out", str(tmp / "q"))
    if p.returncode != 0:
        sys.exit(f"quantize exited {p.returncode}: {p.stderr}")
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    print("quantize:", stats)
    cfg = json.loads((tmp / "q" / "config.json").read_text())
    if cfg.get("quantization_config", {}).get("bnb_4bit_quant_type") != "nf4":
        failures.append("config.json lacks the nf4 quantization_config")
    for f in ("tokenizer.model", "tokenizer_config.json"):
        if not (tmp / "q" / f).exists():
            failures.append(f"{f} was not copied")

    # transformers + bitsandbytes load it as a 4-bit model; its loss on the same bytes is our loss.
    hf = LlamaForCausalLM.from_pretrained(tmp / "q", device_map="cpu", dtype=torch.float32)
    n4 = sum(1 for m in hf.modules() if type(m).__name__ == "Linear4bit")
    if n4 != 14:
        failures.append(f"transformers loaded {n4} Linear4bit modules, expected 14")
    ref, _ = reference_loss(hf, sp, records, 512)
    ours_q = eval_loss(tmp / "q", data)
    ours_onload = eval_loss(tmp / "model", data)  # quantized on load
    print(f"transformers on our NF4 bytes {ref:.6f}; ours pre-quantized {ours_q:.6f}; ours quantized on load {ours_onload:.6f}")
    if abs(ours_q - ref) / ref > 1e-4:
        failures.append(f"pre-quantized loss {ours_q} vs transformers {ref}")
    if ours_q != ours_onload:
        failures.append(f"pre-quantized loss {ours_q} differs from quantize-on-load {ours_onload}")
    ours_none = eval_loss(tmp / "q", data, "--quant", "none")  # dequantized to fp32 dense weights
    if abs(ours_none - ours_q) / ours_q > 1e-5:
        failures.append(f"--quant none on a quantized dir: {ours_none} vs {ours_q}")

    # Bad pre-quantized directories.
    bad = tmp / "fp4"
    shutil.copytree(tmp / "q", bad)
    c = json.loads((bad / "config.json").read_text())
    c["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (bad / "config.json").write_text(json.dumps(c))
    p = run("eval", "--model", str(bad), "--data", str(data))
    if p.returncode != 4 or "bnb_4bit_quant_type" not in p.stderr:
        failures.append(f"fp4 config: exit {p.returncode}, {p.stderr!r}")
    bad = tmp / "stats"
    shutil.copytree(tmp / "q", bad)
    t = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    t[key] = t[key][:-3].clone()
    save_file(t, bad / "model.safetensors")
    p = run("eval", "--model", str(bad), "--data", str(data))
    if p.returncode != 4 or "up_proj" not in p.stderr:
        failures.append(f"truncated absmax: exit {p.returncode}, {p.stderr!r}")
    else:
        print("ok:", p.stderr.strip().splitlines()[-1])
    # A NaN in a pre-quantized file's code map (found by fuzzing: loaded, generate printed token 0 with exit 0).
    for suffix in ("quant_map", "nested_quant_map"):
        bad = tmp / suffix
        shutil.copytree(tmp / "q", bad)
        t = load_file(bad / "model.safetensors")
        key = "model.layers.0.mlp.down_proj.weight." + suffix
        t[key][3] = float("nan")
        save_file(t, bad / "model.safetensors")
        for cmd in (("eval", "--model", str(bad), "--data", str(data)),
                    ("generate", "--model", str(bad), "--prompt", "hello", "--max-new-tokens", "2")):
            p = run(*cmd)
            if p.returncode != 4 or key not in p.stderr or "NaN" not in p.stderr:
                failures.append(f"NaN {suffix}, {cmd[0]}: exit {p.returncode}, {p.stderr[-300:]!r}")
            else:
                print("ok:", p.stderr.strip().splitlines()[-1])
    afile = tmp / "a_file"
    afile.write_text("x")
    p = run("quantize", "--model", str(tmp / "model"), "--out", str(afile))
    if p.returncode != 2 or "is a file, not a directory" not in p.stderr or afile.read_text() != "x":
        failures.append(f"--out a file: exit {p.returncode}, {p.stderr[-300:]!r}")
    # Found by fuzzing (round 8): --out "" (an unset shell variable) wrote the model into the working directory, over
    # its config.json; every path option now refuses "".
    cwd = tmp / "cwd"
    cwd.mkdir()
    (cwd / "config.json").write_text("mine")
    for cmd in (["quantize", "--model", str(tmp / "model"), "--out", ""],
                ["export", "--adapter", str(tmp / "no_adapter"), "--out", ""],
                ["eval", "--model", str(tmp / "model"), "--data", ""]):
        p = subprocess.run([BIN, *cmd], capture_output=True, text=True, cwd=cwd)
        if p.returncode != 2 or "is empty" not in p.stderr or sorted(x.name for x in cwd.iterdir()) != ["config.json"] \
                or (cwd / "config.json").read_text() != "mine":
            failures.append(f"{cmd[0]} with an empty path: exit {p.returncode}, {sorted(cwd.iterdir())}, {p.stderr[-300:]!r}")
    # What is not a file in the model directory (Meta's original/ beside the HF files, a tokenizer.model that is a
    # directory) is not copied, and the run says so (fuzzing round 8: the copy silently lacked the tokenizer).
    sub = tmp / "with_dir"
    shutil.copytree(tmp / "model", sub)
    (sub / "original").mkdir()
    p = run("quantize", "--model", str(sub), "--out", str(tmp / "with_dir_q"))
    if p.returncode != 0 or "original is not a file: not copied" not in p.stderr or (tmp / "with_dir_q" / "original").exists():
        failures.append(f"a directory in the model directory: exit {p.returncode}, {p.stderr[-300:]!r}")
    p = run("quantize", "--model", str(tmp / "q"), "--out", str(tmp / "qq"))
    if p.returncode != 4 or "already quantized" not in p.stderr:
        failures.append(f"re-quantize: exit {p.returncode}, {p.stderr!r}")
    # A weight with a NaN: quantize names it and leaves no output directory behind (nor files in a given empty one).
    nan = tmp / "nan"
    shutil.copytree(tmp / "model", nan)
    t = load_file(nan / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    t[key][0, 3] = float("nan")
    save_file(t, nan / "model.safetensors")
    for out in (tmp / "nan_q", tmp / "nan_empty"):
        if out.name == "nan_empty":
            out.mkdir()
        p = run("quantize", "--model", str(nan), "--out", str(out))
        left = sorted(x.name for x in out.iterdir()) if out.exists() else None
        if p.returncode != 4 or key not in p.stderr or "NaN" not in p.stderr or left not in (None, []) \
                or (out.name == "nan_empty") != (left == []):
            failures.append(f"NaN weight, --out {out.name}: exit {p.returncode}, left {left}, {p.stderr[-300:]!r}")
    finish("quantize checks", failures)

if __name__ == "__main__":
    main()
