"""The end-to-end scripts' bookkeeping: check() prints one line per claim (ok / FAILED) and remembers the
failures; finish() ends the script non-zero when any claim failed, else prints one line that all passed;
save_config() writes a run config with section__key overrides; tiny_cpu_config() and run_binary() are the small
CPU training run of the failure tests (out of memory, non-finite loss) and the binary run on it."""
import json
import os
import subprocess
import sys

failures = []


def check(cond, what):
    print(("ok: " if cond else "FAILED: ") + what, flush=True)
    if not cond:
        failures.append(what)


def finish(what="checks", more=()):
    """`more`: failures a script collected itself (printed here)."""
    for f in more:
        print("FAILED: " + f, flush=True)
    failures.extend(more)
    if failures:
        sys.exit(f"{len(failures)} check(s) FAILED")
    print(f"all {what} passed", flush=True)


def exit_case_failures(run, cases):
    """Runs each (args, exit code, needles) case through run(*args) (the binary); the failures: another exit code,
    or a message (stderr and stdout) lacking a needle."""
    out = []
    for args, code, needles in cases:
        p = run(*args)
        msg = p.stderr + p.stdout
        if p.returncode != code or any(n not in msg for n in needles):
            out.append(f"{args}: exit {p.returncode} (want {code}), message {msg!r} lacks {needles}")
        else:
            print(f"ok: exit {code}: {msg.strip().splitlines()[-1] if msg.strip() else ''}")
    return out


def save_config(directory, name, cfg, over):
    """Writes cfg, with each override section__key=value applied, to directory/name.json; returns that path."""
    for k, v in over.items():
        sec, key = k.split("__")
        cfg[sec][key] = v
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def tiny_cpu_config(tmp, name, train, optim, checkpoint, lora=None):
    """tmp/name.json: NF4 model tmp/model on the CPU, LoRA r 4 (and the keys of `lora`), packed 32-token rows of
    tmp/train.jsonl, output in tmp/name; train, optim and checkpoint are those sections."""
    cfg = {"output_dir": str(tmp / name), "model": {"path": str(tmp / "model"), "quant": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8, **(lora or {})},
           "data": {"train_file": str(tmp / "train.jsonl"), "format": "text", "max_seq_len": 32, "packing": True},
           "train": train, "optim": optim, "checkpoint": checkpoint, "logging": {"progress": "lines"}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_binary(binary, config, *extra, env=None):
    """The binary on a config (one OpenMP thread), output captured."""
    return subprocess.run([binary, "--config", str(config), *extra], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def ref_then_failing_run(binary, tmp, write_config, name, rows, env):
    """Writes the tiny model tmp/model and `rows` rows of text, runs write_config("ref") to the end (the run that
    never failed) and write_config(name) under env (a failure hook); returns that run, its stderr's lines and the
    last of them (printed)."""
    import tiny_lm  # (tests/oracles, on the scripts' path)
    tiny_lm.make_model_dir(tmp / "model", seed=5)
    tiny_lm.write_text_jsonl(tmp / "train.jsonl", rows, 21)
    p = run_binary(binary, write_config("ref"))
    if p.returncode != 0:
        sys.exit(f"reference run exited {p.returncode}:\n{p.stderr[-3000:]}")
    p = run_binary(binary, write_config(name), env=env)
    err = p.stderr.strip().splitlines()
    last = err[-1] if err else ""
    print("message:", last)
    return p, err, last
