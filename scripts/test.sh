#!/usr/bin/env bash
# Installs what is needed, builds, and runs every CPU test (ctest -LE gpu). scripts/gpu-check.sh runs the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest -LE gpu --output-on-failure -j "${JOBS:-2}" --timeout 900
