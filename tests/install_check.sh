#!/bin/sh
# `cmake --install BUILD --prefix PREFIX` into a fresh prefix, then, without LD_LIBRARY_PATH (the RPATH must find
# LibTorch) and from the installed share directory (configs name their assets relative to it): --version, and two
# steps of the demo config (QLoRA on the demo base, held-out exact match on 4 prompts) writing an adapter.
set -eu
BUILD=$1
PREFIX=$2
CMAKE=${3:-cmake}
rm -rf "$PREFIX"
"$CMAKE" --install "$BUILD" --prefix "$PREFIX" >/dev/null
test -x "$PREFIX/bin/qlora-train"
test -f "$PREFIX/share/qlora-train/configs/demo.json"
test -d "$PREFIX/share/qlora-train/configs/demo/base"
env -u LD_LIBRARY_PATH "$PREFIX/bin/qlora-train" --version
cd "$PREFIX/share/qlora-train"
env -u LD_LIBRARY_PATH OMP_NUM_THREADS=1 "$PREFIX/bin/qlora-train" --config configs/demo.json \
  --set output_dir="$PREFIX/run" --set train.steps=2 --set eval.max_examples=4 --set model.device=cpu \
  --set logging.progress=lines
test -f "$PREFIX/run/adapter/adapter_model.safetensors"
test -f "$PREFIX/run/adapter/adapter_config.json"
echo "install into $PREFIX runs"
