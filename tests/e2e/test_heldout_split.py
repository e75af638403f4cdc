"""The held-out split is written to the output directory (issue 29): output_dir/eval.jsonl holds the held-out records
of data.train_file (data.eval_fraction) as they were in that file, and `qlora-train eval --data output_dir/eval.jsonl
--adapter output_dir/adapter` recomputes the logged eval_loss (packed rows in training, one record at a time in
eval), given the run's max_seq_len or its config (`eval --config`). With data.eval_file the file's records are written. A new run into that directory names eval.jsonl among the
earlier run's files."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish, save_config
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_heldout_"))


def write_config(name, **over):
    cfg = {"output_dir": str(TMP / name), "model": {"path": str(TMP / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"train_file": str(TMP / "train.jsonl"), "eval_fraction": 0.25, "max_seq_len": 256,
                    "packing": True},
           "train": {"steps": 3, "batch_size": 2, "seed": 3, "log_every": 1},
           "optim": {"lr": 5e-3}, "checkpoint": {}, "eval": {}, "logging": {"progress": "lines"}}
    return save_config(TMP, name, cfg, over)


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_eval_loss(out):
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in l]
    return evals[-1]["eval_loss"], evals[-1]["eval_tokens"]


def main():
    tiny_lm.make_model_dir(TMP / "model", seed=4)
    words = tiny_lm.corpus(60, 8)
    # Alpaca records, each line written its own way (key order, spacing, an extra key), so that "as they were" shows.
    lines = []
    for i in range(0, 48, 3):
        r = {"instruction": words[i], "output": words[i + 1]}
        if i % 2:
            r["input"] = words[i + 2]
        lines.append(json.dumps(r, indent=None, separators=(",", ":") if i % 4 else (", ", ": ")) if i % 5 else
                     json.dumps({"id": i, **dict(reversed(list(r.items())))}))
    (TMP / "train.jsonl").write_text("\n".join(lines) + "\n")

    p = run("--config", write_config("run"))
    check(p.returncode == 0, f"a run with data.eval_fraction 0.25 exits 0 ({p.returncode}) {p.stderr[-400:]}")
    held = (TMP / "run" / "eval.jsonl").read_text().splitlines() if (TMP / "run" / "eval.jsonl").exists() else []
    check(len(held) == 4 and all(l in lines for l in held) and held == [l for l in lines if l in held],
          f"output_dir/eval.jsonl holds the 4 held-out records as they were, in file order ({len(held)} lines)")
    logged, tokens = logged_eval_loss(TMP / "run")
    p = run("eval", "--model", TMP / "model", "--adapter", TMP / "run" / "adapter", "--data", TMP / "run" / "eval.jsonl",
            "--max-seq-len", 256)
    ours = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] == tokens and abs(ours["loss"] - logged) <= 1e-4 * logged,
          f"eval on output_dir/eval.jsonl recomputes the logged eval_loss: {ours.get('loss')} vs {logged} over "
          f"{ours.get('tokens')} / {tokens} target tokens (exit {p.returncode}) {p.stderr[-300:]}")

    # eval --config takes the model, the record options and max_seq_len from the run's config (the resolved one too).
    for cfg in (TMP / "run.json", TMP / "run" / "config.resolved.json"):
        p = run("eval", "--config", cfg, "--adapter", TMP / "run" / "adapter", "--data", TMP / "run" / "eval.jsonl")
        ours = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
        check(p.returncode == 0 and ours["tokens"] == tokens and abs(ours["loss"] - logged) <= 1e-4 * logged,
              f"eval --config {cfg.name} recomputes it too: {ours.get('loss')} (exit {p.returncode}) {p.stderr[-300:]}")
    p = run("eval", "--config", TMP / "run.json", "--adapter", TMP / "run" / "adapter", "--data",
            TMP / "run" / "eval.jsonl", "--train-on-prompt")
    ours = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] > 4 * tokens,
          f"an option given on the command line wins over --config's key (--train-on-prompt: {ours.get('tokens')} tokens)")
    p = run("eval", "--config", TMP / "run.json", "--set", "data.train_on_prompt=true", "--adapter", TMP / "run" / "adapter",
            "--data", TMP / "run" / "eval.jsonl", "--no-train-on-prompt")
    ours = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    check(p.returncode == 0 and ours["tokens"] == tokens, "--no-train-on-prompt turns off the config's train_on_prompt")
    # eval --config takes logging.level too (eval's one debug line: the tensors loaded); --log-level, before or
    # after `eval`, wins over it.
    args = ("--config", TMP / "run.json", "--set", "logging.level=debug", "--adapter", TMP / "run" / "adapter", "--data",
            TMP / "run" / "eval.jsonl")
    loud = run("eval", *args)
    quiet = [run(*before, "eval", *args, *after) for before, after in ((("--log-level", "info"), ()), ((), ("--log-level", "info")))]
    check(loud.returncode == 0 and "[debug]" in loud.stderr and all(q.returncode == 0 and "[debug]" not in q.stderr for q in quiet),
          f"eval --config honours logging.level=debug (debug lines: {loud.stderr.count('[debug]')}), and --log-level info "
          f"wins over it ({[q.stderr.count('[debug]') for q in quiet]})")
    p = run("eval", "--data", TMP / "run" / "eval.jsonl")
    check(p.returncode == 2 and "--model" in p.stderr, f"eval without --model or --config is a usage error ({p.returncode})")

    # data.eval_file: its records are the held-out split, written as they are.
    (TMP / "heldout.jsonl").write_text("\n".join(lines[:3]) + "\n")
    p = run("--config", write_config("file"), "--set", "data.eval_fraction=0", "--set",
            f"data.eval_file={TMP / 'heldout.jsonl'}")
    written = (TMP / "file" / "eval.jsonl").read_text().splitlines() if (TMP / "file" / "eval.jsonl").exists() else []
    check(p.returncode == 0 and written == lines[:3], f"with data.eval_file its records are written (exit {p.returncode})")

    # No held-out data: no eval.jsonl.
    p = run("--config", write_config("none"), "--set", "data.eval_fraction=0")
    check(p.returncode == 0 and not (TMP / "none" / "eval.jsonl").exists(), "without held-out data no eval.jsonl is written")

    # eval.jsonl belongs to the run: a new run into a directory holding only it (what a run leaves before its first
    # checkpoint) replaces it, naming it; beside a checkpoint it is refused with the rest.
    (TMP / "only").mkdir()
    (TMP / "only" / "eval.jsonl").write_text(lines[0] + "\n")
    p = run("--config", write_config("only"))
    check(p.returncode == 0 and "eval.jsonl" in p.stderr and "replaced by this run" in p.stderr,
          f"an output_dir with only an earlier eval.jsonl is replaced naming it (exit {p.returncode})")
    (TMP / "only" / "checkpoint-9").mkdir()
    p = run("--config", write_config("only"))
    check(p.returncode == 3 and "eval.jsonl" in p.stderr and "checkpoint-9" in p.stderr,
          f"... beside a checkpoint it is refused, named with it (exit {p.returncode})")
    finish("held-out split checks")


if __name__ == "__main__":
    main()
