#!/usr/bin/env bash
# Configures and builds into ${BUILD_DIR:-build}. CUDA kernels are compiled when nvcc is found. BUILD_TARGET names
# one target to build (scripts/demo.sh: qlora-train alone), else everything (the tests and benchmarks too).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
# Sources use a precompiled header; ccache caches such compilations only with these sloppiness settings.
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_BASEDIR=$PWD
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >"$BUILD_DIR.cmake.log" 2>&1 || {
  cat "$BUILD_DIR.cmake.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" ${BUILD_TARGET:+--target "$BUILD_TARGET"}
