"""The end-to-end scripts' bookkeeping: check() prints one line per claim (ok / FAILED) and remembers the
failures; finish() ends the script non-zero when any claim failed, else prints one line that all passed."""
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
