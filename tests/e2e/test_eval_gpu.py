"""`qlora-train eval --device cuda` (bf16) gives transformers' fp32 loss within bf16 bounds."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_eval import reference_loss

def main():
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qt_eval_gpu_"))
    model, sp = tiny_lm.make_model_dir(tmp / "model", seed=4)
    data = tmp / "eval.jsonl"
    tiny_lm.write_text_jsonl(data, 12, 6)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    ref, count = reference_loss(model, sp, records, 512)
    p = subprocess.run([os.environ["QT_BINARY"], "eval", "--model", str(tmp / "model"), "--data", str(data),
                        "--device", "cuda", "--quant", "none"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"eval --device cuda exited {p.returncode}: {p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rel = abs(out["loss"] - ref) / ref
    print(f"cuda bf16: ours {out['loss']:.5f}, transformers fp32 {ref:.5f}, rel {rel:.2e}")
    if rel > 1e-2 or out["tokens"] != count:
        sys.exit("FAILED")

if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    main()
