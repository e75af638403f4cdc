"""Adapter paths (issue 29): a run given its base by a relative path writes an absolute base_model_name_or_path, so
that PEFT's AutoPeftModelForCausalLM loads the adapter from any directory; `export` without --merge writes the base
from the root too; an adapter directory given as the model is named as such (model.path, --model)."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_adapter_paths_"))


def run(*args, cwd=TMP):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=6)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 8, 2)
    # Paths relative to the run's working directory (TMP), as a user writes them.
    (TMP / "run.json").write_text(json.dumps({
        "output_dir": "out", "model": {"path": "model", "device": "cpu"}, "lora": {"r": 4},
        "data": {"train_file": "train.jsonl", "max_seq_len": 32}, "train": {"steps": 2, "batch_size": 2},
        "checkpoint": {"every": 1}, "logging": {"progress": "lines"}}))
    p = run("--config", "run.json")
    check(p.returncode == 0, f"a run with relative paths exits 0 ({p.returncode}) {p.stderr[-300:]}")
    for d in ("out/adapter", "out/checkpoint-2"):
        base = json.loads((TMP / d / "adapter_config.json").read_text())["base_model_name_or_path"]
        check(base == str(TMP / "model"), f"{d}/adapter_config.json names the base from the root: {base}")

    # AutoPeftModelForCausalLM from another working directory finds the base.
    code = ("import sys, torch; from peft import AutoPeftModelForCausalLM; "
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(TMP / 'out' / 'adapter')!r}); "
            "print(type(m).__name__, m(input_ids=torch.tensor([[1, 5, 9]])).logits.shape[-1])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    check(p.returncode == 0 and "PeftModelForCausalLM" in p.stdout,
          f"AutoPeftModelForCausalLM loads the adapter from / (exit {p.returncode}): {p.stdout.strip()} "
          f"{p.stderr.strip()[-300:]}")

    # export without --merge, --model relative: the copy names the base from the root.
    p = run("export", "--adapter", "out/adapter", "--model", "model", "--out", "copied")
    base = json.loads((TMP / "copied" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        if p.returncode == 0 else None
    check(base == str(TMP / "model"), f"export (no --merge) with a relative --model writes it from the root: {base}")

    # An adapter directory where the model belongs.
    p = run("--config", "run.json", "--set", "model.path=out/adapter", "--set", "output_dir=out2")
    check(p.returncode == 3 and "model.path" in p.stderr and "out/adapter is a LoRA adapter (adapter_config.json)" in
          p.stderr and "lora.init_from" in p.stderr and not (TMP / "out2").exists(),
          f"model.path naming an adapter says so, before anything is written (exit {p.returncode}) "
          f"{p.stderr.strip()[-250:]}")
    p = run("generate", "--model", "out/adapter", "--prompt", "the")
    check(p.returncode == 4 and "out/adapter is a LoRA adapter (adapter_config.json); pass it as --adapter and its "
          "base as --model" in p.stderr, f"generate --model ADAPTER says so (exit {p.returncode})")
    finish("adapter path checks")


if __name__ == "__main__":
    main()
