#!/usr/bin/env bash
# The demo: installs what is needed, builds, makes a small LLaMA model directory (random weights, a
# sentencepiece tokenizer trained here) and a jsonl file, and runs `qlora-train eval` on them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
python3 tests/oracles/tiny_lm.py --out out/demo >/dev/null 2>&1
./build/qlora-train eval --model out/demo/model --data out/demo/eval.jsonl
