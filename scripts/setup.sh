#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine (no GPU needed): Debian's -dev packages,
# the torch==2.11.0 wheel (LibTorch: headers, libraries, CMake config) and the Python test oracles pinned in
# tests/oracles/requirements.txt. Idempotent and quick when everything is already there.
#   scripts/setup.sh          everything (what scripts/test.sh and CI need)
#   scripts/setup.sh --demo   only what building qlora-train needs: the Debian packages and torch (no oracles)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
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
REQ=tests/oracles/requirements.txt
if [ "$MODE" = --demo ]; then
  # The build needs LibTorch alone: the torch pin of the oracle set, nothing else.
  TORCH_PIN=$(grep -E '^torch==' "$REQ")
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${TORCH_PIN#torch==}')" 2>/dev/null ||
    "$PY" -m pip install -q "$TORCH_PIN"
  exit 0
fi
# The quick check compares every installed version with its pin (not only that the modules import): any
# difference, or a missing package, brings the environment to the pinned set. `kernels` is not in the set and is
# removed where an earlier install left it: bitsandbytes' CPU backend reaches for hub-hosted kernels through it.
if "$PY" -c "import importlib.metadata as m; m.version('kernels')" 2>/dev/null; then
  "$PY" -m pip uninstall -y -q kernels
fi
if ! "$PY" scripts/check_requirements.py "$REQ"; then
  # llama-cpp-python is built from its sdist (about 6 minutes on 2 cores the first time; pip keeps the wheel in its
  # cache): CPU only, for any x86-64 (no -march=native, so that a cached wheel runs on another machine), without
  # the server, examples, tests, libcurl or the multimodal library, none of which the tests use.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python -r "$REQ"
  "$PY" scripts/check_requirements.py "$REQ" --verbose
fi
