"""Exits 0 when the Python environment holds exactly the versions pinned in a requirements file (lines
`name==version`; comments and blank lines skipped) and none of the packages listed in FORBIDDEN; else names each
difference (with --verbose, or always on stderr when asked by setup.sh's second call) and exits 1."""
import importlib.metadata as md
import re
import sys

# Not in the pinned set and harmful when present: bitsandbytes' CPU backend fetches hub-hosted kernels through it.
FORBIDDEN = ["kernels"]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    path, verbose = sys.argv[1], "--verbose" in sys.argv
    wrong = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, want = line.partition("==")
        try:
            have = md.version(norm(name))
        except md.PackageNotFoundError:
            have = None
        if have != want:
            wrong.append(f"{name}: pinned {want}, installed {have or 'none'}")
    for name in FORBIDDEN:
        try:
            wrong.append(f"{name}: installed {md.version(name)}, must be absent")
        except md.PackageNotFoundError:
            pass
    if wrong and verbose:
        print(f"{path}: the Python environment differs from the pins:\n  " + "\n  ".join(wrong), file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
