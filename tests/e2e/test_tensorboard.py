"""TensorBoard event files (issue 29): a run writes events.out.tfevents.* into its output directory, and the
`tensorboard` package reads back (checking the TFRecord CRCs) the scalars metrics.jsonl holds: train/loss,
train/learning_rate, train/grad_norm, train/tokens_per_s, train/target_tokens_per_s, eval/loss; a resumed run adds
its steps in a new file of the same run."""
import json, os, pathlib, subprocess, sys, tempfile, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_tensorboard_"))
TAGS = {"train/loss": "loss", "train/learning_rate": "lr", "train/grad_norm": "grad_norm",
        "train/tokens_per_s": "tokens_per_s", "train/target_tokens_per_s": "target_tokens_per_s",
        "eval/loss": "eval_loss"}


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_back(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def logged(out):
    want = {t: [] for t in TAGS}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        j = json.loads(line)
        for tag, key in TAGS.items():
            if key in j:
                want[tag].append((j["step"], j[key]))
    return want


def close(a, b):
    return len(a) == len(b) and all(s == t and abs(x - y) <= 1e-6 * max(1.0, abs(y)) for (s, x), (t, y) in zip(a, b))


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=3)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 24, 6)
    cfg = TMP / "run.json"
    cfg.write_text(json.dumps({
        "output_dir": str(TMP / "out"), "model": {"path": str(TMP / "model"), "device": "cpu"}, "lora": {"r": 4},
        "data": {"train_file": str(TMP / "train.jsonl"), "max_seq_len": 32, "eval_fraction": 0.2},
        "train": {"steps": 6, "batch_size": 2, "eval_every": 2}, "checkpoint": {"every": 3},
        "logging": {"progress": "lines"}}))
    p = run("--config", cfg, "--set", "train.steps=3")
    check(p.returncode == 0, f"a 3-step run exits 0 ({p.returncode}) {p.stderr[-300:]}")
    files = sorted(f.name for f in (TMP / "out").iterdir() if f.name.startswith("events.out.tfevents."))
    check(len(files) == 1, f"the run wrote one event file: {files}")
    got, want = read_back(TMP / "out"), logged(TMP / "out")
    check(set(got) == set(TAGS), f"TensorBoard reads the tags {sorted(TAGS)}: {sorted(got)}")
    bad = [t for t in TAGS if not close(got.get(t, []), want[t]) or not want[t]]
    check(not bad, f"each holds metrics.jsonl's values at its steps: {[(t, got.get(t), want[t]) for t in bad]}")

    # Resume: a straight 6-step run (checkpoints at 3 and 6) made to look stopped after step 3 (its checkpoint-6 and
    # adapter removed; its event file and metrics.jsonl kept, steps 4-6 in them); `--resume auto` writes a new event
    # file that starts with a purge of step 4 on: TensorBoard shows steps 1-6 once, 4-6 from the resumed run (equal to
    # the straight run's), and metrics.jsonl too.
    p = run("--config", cfg, "--set", "output_dir=" + str(TMP / "resumed"), "--set", "train.steps=6")
    check(p.returncode == 0, "a 6-step run")
    full = read_back(TMP / "resumed")
    for f in (TMP / "resumed").iterdir():
        if f.name.startswith(("checkpoint-6", "adapter")):
            subprocess.run(["rm", "-rf", str(f)])
    # metrics.jsonl as runs and hands leave it: a half-written line, a step that is no number, a later step written
    # as a float, a loss written as null (a NaN), a whole last line without its newline.
    mj_path = TMP / "resumed" / "metrics.jsonl"
    mj_path.write_text(mj_path.read_text().replace('"loss":', '"loss":null,"was":', 1)
                       + '{"step": 7, "loss": 1.2\n{"step": "x", "loss": 1}\n{"step": 9.0, "loss": 1.0}\n'
                       + '{"step": 2, "note": "unterminated"}')
    time.sleep(1.1)  # (event files are read in name order, which starts with the second they were made in)
    p = run("--config", cfg, "--set", "output_dir=" + str(TMP / "resumed"), "--set", "train.steps=6", "--resume", "auto")
    files = [f.name for f in (TMP / "resumed").iterdir() if f.name.startswith("events.out.tfevents.")]
    got = read_back(TMP / "resumed")
    check(p.returncode == 0 and len(files) == 2 and [s for s, _ in got.get("train/loss", [])] == [1, 2, 3, 4, 5, 6]
          and close(got["train/loss"], full["train/loss"]),
          f"a resumed run's event file purges the later steps of the first and continues with the straight run's "
          f"values (exit {p.returncode}): {got.get('train/loss')}")
    lines = (TMP / "resumed" / "metrics.jsonl").read_text().splitlines()
    try:
        mj = [json.loads(l) for l in lines]
    except ValueError:
        mj = []
    check([j["step"] for j in mj if "loss" in j] == [1, 2, 3, 4, 5, 6] and any(j.get("note") for j in mj)
          and "line(s) that are no JSON object" in p.stderr,
          f"metrics.jsonl holds each step once, every line JSON (the broken lines dropped with a warning, the last line "
          f"given its newline): {lines[-8:]}")

    p = run("--config", cfg, "--set", "train.steps=3")
    check(p.returncode == 3 and "events.out.tfevents." in p.stderr, "an output_dir with event files is another run's")
    finish("TensorBoard checks")


if __name__ == "__main__":
    main()
