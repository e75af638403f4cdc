"""The end-to-end scripts' bookkeeping: check() prints one line per claim (ok / FAILED) and remembers the
failures; finish() ends the script non-zero when any claim failed, else prints one line that all passed;
save_config() writes a run config with section__key overrides."""
import json
import sys

failures = []


def check(cond, what):
    print(("ok: " if cond else "FAILED: ") + what, flush=True)
    if not cond:
        failures.append(what)


def finish(what="checks"):
    if failures:
        sys.exit(f"{len(failures)} check(s) FAILED")
    print(f"all {what} passed", flush=True)


def save_config(directory, name, cfg, over):
    """Writes cfg, with each override section__key=value applied, to directory/name.json; returns that path."""
    for k, v in over.items():
        sec, key = k.split("__")
        cfg[sec][key] = v
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path
