"""model.dtype fp16: dynamic loss scaling (torch.amp.GradScaler's rule). A scale too large at the start
(QT_TEST_LOSS_SCALE) makes the scaled gradients overflow: those steps are not applied, each halves the scale and
says so, and training then proceeds (the loss falls). The scale is in the checkpoint: a run resumed halfway ends with
the straight run's adapter, byte for byte. fp32 runs no loss scaling."""
import json, os, pathlib, re, shutil, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, run_binary, tiny_cpu_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_fp16_"))
DEVICE = "cpu"  # test_fp16_gpu.py: cuda


def config(name, dtype):
    path = tiny_cpu_config(TMP, name, {"steps": 24, "batch_size": 4, "seed": 3, "log_every": 4},
                           {"lr": 1e-2, "warmup_steps": 2}, {"every": 12, "keep_last": 3})
    cfg = json.loads(path.read_text())
    cfg["model"]["dtype"] = dtype
    cfg["model"]["device"] = DEVICE
    path.write_text(json.dumps(cfg))
    return path


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 96, 21)
    hook = {"QT_TEST_LOSS_SCALE": str(2 ** 30)}
    p = run_binary(BIN, config("fp16", "fp16"), env=hook)
    check(p.returncode == 0, f"an fp16 run with a loss scale too large at first completes (exit {p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    over = re.findall(r"step (\d+): the fp16 gradients overflowed at loss scale (\d+): the update was not applied; "
                      r"the scale is now (\d+)", p.stderr)
    check(len(over) >= 3 and all(int(b) * 2 == int(a) for _, a, b in over),
          f"overflowing steps are skipped, each halving the scale ({len(over)} of them)")
    summary = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    check(summary.get("last_loss", 99) < summary.get("first_loss", 0),
          f"training proceeds once the scale fits (loss {summary.get('first_loss')} -> {summary.get('last_loss')})")
    state = json.loads((TMP / "fp16" / "checkpoint-24" / "trainer_state.json").read_text())
    check(over and state.get("loss_scale") == int(over[-1][2]),
          f"the checkpoint keeps the scale ({state.get('loss_scale')}, the last message said {over[-1][2] if over else None})")

    # Resumed from checkpoint-12: the same scale from there on, the straight run's adapter.
    shutil.copytree(TMP / "fp16", TMP / "fp16_resumed")
    shutil.rmtree(TMP / "fp16_resumed" / "checkpoint-24")
    shutil.rmtree(TMP / "fp16_resumed" / "adapter")
    cfg = json.loads(config("fp16_resumed", "fp16").read_text())
    p = run_binary(BIN, TMP / "fp16_resumed.json", "--resume", str(TMP / "fp16_resumed" / "checkpoint-12"), env=hook)
    check(p.returncode == 0, f"the fp16 run resumes from step 12 (exit {p.returncode}) {p.stderr[-1500:] if p.returncode else ''}")
    same = (TMP / "fp16" / "adapter" / "adapter_model.safetensors").read_bytes() == \
           (TMP / "fp16_resumed" / "adapter" / "adapter_model.safetensors").read_bytes()
    check(same and cfg["model"]["dtype"] == "fp16", "the resumed fp16 run ends with the straight run's adapter, byte for byte")

    # The default scale (65536): the fp16 run follows the fp32 run's losses within fp16's rounding; fp32 scales
    # nothing.
    p16 = run_binary(BIN, config("fp16_default", "fp16"))
    p32 = run_binary(BIN, config("fp32", "fp32"))
    check(p16.returncode == 0 and "dynamic loss scaling from 65536" in p16.stderr, f"fp16 scales from 65536 by default (exit {p16.returncode})")
    check(p32.returncode == 0 and "loss scal" not in p32.stderr, f"fp32 runs no loss scaling (exit {p32.returncode})")
    def losses(name):
        return {j["step"]: j["loss"] for j in map(json.loads, (TMP / name / "metrics.jsonl").read_text().splitlines())
                if "loss" in j}
    a, b = losses("fp16_default"), losses("fp32")
    worst = max(abs(a[k] - b[k]) / b[k] for k in b) if set(a) == set(b) and b else 1.0
    check(worst < 2e-2 and a[24] < a[4], f"fp16 with loss scaling follows fp32's losses (worst rel. diff {worst:.2e}; "
                                          f"{a.get(4)} -> {a.get(24)})")
    finish(f"fp16 loss scaling checks ({DEVICE})")


if __name__ == "__main__":
    main()
