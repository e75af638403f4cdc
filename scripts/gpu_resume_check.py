"""GPU check of exact resume (tooling, run on the GPU machine): the demo fine-tune on CUDA in bf16, straight for
40 steps, and again killed with SIGKILL right after its step-20 checkpoint then resumed with --resume auto.
Prints the largest difference between the two loss curves over steps 21-40 (expected: 0 or bf16 noise).
Usage: python3 scripts/gpu_resume_check.py BINARY WORKDIR"""
import json, os, pathlib, signal, subprocess, sys, time

def losses(out):
    d = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        j = json.loads(line)
        if "loss" in j:
            d[j["step"]] = j["loss"]
    return d

def main():
    binary, work = sys.argv[1], pathlib.Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    sets = ["--set", "model.device=cuda", "--set", "train.steps=40", "--set", "checkpoint.every=20",
            "--set", "logging.progress=lines", "--set", "train.log_every=1", "--set", "eval.exact_match_file=\"\""]
    straight, killed = work / "straight", work / "killed"
    subprocess.run(["rm", "-rf", str(straight), str(killed)])
    p = subprocess.run([binary, "--config", "configs/demo.json", "--set", f"output_dir={straight}", *sets],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"straight run exited {p.returncode}: {p.stderr[-2000:]}")
    env = {**os.environ, "QT_TEST_SLEEP_AFTER_CHECKPOINT_MS": "5000"}
    q = subprocess.Popen([binary, "--config", "configs/demo.json", "--set", f"output_dir={killed}", *sets],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while not (killed / "checkpoint-20" / "COMPLETE").exists() and q.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    q.send_signal(signal.SIGKILL)
    q.wait()
    p = subprocess.run([binary, "--config", "configs/demo.json", "--set", f"output_dir={killed}", *sets,
                        "--resume", "auto"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"resumed run exited {p.returncode}: {p.stderr[-2000:]}")
    a, b = losses(straight), losses(killed)
    diffs = [abs(a[s] - b[s]) for s in range(21, 41)]
    print(json.dumps({"check": "gpu resume after kill -9", "steps_compared": "21-40", "max_abs_loss_diff": max(diffs),
                      "loss_step_21": [a[21], b[21]], "loss_step_40": [a[40], b[40]],
                      "identical": all(a[s] == b[s] for s in range(21, 41))}), flush=True)

if __name__ == "__main__":
    main()
