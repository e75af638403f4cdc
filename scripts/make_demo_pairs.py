"""configs/demo/task_pairs.jsonl: the demo task's training records as preference pairs for configs/demo-dpo.json
(DPO on the demo's base): each chat record's prompt, its answer as the chosen completion, and as the rejected one a
wrong answer a model of the task makes (the digits unchanged, shifted by two, or shifted down by one). Deterministic.

    python3 scripts/make_demo_pairs.py [--check]   # --check: exit 1 if the committed file differs"""
import argparse, json, pathlib, random, sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo"


def pairs_text():
    rng = random.Random(3)
    out = []
    for line in (ROOT / "task_train.jsonl").read_text().splitlines():
        user, answer = json.loads(line)["messages"]
        digits = user["content"].rsplit(": ", 1)[1]
        wrong = rng.choice([digits, "".join(str((int(c) + 2) % 10) for c in digits),
                            "".join(str((int(c) - 1) % 10) for c in digits)])
        out.append(json.dumps({"prompt": [user], "chosen": [answer],
                               "rejected": [{"role": "assistant", "content": wrong}]}) + "\n")
    return "".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text, path = pairs_text(), ROOT / "task_pairs.jsonl"
    if args.check:
        sys.exit(0 if path.read_text() == text else 1)
    path.write_text(text)


if __name__ == "__main__":
    main()
