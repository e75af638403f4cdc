#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA for sm_90 on all cores, make the oracle files, run every test
# (CPU and [gpu]), the benchmarks and the peers measured in the same run, and print a short table last.
# Usage (device tool, repo root): bash scripts/gpu-check.sh [tests|bench|all]   (default all)
# Peers: carry .peers and .peerscripts (../shared/peers/README.md); missing ones are reported, not faked.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[ -x /opt/torch/.venv/bin/python3 ] && export PATH=/opt/torch/.venv/bin:$PATH
PEERS=""; [ -d .peers ] && PEERS=$PWD/.peers
summary=$OUT/summary.txt; : >"$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
BUILD_DIR=build-gpu JOBS=$(nproc) bash scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90 2>&1 | tail -n 3 >"$OUT/build.log"
if [ ! -x build-gpu/qlora-train ]; then cat "$OUT/build.log"; note "BUILD FAILED"; exit 1; fi
note "build: $(( $(date +%s) - t0 )) s"

if [ "$MODE" != bench ]; then
  # bitsandbytes is not on the GPU image: the oracle generator finds it in the carried .peers.
  PYTHONPATH=${PEERS} python3 tests/oracles/generate.py --out build-gpu/tests/fixtures >"$OUT/oracles.log" 2>&1 \
    || { tail -n 20 "$OUT/oracles.log"; note "oracles: FAILED"; }
  (cd build-gpu && PYTHONPATH=${PEERS} ctest --output-on-failure -j 4 --timeout 900 -E oracles_generate) >"$OUT/ctest.log" 2>&1
  grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)|Exception" "$OUT/ctest.log" | tee -a "$summary"
  (cd build-gpu && ctest -L gpu --timeout 900 -E oracles_generate -V 2>&1 | grep -E "rel|cuda bf16|passed|failed" | tail -n 20) >>"$OUT/gpu_tests.log"
fi

if [ "$MODE" != tests ]; then
  for b in build-gpu/bench_*; do
    [ -x "$b" ] || continue
    note "== $(basename "$b")"
    "$b" 2>&1 | tee "$OUT/$(basename "$b").log" | tail -n 25 >>"$summary"
  done
  note "== trainer: QLoRA on a Llama-3.2-1B-shaped random model, 4 x 2048, bf16 (then HF + PEFT on the same shape)"
  QT_FIXTURES=$PWD/build-gpu/tests/fixtures python3 scripts/gpu_train_smoke.py build-gpu/qlora-train /tmp/qt_smoke 4 2048 12 \
    2>&1 | tee "$OUT/train_smoke.log" | grep -E '^\{|did not|exited' >>"$summary"
  if [ -d .peerscripts ]; then
    PEER_STEPS=6 python3 .peerscripts/hf_peft_baseline.py llama-3.2-1b 4 2048 1 2>&1 | tee "$OUT/peer_hf_peft.log" | grep '^{' >>"$summary"
  fi
  if [ -n "$PEERS" ] && [ -d .peerscripts ]; then
    P=$PWD/.peerscripts
    note "== peers: bitsandbytes dequantize_4bit"
    PYTHONPATH=$PEERS:$P python3 $P/bnb_dequant.py 2>&1 | tee "$OUT/peer_bnb.log" | grep '^{' >>"$summary"
    note "== peers: cut cross-entropy, liger, naive"
    PYTHONPATH=$PEERS:$P python3 $P/ce_peers.py 2>&1 | tee "$OUT/peer_ce.log" | grep '^{' >>"$summary"
  else
    note "peers: .peers/.peerscripts not carried; no peer figures in this run"
  fi
fi
echo; echo "==================== summary ===================="; cat "$summary"
