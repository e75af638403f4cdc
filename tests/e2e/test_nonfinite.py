"""A loss that is not finite (CPU, through the QT_TEST_NAN_LOSS_AT_STEP hook, which makes step N's loss NaN, and so
its gradients): exit code 7 (Numeric), one message naming the step and the output directory, nothing of that step
written, the checkpoint from before it complete, and a resume from it ending as a run that never failed."""
import os, pathlib, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))

from checks import check, finish, ref_then_failing_run, run_binary, tiny_cpu_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_nonfinite_"))


def write_config(name):
    return tiny_cpu_config(TMP, name, {"steps": 4, "batch_size": 2, "seed": 3, "log_every": 1}, {"lr": 2e-3},
                           {"every": 1, "keep_last": 5})


def main():
    p, err, last = ref_then_failing_run(BIN, TMP, write_config, "run", 24, {"QT_TEST_NAN_LOSS_AT_STEP": "3"})
    cfg = TMP / "run.json"
    check(p.returncode == 7, f"a non-finite loss exits 7 (Numeric), got {p.returncode}")
    check("step 3: the loss is not finite" in last, "the message names step 3 and the loss")
    check(str(TMP / "run") in last and "intact" in last, "the message says where the intact checkpoint is")
    check(sum("not finite" in l for l in err) == 1, "one message, said once")
    check((TMP / "run" / "checkpoint-2" / "COMPLETE").exists() and not (TMP / "run" / "checkpoint-3").exists(),
          "checkpoint-2 is complete, nothing after it")
    check(not (TMP / "run" / "adapter").exists(), "no final adapter from the failed run")
    p = run_binary(BIN, cfg, "--resume", "auto")
    check(p.returncode == 0 and "checkpoint-2" in p.stderr, f"the run resumes from checkpoint-2 (exit {p.returncode})")
    a = TMP / "run" / "adapter" / "adapter_model.safetensors"
    check(a.exists() and a.read_bytes() == (TMP / "ref" / "adapter" / "adapter_model.safetensors").read_bytes(),
          "resumed after the error, the run ends with the adapter of a run that never failed")
    # An adapter scaled far past the usual (fuzzing round 8: lora.alpha 1e30 blamed the base weights and the data):
    # the message names the scale and lora.alpha.
    p = run_binary(BIN, write_config("scaled"), "--set", "lora.alpha=1e30")
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode == 7 and "not finite" in last and "lora.alpha" in last and "lower lora.alpha" in last,
          f"a huge lora.alpha: exit 7 naming it ({p.returncode}: {last[-300:]})")
    finish("non-finite loss checks")


if __name__ == "__main__":
    main()
