"""SIGTERM (a preempted node) and SIGINT (Ctrl-C) on the real binary (CPU): the run checkpoints after the current
step, says how to resume, exits 128 + the signal (143, 130), and `--resume auto` ends with the straight run's losses and adapter
bit for bit. A second signal ends the process at once, and so does the first before the first step.""" 
import json, os, pathlib, signal, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_sigterm_"))

def config(name):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": {"steps": 8, "batch_size": 4, "seed": 3, "log_every": 1},
           "optim": {"lr": 2e-3, "warmup_steps": 1},
           "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
plots = {}  # loss.html as it was while each interrupted run trained

def losses(name):
    out = {}
    for line in (TMP / name / "metrics.jsonl").read_text().splitlines():
        j = json.loads(line)
        if "loss" in j:
            out[j["step"]] = j["loss"]
    return out

def steps_logged(name):
    f = TMP / name / "metrics.jsonl"
    return sum('"loss"' in l for l in f.read_text().splitlines()) if f.exists() else 0

def interrupted(name, sig, second=False):
    """Starts a run whose steps are slowed by the test hook, signals it after step 2 has been logged."""
    p = subprocess.Popen([BIN, "--config", str(config(name))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**ENV, "QT_TEST_STEP_DELAY_MS": "400"})
    t0 = time.time()
    while steps_logged(name) < 2 and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    plots[name] = (TMP / name / "loss.html").read_text() if (TMP / name / "loss.html").exists() else ""
    p.send_signal(sig)
    if second:
        time.sleep(0.05)
        p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return p.returncode, err

def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 48, 21)
    p = subprocess.run([BIN, "--config", str(config("straight"))], capture_output=True, text=True, env=ENV)
    check(p.returncode == 0, f"the straight run trains ({p.returncode})")
    straight = losses("straight")

    for sig, name in ((signal.SIGTERM, "term"), (signal.SIGINT, "int")):
        rc, err = interrupted(name, sig)
        ck = sorted(d.name for d in (TMP / name).iterdir() if d.name.startswith("checkpoint-"))
        check(rc == 128 + sig, f"{sig.name}: exits {128 + sig} ({rc})")
        check(len(ck) == 1 and (TMP / name / ck[0] / "COMPLETE").exists(), f"{sig.name}: one complete checkpoint {ck}")
        stopped_at = int(ck[0].split("-")[1]) if ck else -1
        check(2 <= stopped_at < 8 and max(losses(name)) == stopped_at,
              f"{sig.name}: the checkpoint is of the last finished step ({stopped_at})")
        check("--resume auto" in err, f"{sig.name}: the log says how to resume")
        # loss.html is rewritten at each logged step (there while training) and on the way out, with step ticks and
        # the learning rate on its own axis.
        plot = (TMP / name / "loss.html").read_text() if (TMP / name / "loss.html").exists() else ""
        check("<polyline" in plots[name] and "learning rate" in plot and plot.count("<polyline") == 3
              and ">0</text>" in plot and ">step</text>" in plot,
              f"{sig.name}: loss.html exists while training and after the signal, with ticks and the learning rate")
        r = subprocess.run([BIN, "--config", str(config(name)), "--resume", "auto"], capture_output=True, text=True, env=ENV)
        check(r.returncode == 0, f"{sig.name}: --resume auto finishes ({r.returncode})")
        lr = losses(name)
        check(all(lr[s] == straight[s] for s in range(1, 9)), f"{sig.name}: the resumed losses equal the straight run's")
        a = (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()
        check(a == (TMP / "straight" / "adapter" / "adapter_model.safetensors").read_bytes(),
              f"{sig.name}: the final adapter equals the straight run's")

    rc, _ = interrupted("twice", signal.SIGTERM, second=True)
    check(rc == -signal.SIGTERM, f"a second SIGTERM ends the process at once ({rc})")
    # Before the first step (loading, a slow start held by the test hook) there is nothing to checkpoint: the first
    # SIGTERM ends the process at once.
    p = subprocess.Popen([BIN, "--config", str(config("early"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**ENV, "QT_TEST_SETUP_DELAY_MS": "60000"})
    t0 = time.time()
    while not (TMP / "early" / "metrics.jsonl").exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    t_signal = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    check(p.returncode == -signal.SIGTERM and time.time() - t_signal < 30 and "before the first step" in err
          and steps_logged("early") == 0,
          f"a SIGTERM before the first step ends the process at once ({p.returncode}, "
          f"{time.time() - t_signal:.1f} s): {err.strip().splitlines()[-1:] if err.strip() else ''}")
    # After the last step (the final saves, held by the test hook) the run's steps are done: a SIGTERM lets it
    # complete, with its summary line, its final adapter and exit 0 (it used to exit 143 with no summary).
    p = subprocess.Popen([BIN, "--config", str(config("late"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**ENV, "QT_TEST_FINISH_DELAY_MS": "3000"})
    t0 = time.time()
    while steps_logged("late") < 8 and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip().startswith("{") else {}
    adapter_file = TMP / "late" / "adapter" / "adapter_model.safetensors"
    check(p.returncode == 0 and summary.get("steps") == 8 and "after the last step" in err and adapter_file.exists()
          and adapter_file.read_bytes() == (TMP / "straight" / "adapter" / "adapter_model.safetensors").read_bytes(),
          f"a SIGTERM after the last step lets the run complete with its summary and adapter ({p.returncode}, "
          f"{summary}): {err.strip().splitlines()[-1:] if err.strip() else ''}")
    finish()

if __name__ == "__main__":
    main()
