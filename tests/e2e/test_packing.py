"""data.packing_strategy end to end on a tiny NF4 model on the CPU: by default an SFT run packs its rows best fit
(each 1,000 documents of the shuffled order reordered so that next-fit packs them as best-fit decreasing does), in
fewer rows and steps an epoch than in order, and says so in its log; a run resumed halfway ends with the straight
run's adapter byte for byte; a checkpoint written before the key existed (its rows in order) is refused with the
setting that resumes it, which then does; best_fit without packing is refused naming the key."""
import json, os, pathlib, random, shutil, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, run_binary
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_packing_"))


def config(name, **data):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / "train.jsonl"), "format": "text", "max_seq_len": 64, **data},
           "train": {"epochs": 1, "batch_size": 2, "seed": 3, "log_every": 1},
           "optim": {"lr": 1e-2}, "checkpoint": {"every": 4, "keep_last": 100}, "logging": {"progress": "lines"}}
    path = TMP / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def adapter(name):
    return (TMP / name / "adapter" / "adapter_model.safetensors").read_bytes()


def steps(name):
    return [json.loads(l)["step"] for l in (TMP / name / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def packing_line(p):
    lines = [l for l in p.stderr.splitlines() if "packing (" in l]
    return lines[0][lines[0].index("packing ("):] if lines else ""


def copy_at_step_4(src, name):
    """src's run directory copied to `name` with checkpoint-4 alone, no adapter: a run stopped after step 4."""
    shutil.copytree(TMP / src, TMP / name)
    for d in (TMP / name).glob("checkpoint-*"):
        if d.name != "checkpoint-4":
            shutil.rmtree(d)
    shutil.rmtree(TMP / name / "adapter")


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    # Documents of 1 to 40 words: next-fit in order leaves much of a 64-token row empty.
    rng = random.Random(4)
    with open(TMP / "train.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(tiny_lm.WORDS) for _ in range(rng.randint(1, 40)))}) + "\n")

    runs = {name: run_binary(BIN, config(name, **data))
            for name, data in (("auto", {}), ("in_order", {"packing_strategy": "in_order"}))}
    for name, p in runs.items():
        check(p.returncode == 0, f"{name}: the run completes (exit {p.returncode}) {p.stderr[-800:] if p.returncode else ''}")
    if any(p.returncode for p in runs.values()):
        return finish("packing checks")
    best, order = packing_line(runs["auto"]), packing_line(runs["in_order"])
    check(best.startswith("packing (best fit)") and order.startswith("packing (in order)"),
          f"the log says how rows were packed: '{best}' / '{order}'")
    rows = lambda line: int(line.split(": ")[1].split(" rows")[0])
    padding = lambda line: float(line.split("tokens an epoch, ")[1].split("%")[0])
    check(rows(best) < rows(order) and padding(best) < 0.5 * padding(order),
          f"best fit packs an epoch in fewer rows with less padding ({rows(best)} rows, {padding(best)}% against "
          f"{rows(order)}, {padding(order)}%)")
    s_best, s_order = steps("auto"), steps("in_order")
    check(len(s_best) == (rows(best) + 1) // 2 and len(s_order) == (rows(order) + 1) // 2,
          f"and the epoch takes a step a 2 rows: {len(s_best)} steps against {len(s_order)}")

    # Resumed at step 4: the straight run's adapter.
    copy_at_step_4("auto", "resumed")
    p = run_binary(BIN, config("resumed"), "--resume", str(TMP / "resumed" / "checkpoint-4"))
    check(p.returncode == 0 and adapter("resumed") == adapter("auto"),
          f"resumed at step 4, the best-fit run ends with the straight run's adapter byte for byte (exit {p.returncode})")

    # A checkpoint from before the key (its config without it): refused, then resumed in order as it was packed.
    copy_at_step_4("in_order", "old")
    state_file = TMP / "old" / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["data"]["packing_strategy"]
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    # The COMPLETE marker holds the state file's hash: 64-bit FNV-1a over its little-endian 8-byte words, then bytes.
    data, h, i = state_file.read_bytes(), 1469598103934665603, 0
    while i + 8 <= len(data):
        h = ((h ^ int.from_bytes(data[i:i + 8], "little")) * 1099511628211) % 2**64
        i += 8
    for c in data[i:]:
        h = ((h ^ c) * 1099511628211) % 2**64
    marker = TMP / "old" / "checkpoint-4" / "COMPLETE"
    lines = marker.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + f" {h:016x}"
    marker.write_text("\n".join(lines) + "\n")
    p = run_binary(BIN, config("old"), "--resume", str(TMP / "old" / "checkpoint-4"))
    msg = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check(p.returncode != 0 and "data.packing_strategy=in_order" in p.stderr and "checkpoint-4" in msg,
          f"a checkpoint written before data.packing_strategy is refused with the setting to resume it (exit "
          f"{p.returncode}): {msg}")
    p = run_binary(BIN, config("old"), "--resume", str(TMP / "old" / "checkpoint-4"), "--set",
                   "data.packing_strategy=in_order")
    check(p.returncode == 0 and adapter("old") == adapter("in_order"),
          f"with it, the run resumes and ends with the in-order run's adapter byte for byte (exit {p.returncode}) "
          f"{p.stderr[-600:] if p.returncode else ''}")

    p = run_binary(BIN, config("bad", packing=False, packing_strategy="best_fit"))
    check(p.returncode == 3 and "data.packing_strategy" in p.stderr,
          f"best_fit without packing is refused naming the key (exit {p.returncode})")
    finish("packing checks")


if __name__ == "__main__":
    main()
