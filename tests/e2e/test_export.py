"""`qlora-train export --merge` writes a plain Hugging Face model (no quantization_config, tokenizer copied) whose
transformers loss equals `qlora-train eval --adapter`'s: exactly up to fp32 rounding with --dtype fp32, within bf16
rounding in the default 16-bit output. The base from adapter_config.json or --model, and refusals, are checked
too (sharding: tests/test_lora.cpp)."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import torch
from checks import exit_case_failures, finish
from test_eval import reference_loss
from test_peft_roundtrip import last_json, make_setup, run, run_ok


def transformers_loss(model_dir, sp, data):
    from transformers import AutoModelForCausalLM
    # fp32 compute on the saved weights: only their rounding to the saved dtype separates the figures.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = [json.loads(l) for l in data.read_text().splitlines()]
    return reference_loss(model, sp, records, 512)


def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_export_"))
    sp, data = make_setup(tmp, seed=11, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                          b_std=0.5)
    adapter = tmp / "peft_adapter"
    failures = []
    ours = last_json(run_ok("eval", "--model", tmp / "model", "--adapter", adapter, "--data", data))

    for dtype, bound in (("fp32", 1e-5), ("auto", 1e-3)):
        out = tmp / f"merged_{dtype}"
        info = last_json(run_ok("export", "--adapter", adapter, "--out", out, "--merge", "--dtype", dtype))
        cfg = json.loads((out / "config.json").read_text())
        want_dtype = "float32" if dtype == "fp32" else "bfloat16"  # auto: the base is fp32, so bf16
        if "quantization_config" in cfg or cfg.get("dtype") != want_dtype or info["dtype"] != want_dtype:
            failures.append(f"{dtype}: config.json {cfg.get('dtype')}, quantization_config {'quantization_config' in cfg}")
        if info["adapters"] != 3 * 2:
            failures.append(f"{dtype}: merged {info['adapters']} adapters, want 6")
        for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            if not (out / f).exists():
                failures.append(f"{dtype}: {f} was not copied")
        if any(p.name.endswith(".tmp-export") for p in tmp.iterdir()):
            failures.append(f"{dtype}: the temporary directory was left behind")
        ref, count = transformers_loss(out, sp, data)
        rel = abs(ref - ours["loss"]) / ours["loss"]
        print(f"merged {dtype}: transformers {ref:.6f}, eval --adapter {ours['loss']:.6f}, rel {rel:.2e}")
        if rel > bound or count != ours["tokens"]:
            failures.append(f"merged {dtype}: transformers loss {ref} vs eval --adapter {ours['loss']} (bound {bound})")
        # Our own loader reads the merged directory as the same model.
        again = last_json(run_ok("eval", "--model", out, "--data", data, "--quant", "none"))
        if abs(again["loss"] - ref) / ref > 1e-5:
            failures.append(f"merged {dtype}: eval --quant none {again['loss']} vs transformers {ref}")

    # Without the adapter's effect the merged model would equal the base: make sure it does not.
    base = last_json(run_ok("eval", "--model", tmp / "model", "--data", data))
    if abs(base["loss"] - ours["loss"]) < 1e-3:
        failures.append("the adapter does not change the loss: the check above would prove nothing")

    # --model instead of base_model_name_or_path; unresolvable base; non-empty output.
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    cfg_path.write_text(json.dumps(cfg))
    run_ok("export", "--adapter", adapter, "--model", tmp / "model", "--out", tmp / "merged_model_arg", "--merge",
           "--dtype", "fp32")
    a = (tmp / "merged_fp32" / "model.safetensors").read_bytes()
    b = (tmp / "merged_model_arg" / "model.safetensors").read_bytes()
    if a != b:
        failures.append("export with --model differs from export with base_model_name_or_path")
    # Found in fuzzing round 12: --out with a trailing slash (shell completion) put the temporary directory inside the
    # output ("out/.tmp-export") and failed to rename it into place (exit 8, nothing written).
    p = run("export", "--adapter", adapter, "--model", tmp / "model", "--out", f"{tmp / 'merged_slash'}/", "--merge",
            "--dtype", "fp32")
    if p.returncode != 0 or (tmp / "merged_slash" / "model.safetensors").read_bytes() != a:
        failures.append(f"export --merge --out DIR/: exit {p.returncode}, {p.stderr[-300:]!r}")
    cases = [
        (("export", "--adapter", adapter, "--out", tmp / "x", "--merge"), 2, ["base_model_name_or_path", "--model"]),
        (("export", "--adapter", adapter, "--model", tmp / "model", "--out", tmp / "merged_fp32", "--merge"), 2,
         ["not empty"]),
        (("export", "--adapter", tmp / "none", "--model", tmp / "model", "--out", tmp / "y", "--merge"), 6, ["none"]),
        (("export", "--adapter", adapter, "--model", tmp / "model", "--out", tmp / "z", "--dtype", "fp32"), 2,
         ["--dtype fp32", "--merge"]),
        (("export", "--adapter", adapter, "--model", tmp / "model", "--out", tmp / "z", "--gguf", "f16", "--dtype", "bf16"),
         2, ["--dtype bf16", "--gguf"]),
    ]
    (tmp / "a_file").write_text("x")
    cases.append((("export", "--adapter", adapter, "--model", tmp / "model", "--out", tmp / "a_file", "--merge"), 2,
                  ["a_file", "is a file"]))
    failures += exit_case_failures(run, cases)
    # A merged weight that is not finite: exit 7 naming it, and neither the output nor its temporary directory left.
    import shutil
    from safetensors.torch import load_file, save_file
    nan = tmp / "adapter_nan"
    shutil.copytree(adapter, nan)
    t = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in sorted(t) if "lora_B" in k)
    t[key][0, 0] = float("inf")
    save_file(t, nan / "adapter_model.safetensors")
    p = run("export", "--adapter", nan, "--model", tmp / "model", "--out", tmp / "m_nan", "--merge", "--dtype", "fp32")
    left = [x.name for x in tmp.iterdir() if x.name.startswith("m_nan")]
    if p.returncode != 7 or "non-finite" not in p.stderr or left:
        failures.append(f"a non-finite merged weight: exit {p.returncode}, left {left}, {p.stderr[-300:]!r}")
    # Found by fuzzing (round 9): `mpirun -np 2 qlora-train export` ran the export on both ranks into one --out (a
    # stray model.safetensors.tmp left in it, or "cannot create" on one rank). Every command but training is refused
    # under a launcher of several ranks, naming the rank; nothing is written.
    mpi_env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", os.environ["QT_BINARY"], "export", "--adapter",
                        str(adapter), "--model", str(tmp / "model"), "--out", str(tmp / "m_mpi"), "--merge"],
                       capture_output=True, text=True, env=mpi_env, timeout=120)
    left = [x.name for x in tmp.iterdir() if x.name.startswith("m_mpi")]
    if p.returncode != 2 or "export runs in one process, but this is rank 1 of 2 (launcher mpirun)" not in p.stderr or left:
        failures.append(f"export under mpirun -np 2: exit {p.returncode}, left {left}, {p.stderr[-300:]!r}")
    torchrun_env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    for command in (["quantize", "--model", tmp / "model", "--out", tmp / "q_rank1"],
                    ["eval", "--model", tmp / "model", "--data", data],
                    ["generate", "--model", tmp / "model", "--prompt", "a"]):
        p = subprocess.run([os.environ["QT_BINARY"], *map(str, command)], capture_output=True, text=True,
                           env=torchrun_env, timeout=120)
        if p.returncode != 2 or f"{command[0]} runs in one process, but this is rank 1 of 2 (launcher torchrun)" not in p.stderr:
            failures.append(f"{command[0]} as rank 1 of 2: exit {p.returncode}, {p.stderr[-300:]!r}")
    finish("export checks", failures)


if __name__ == "__main__":
    main()
