"""One set of dtype names (issue 29): the run config's model.dtype and `export --dtype` both take bf16 / bfloat16,
fp16 / float16 and fp32 / float32, and both refuse another name listing them."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_dtypes_"))
NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32",
         "float32": "float32"}


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=2)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 8, 4)
    cfg = TMP / "run.json"
    cfg.write_text(json.dumps({"output_dir": str(TMP / "run"), "model": {"path": str(TMP / "model"), "device": "cpu"},
                               "lora": {"r": 4}, "data": {"train_file": str(TMP / "train.jsonl"), "max_seq_len": 32},
                               "train": {"steps": 1, "batch_size": 2}, "logging": {"progress": "lines"}}))
    for name in NAMES:
        p = run("config", "--print", "--config", cfg, "--set", f"model.dtype={name}")
        check(p.returncode == 0 and json.loads(p.stdout)["model"]["dtype"] == name, f"model.dtype {name} is accepted")
    p = run("config", "--print", "--config", cfg, "--set", "model.dtype=half")
    check(p.returncode == 3 and "model.dtype" in p.stderr and "bf16, bfloat16, fp16, float16, fp32 or float32" in p.stderr,
          f"model.dtype half is refused listing the names (exit {p.returncode}) {p.stderr.strip()[-200:]}")
    p = run("--config", cfg, "--set", "model.dtype=fp32")
    check(p.returncode == 0 and "in Float" in p.stderr, f"a run with model.dtype fp32 computes in fp32 (exit {p.returncode})")

    for name, hf in NAMES.items():
        out = TMP / f"merged_{name}"
        p = run("export", "--adapter", TMP / "run" / "adapter", "--model", TMP / "model", "--out", out, "--merge",
                "--dtype", name)
        got = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        check(p.returncode == 0 and got.get("dtype") == hf and hf in (saved.get("dtype"), saved.get("torch_dtype")),
              f"export --merge --dtype {name} writes {hf} weights (exit {p.returncode}) {p.stderr.strip()[-200:]}")
    p = run("export", "--adapter", TMP / "run" / "adapter", "--out", TMP / "merged_half", "--merge", "--dtype", "half")
    check(p.returncode == 2 and "bf16, bfloat16, fp16, float16, fp32 or float32" in p.stderr,
          f"export --dtype half is a usage error listing the names (exit {p.returncode}) {p.stderr.strip()[-200:]}")
    finish("dtype name checks")


if __name__ == "__main__":
    main()
