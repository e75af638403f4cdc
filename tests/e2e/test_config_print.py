"""The resolved config (issue 29): `qlora-train config --print` prints every key with its default, and docs/CONFIG.md's
table lists exactly those keys with those defaults and types; every value the table lists for a key is accepted and
one it does not list is refused, naming the key. `config --print --config FILE --set k=v` is the config training
reads, and a run keeps the same JSON in output_dir/config.resolved.json, which --config reads back unchanged."""
import json, os, pathlib, re, subprocess, sys, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "oracles"))
import tiny_lm

from checks import check, finish
BIN = os.environ["QT_BINARY"]
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
TMP = pathlib.Path(tempfile.mkdtemp(prefix="qt_config_"))


def run(*args):
    return subprocess.run([BIN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def flatten(j, prefix=""):
    out = {}
    for k, v in j.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def doc_table():
    """{key: (type, default, allowed)} from docs/CONFIG.md's table; default None for *required*."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        key, typ, default, allowed, _ = cells
        rows[key.strip("`")] = (typ, None if default == "*required*" else json.loads(default.strip("`")), allowed)
    return rows


def enum_values(allowed):
    """The values of an "allowed" cell that lists only backticked JSON values, else None."""
    parts = [p.strip() for p in allowed.split(",")] if allowed else []
    if not parts or not all(re.fullmatch(r"`[^`]+`", p) for p in parts):
        return None
    return [json.loads(p.strip("`")) for p in parts]


TYPES = {"integer": (int,), "number": (int, float), "string": (str,), "boolean": (bool,), "list of strings": (list,),
         "list of numbers": (list,), "null": (type(None),)}


def type_ok(typ, value):
    kinds = [t.strip() for t in typ.split(" or ")]
    for k in kinds:
        if k not in TYPES:
            return False
    if isinstance(value, bool):
        return "boolean" in kinds
    return any(isinstance(value, TYPES[k]) for k in kinds)


def main():
    p = run("config", "--print")
    check(p.returncode == 0, f"config --print without --config prints the defaults (exit {p.returncode}) {p.stderr[-200:]}")
    printed = flatten(json.loads(p.stdout))
    table = doc_table()
    check(set(printed) == set(table), "docs/CONFIG.md lists exactly the keys config --print prints: missing from the "
          f"table {sorted(set(printed) - set(table))}, not in the code {sorted(set(table) - set(printed))}")
    wrong = {k: (printed[k], table[k][1]) for k in set(printed) & set(table) if printed[k] != table[k][1]}
    check(not wrong, f"and the same defaults (code, table): {wrong}")
    mistyped = {k: (table[k][0], printed[k]) for k in set(printed) & set(table)
                if printed[k] is not None and not type_ok(table[k][0], printed[k])}
    check(not mistyped, f"and each default has the table's type: {mistyped}")

    # Every listed value is accepted (and printed as given); an unlisted one is refused naming the key.
    base = TMP / "base.json"
    base.write_text(json.dumps({"output_dir": str(TMP / "out"), "model": {"path": str(TMP / "model")},
                                "data": {"train_file": str(TMP / "train.jsonl")}}))
    context = {"model.init": {"random": ["model.shape=llama-3.2-1b", "model.path=\"\""]},
               "data.chat_template": {"custom": ["data.chat_format.assistant_suffix=\"</s>\""]},
               "optim.decay_type": {v: ["optim.schedule=wsd"] for v in ("cosine", "linear", "1-sqrt")},
               "dpo.loss_type": {"exo_pair": ["dpo.label_smoothing=0.001"]}}
    refused, accepted = [], 0
    for key, (typ, _, allowed) in sorted(table.items()):
        values = enum_values(allowed)
        if values is None:
            continue
        for v in values:
            value = [v] if typ.startswith("list") else v
            extra = [a for s in context.get(key, {}).get(v, []) for a in ("--set", s)]
            p = run("config", "--print", "--config", base, "--set", f"{key}={json.dumps(value)}", *extra)
            if p.returncode != 0 or flatten(json.loads(p.stdout))[key] != value:
                refused.append(f"{key}={json.dumps(value)}: exit {p.returncode} {p.stderr.strip()[-150:]}")
            else:
                accepted += 1
        bogus = ["bogus-value"] if typ.startswith("list") else "bogus-value"
        p = run("config", "--print", "--config", base, "--set", f"{key}={json.dumps(bogus)}")
        if p.returncode != 3 or key not in p.stderr:
            refused.append(f"{key}=bogus-value: exit {p.returncode} (want 3 naming the key)")
    check(not refused and accepted > 40, f"the {accepted} values the table lists are accepted and unlisted ones refused: "
          f"{refused}")

    # config --print --config FILE: the config training reads; --config reads the printed JSON back unchanged.
    p = run("config", "--print", "--config", base, "--set", "optim.lr=1e-4", "--set", "lora.targets=all-linear")
    resolved = json.loads(p.stdout) if p.returncode == 0 else {}
    check(p.returncode == 0 and resolved["optim"]["lr"] == 1e-4 and len(resolved["lora"]["targets"]) == 7
          and resolved["train"]["memory"]["keep"] == "auto", f"config --print --config FILE --set applies the overrides "
          f"and fills the defaults (exit {p.returncode})")
    (TMP / "resolved.json").write_text(p.stdout)
    p = run("config", "--print", "--config", TMP / "resolved.json")
    check(p.returncode == 0 and json.loads(p.stdout) == resolved, "the printed config reads back unchanged")
    p = run("config", "--print", "--config", base, "--set", "lora.lora_alpha=16")
    check(p.returncode == 3 and "lora.alpha" in p.stderr, f"config --print checks the config as training does (exit {p.returncode})")
    p = run("config")
    check(p.returncode == 2 and "--print" in p.stderr, f"config without --print says what it does (exit {p.returncode})")

    # A run keeps its resolved config.
    tiny_lm.make_model_dir(TMP / "model", seed=5)
    tiny_lm.write_text_jsonl(TMP / "train.jsonl", 8, 21)
    run_cfg = TMP / "run.json"
    run_cfg.write_text(json.dumps({"output_dir": str(TMP / "run"), "model": {"path": str(TMP / "model"), "device": "cpu",
                                                                           "dtype": "fp32"},
                                   "lora": {"r": 4}, "data": {"train_file": str(TMP / "train.jsonl"), "max_seq_len": 32},
                                   "train": {"steps": 1, "batch_size": 2}, "logging": {"progress": "lines"}}))
    p = run("--config", run_cfg)
    kept = TMP / "run" / "config.resolved.json"
    want = json.loads(run("config", "--print", "--config", run_cfg).stdout)
    check(p.returncode == 0 and kept.exists() and json.loads(kept.read_text()) == want,
          f"output_dir/config.resolved.json holds what config --print prints for the run's config (exit {p.returncode})")
    ck = json.loads((TMP / "run" / "checkpoint-1" / "trainer_state.json").read_text()) \
        if (TMP / "run" / "checkpoint-1" / "trainer_state.json").exists() else {}
    check(ck.get("config") == want, "the checkpoint keeps the same resolved config")

    # A resume compares the resolved configs: a key written out at its default is no change, another value is.
    j = json.loads(run_cfg.read_text())
    j["train"]["steps"], j["checkpoint"] = 2, {"every": 1, "keep_last": 3}
    j["output_dir"] = str(TMP / "resume")
    run_cfg.write_text(json.dumps(j))
    p = run("--config", run_cfg)
    subprocess.run(["rm", "-rf", str(TMP / "resume" / "checkpoint-2"), str(TMP / "resume" / "adapter")])
    p = run("--config", run_cfg, "--resume", "auto", "--set", "lora.alpha=16", "--set", "lora.targets=all-linear")
    check(p.returncode == 0 and "resumed from" in p.stderr,
          f"a resume with defaults written out (lora.alpha 16, all-linear) is no change (exit {p.returncode}) "
          f"{p.stderr.strip()[-200:]}")
    p = run("--config", run_cfg, "--resume", str(TMP / "resume" / "checkpoint-1"), "--set", "lora.alpha=8")
    check(p.returncode == 6 and "lora.alpha (16.0 -> 8.0)" in p.stderr,
          f"another value is refused naming the key (exit {p.returncode}) {p.stderr.strip()[-200:]}")
    finish("config checks")


if __name__ == "__main__":
    main()
