#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA for sm_90 on all cores, make the oracle files, run every test
# (CPU and [gpu]), the benchmarks and the peers measured in the same run, and print a short table last.
# Usage (device tool, repo root): bash scripts/gpu-check.sh [tests|gputests|bench|train|peers|all]   (default all)
#   tests: every test; gputests: the [gpu] ones only; bench: kernel benchmarks and their peers;
#   train: scripts/bench.py on our trainer alone (BENCH_ROWS), with a per-kernel profile of one step per row
#          (PROFILE_ROWS, and scripts/trace_summary.py's GPU time by op and shape); A/B of settings or builds: scripts/bench.py --ab;
#   (several, comma-separated: gputests,train)
#   attn: SDPA's attention kernels (flash, cuDNN, memory-efficient) at the 8B head shapes (scripts/attn_bench.py);
#   extra: FullyShard with one NCCL rank, a real CUDA out-of-memory, long contexts (scripts/gpu_extra_checks.py);
#   peers: scripts/bench.py with Unsloth and HF + bitsandbytes QLoRA (carry .usite, .peers, .peerscripts);
#          BENCH_ROWS / BENCH_PEERS pick rows and peers, e.g. the Qwen rows against Unsloth (scripts/peers/unsloth_qwen.py):
#          BENCH_ROWS=q2.5-7b-2x2048,q3-8b-2x2048 BENCH_PEERS=unsloth bash scripts/gpu-check.sh peers
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
BUILD_DIR=build-gpu JOBS=$(nproc) bash scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90 >"$OUT/build.log" 2>&1
build_rc=$?
if [ "$build_rc" != 0 ] || [ ! -x build-gpu/qlora-train ]; then
  grep -B 2 -A 12 -E "error|FAILED" "$OUT/build.log" | head -n 60; note "BUILD FAILED (exit $build_rc)"; exit 1
fi
note "build: $(( $(date +%s) - t0 )) s"

has() { [ "$MODE" = all ] || [[ ",$MODE," == *",$1,"* ]]; }  # MODE may list several: gputests,train
RUN_TESTS=0; has tests && RUN_TESTS=1
RUN_BENCH=0; has bench && RUN_BENCH=1
if has gputests && [ "$MODE" != all ]; then
  PYTHONPATH=${PEERS} python3 tests/oracles/generate.py --out build-gpu/tests/fixtures >"$OUT/oracles.log" 2>&1 \
    || { tail -n 20 "$OUT/oracles.log"; note "oracles: FAILED"; }
  (cd build-gpu && ctest -L gpu --output-on-failure --timeout 900 -E oracles_generate -j "${GPU_JOBS:-1}") >"$OUT/ctest.log" 2>&1
  grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)|Exception" "$OUT/ctest.log" | tee -a "$summary"
  RUN_TESTS=0
fi
if [ "$RUN_TESTS" = 1 ]; then
  # bitsandbytes is not on the GPU image: the oracle generator finds it in the carried .peers.
  PYTHONPATH=${PEERS} python3 tests/oracles/generate.py --out build-gpu/tests/fixtures >"$OUT/oracles.log" 2>&1 \
    || { tail -n 20 "$OUT/oracles.log"; note "oracles: FAILED"; }
  (cd build-gpu && PYTHONPATH=${PEERS} ctest --output-on-failure -j 4 --timeout 900 -E oracles_generate) >"$OUT/ctest.log" 2>&1
  grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)|Exception" "$OUT/ctest.log" | tee -a "$summary"
  (cd build-gpu && ctest -L gpu --timeout 900 -E oracles_generate -V 2>&1 | grep -E "rel|cuda bf16|passed|failed" | tail -n 20) >>"$OUT/gpu_tests.log"
fi

if has train; then
  note "== trainer alone (scripts/bench.py --peers none), rows ${BENCH_ROWS:-default}"
  python3 scripts/bench.py --peers none ${BENCH_ROWS:+--rows $BENCH_ROWS} --out "$OUT" ${BENCH_SET:-} 2>&1 | tee "$OUT/bench_train.log" | tail -n 8 >>"$summary"
  if [ -n "${PROFILE_ROWS:-}" ]; then
    for row in ${PROFILE_ROWS//,/ }; do
      QT_PROFILE_STEP=4 python3 scripts/bench.py --peers none --rows "$row" --steps 2 --warm 3 --work /tmp/qt_prof --out /tmp >/dev/null 2>&1
      f=$(ls /tmp/qt_prof/*/run/profile_kernels.txt 2>/dev/null | head -1)
      [ -n "$f" ] && { note "== profile $row"; head -n 22 "$f" | cut -c1-140 | tee -a "$summary" >/dev/null; }
      t=$(ls /tmp/qt_prof/*/run/profile_trace.json 2>/dev/null | head -1)
      [ -n "$t" ] && { note "== by op and shape, idle gaps: $row"; python3 scripts/trace_summary.py "$t" --top 25 2>&1 | cut -c1-160 | tee -a "$summary" >/dev/null; }
      rm -rf /tmp/qt_prof
    done
  fi
fi
if has attn; then
  note "== causal attention kernels at the 8B head shapes (scripts/attn_bench.py)"
  python3 scripts/attn_bench.py ${ATTN_SHAPES:-} 2>&1 | tee "$OUT/attn_bench.log" | grep -E '^\||^torch|^priority' >>"$summary"
fi
if has extra; then
  note "== FullyShard with one NCCL rank, a real out-of-memory, long contexts (scripts/gpu_extra_checks.py)"
  python3 scripts/gpu_extra_checks.py build-gpu/qlora-train /tmp/qt_extra "${EXTRA_CHECKS:-fsdp,oom,long}" 2>&1 | tee "$OUT/extra.log" | grep '^{' >>"$summary"
fi
if has peers; then
  note "== ours and the peers on the same machine (scripts/bench.py), rows ${BENCH_ROWS:-default}"
  python3 scripts/bench.py --peers "${BENCH_PEERS:-unsloth,hf_qlora}" ${BENCH_ROWS:+--rows $BENCH_ROWS} --out "$OUT" 2>&1 | tee "$OUT/bench_peers.log" | grep -E '^\||matrix rate' >>"$summary"
fi
if [ "$RUN_BENCH" = 1 ]; then
  for b in build-gpu/bench_*; do
    [ -x "$b" ] || continue
    note "== $(basename "$b")"
    "$b" 2>&1 | tee "$OUT/$(basename "$b").log" | tail -n 25 >>"$summary"
  done
  note "== trainer: QLoRA on a Llama-3.2-1B-shaped random model, 4 x 2048, bf16 (then HF + PEFT on the same shape)"
  QT_FIXTURES=$PWD/build-gpu/tests/fixtures python3 scripts/bench.py --smoke --smoke-shape 4x2048x12 --work /tmp/qt_smoke \
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
