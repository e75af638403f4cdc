#!/usr/bin/env bash
# Trains the demo config for 6 steps on the CPU with two builds of qlora-train, in several plan variants, and
# compares the adapters byte for byte: a refactoring that changes no arithmetic leaves them identical.
# Usage: scripts/same_adapters.sh OLD_BINARY NEW_BINARY [WORK_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 work=${3:-/tmp/qt_same_adapters}
variants=("default|"
          "keep_residual|--set train.memory.keep=residual --set train.memory.keep_dequantized=true"
          "mlp_chunks|--set train.memory.mlp_chunk_tokens=100 --set train.memory.keep_dequantized=false"
          "no_checkpointing|--set train.memory.checkpointing=false"
          "dora|--set lora.use_dora=true"
          "dropout|--set lora.dropout=0.1")
status=0
for v in "${variants[@]}"; do
  name=${v%%|*} args=${v#*|}
  for side in old new; do
    bin=$old; [ $side = new ] && bin=$new
    rm -rf "$work/$name-$side"
    # shellcheck disable=SC2086
    if ! "$bin" --config configs/demo.json --set output_dir="$work/$name-$side" --set train.steps=6 \
         --set eval.max_examples=4 $args >"$work/$name-$side.log" 2>&1; then
      echo "$name: the $side build failed (see $work/$name-$side.log)"; status=1; continue 2
    fi
  done
  if cmp -s "$work/$name-old/adapter/adapter_model.safetensors" "$work/$name-new/adapter/adapter_model.safetensors"; then
    echo "$name: identical adapters"
  else
    echo "$name: the adapters DIFFER"; status=1
  fi
done
exit $status
