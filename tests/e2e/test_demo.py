"""The README's demo learns its task: `qlora-train --config configs/demo.json` (NF4 base shipped in
configs/demo/base + LoRA, "Shift every digit by one") raises held-out exact match by at least 0.3.
Shortened: 40 steps, 30 held-out prompts (about 15 s on 2 CPU cores; the full demo gives 0% -> 100%). `eval
--exact-match` gives the run's figures before and after."""
import json, os, pathlib, subprocess, sys, tempfile

BIN = os.environ["QT_BINARY"]
SRC = pathlib.Path(os.environ.get("QT_SOURCE_DIR", pathlib.Path(__file__).resolve().parents[2]))

def main():
    out = pathlib.Path(tempfile.mkdtemp(prefix="qt_demo_"))
    cmd = [BIN, "--config", str(SRC / "configs/demo.json"), "--set", f"output_dir={out}",
           "--set", "train.steps=40", "--set", "eval.max_examples=30", "--set", "model.device=cpu"]
    p = subprocess.run(cmd, cwd=SRC, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        print(p.stdout, p.stderr[-4000:], sep="\n")
        sys.exit(f"FAIL: demo exited {p.returncode}")
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        print(p.stdout, p.stderr[-4000:], sep="\n")
        sys.exit("FAIL: no JSON summary line on stdout")
    s = json.loads(lines[-1])
    before, after = s["exact_match_before"], s["exact_match_after"]
    print(f"exact match {before:.3f} -> {after:.3f}, last loss {s['last_loss']:.4f}")
    if not after >= before + 0.3:
        print(p.stdout, p.stderr[-4000:], sep="\n")
        sys.exit(f"FAIL: exact match rose {before:.3f} -> {after:.3f}, expected at least +0.3")
    # `eval --exact-match` on the trained adapter and on the base alone gives the run's figures (the same model,
    # records and rendering through the run's config).
    for adapter, want in ((["--adapter", str(out / "adapter")], after), ([], before)):
        q = subprocess.run([BIN, "eval", "--config", str(SRC / "configs/demo.json"), "--set", "model.device=cpu",
                            "--data", str(SRC / "configs/demo/task_eval.jsonl"), "--exact-match", "30",
                            "--max-new-tokens", "8", "--device", "cpu", *adapter],
                           cwd=SRC, capture_output=True, text=True, timeout=600)
        got = json.loads(q.stdout.strip().splitlines()[-1]) if q.returncode == 0 else {}
        print(f"eval --exact-match {'with' if adapter else 'without'} the adapter: {got.get('exact_match')}")
        if q.returncode != 0 or got.get("exact_match") != want or got.get("exact_match_total") != 30:
            sys.exit(f"FAIL: eval --exact-match gave {got} (exit {q.returncode}, {q.stderr[-1500:]}), the run {want}")
    print("PASS")

if __name__ == "__main__":
    main()
