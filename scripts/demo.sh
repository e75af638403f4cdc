#!/usr/bin/env bash
# The demo: installs what is needed, builds, then QLoRA-fine-tunes the small base shipped in configs/demo/base
# (pretrained by qlora-train itself, scripts/build_demo_base.sh) on "Shift every digit by one" and prints the
# held-out exact-match accuracy of greedy generations before and after. Nothing is downloaded; ~15 s of training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --demo        # the Debian packages and torch; the Python test oracles are not needed here
BUILD_TARGET=qlora-train bash scripts/build.sh   # the trainer alone, not the tests and benchmarks
./build/qlora-train --config configs/demo.json --overwrite-output-dir   # a rerun replaces the last demo run
