#!/usr/bin/env bash
# Rebuilds the demo's shipped base model (configs/demo/base) from scratch: generates the data and a random
# initial model (scripts/make_demo_assets.py), then pretrains every weight with qlora-train itself
# (configs/demo-pretrain.json, full fine-tuning on "Repeat the digits" chat records). About a minute on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/make_demo_assets.py
rm -rf out/demo-pretrain
./build/qlora-train --config configs/demo-pretrain.json
rm -rf configs/demo/base
cp -r out/demo-pretrain/model configs/demo/base
