"""Help texts show defaults and --log-level works after the subcommand too (issue 29)."""
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_help_"))


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def main():
    for cmd, needles in [([], ["--log-level", "=info"]),
                         (["eval"], ["--max-seq-len", "=2048", "--device TEXT=cpu", "--format", "=auto", "--quant",
                                     "=nf4", "--add-eos", "=true", "--log-level"]),
                         (["generate"], ["--max-new-tokens", "=128", "--temperature", "=0", "--top-p", "=1",
                                         "--format", "=text", "--log-level"]),
                         (["export"], ["--dtype", "=auto", "--quant", "=nf4", "--log-level"]),
                         (["bench"], ["--steps", "--log-level"]),
                         (["config"], ["--print", "--config", "--log-level"]),
                         (["plan"], ["--gpu-memory-gib", "--shape", "--host-gib", "--log-level"])]:
        p = run(*cmd, "--help")
        missing = [n for n in needles if n not in p.stdout]
        check(p.returncode == 0 and not missing, f"`{' '.join(cmd + ['--help'])}` shows the defaults: missing {missing}")

    tiny_lm.make_model_dir(TMP / "model", seed=1)
    tiny_lm.write_text_jsonl(TMP / "d.jsonl", 4, 2)
    args = ["--model", TMP / "model", "--data", TMP / "d.jsonl", "--max-seq-len", 4]
    p = run("eval", *args)
    check(p.returncode == 0 and "[warning]" in p.stderr, "eval warns about truncated records at the default level")
    p = run("eval", *args, "--log-level", "off")
    check(p.returncode == 0 and p.stderr == "", f"eval ... --log-level off (after the subcommand) silences it: {p.stderr!r}")
    p = run("eval", *args, "--log-level", "debug")
    check(p.returncode == 0 and "[debug]" in p.stderr, "eval ... --log-level debug shows debug lines")
    p = run("--log-level", "off", "eval", *args)
    check(p.returncode == 0 and p.stderr == "", "--log-level before the subcommand still works")
    p = run("eval", *args, "--log-level", "loud")
    check(p.returncode == 2 and "loud" in p.stderr, f"an unknown level is a usage error (exit {p.returncode})")
    # Training: --log-level, before or after `train`, wins over the config's logging.level (info).
    cfg = TMP / "run.json"
    cfg.write_text(json.dumps({"model": {"path": str(TMP / "model"), "device": "cpu"}, "lora": {"r": 2},
                               "data": {"train_file": str(TMP / "d.jsonl"), "max_seq_len": 16},
                               "train": {"steps": 1, "batch_size": 2}, "logging": {"progress": "lines"}}))
    for where in (["--log-level", "warn", "train"], ["train", "--log-level", "warn"]):
        out = TMP / ("t" + where[0])
        p = run(*where, "--config", cfg, "--set", f"output_dir={out}")
        check(p.returncode == 0 and "[info]" not in p.stderr,
              f"`{' '.join(where)}` silences training's info lines (exit {p.returncode}) {p.stderr[-300:]!r}")
    p = run("bench", "--model", TMP / "model", "--device", "cpu", "--seq", 16, "--steps", 1, "--warmup", 0,
            "--out", TMP / "bench", "--log-level", "error")
    check(p.returncode == 0 and "[info]" not in p.stderr, f"bench ... --log-level error too (exit {p.returncode}) {p.stderr[-300:]!r}")
    p = run("train", "--config", cfg, "--set", f"output_dir={TMP / 'tdefault'}")
    check(p.returncode == 0 and "[info]" in p.stderr, "without it, training logs at its config's level (info)")
    # Numbers: finite and in range, said in a short line (no range written out with the largest double).
    for value, words in (("inf", "finite number > 0"), ("nan", "finite number > 0"), ("0", "> 0"), ("x", "a number")):
        p = run("plan", "--shape", "llama-3.1-8b", "--gpu-memory-gib", value)
        check(p.returncode == 2 and words in p.stderr and len(p.stderr) < 300,
              f"plan --gpu-memory-gib {value}: a usage error saying '{words}' (exit {p.returncode}) {p.stderr.strip()!r}")
    p = run("generate", "--model", TMP / "model", "--prompt", "x", "--max-new-tokens", "-1")
    check(p.returncode == 2 and ">= 0" in p.stderr and len(p.stderr) < 300,
          f"generate --max-new-tokens -1: a usage error saying '>= 0' (exit {p.returncode}) {p.stderr.strip()!r}")
    finish("help and log-level checks")


if __name__ == "__main__":
    main()
