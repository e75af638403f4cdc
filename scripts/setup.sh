#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine (no GPU needed):
# Debian's -dev packages, the torch==2.11.0 wheel (LibTorch: headers, libraries, CMake config) and the
# Python test oracles. Idempotent and quick when everything is already there (pip's and ccache's caches).
set -euo pipefail
PKGS=(cmake ninja-build ccache g++ pkg-config libsentencepiece-dev nlohmann-json3-dev libspdlog-dev libcli11-dev
      catch2 libopenmpi-dev openmpi-bin)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
# Test oracles only: the trainer itself never runs Python.
PIPS=(torch==2.11.0 transformers safetensors sentencepiece tokenizers peft bitsandbytes numpy)
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib, sys
import torch
assert torch.__version__.startswith("2.11.0"), torch.__version__
for m in ["transformers", "safetensors", "sentencepiece", "tokenizers", "peft", "bitsandbytes", "numpy"]:
    importlib.import_module(m)
PYEOF
then
  "$PY" -m pip install -q "${PIPS[@]}"
fi
