#!/usr/bin/env bash
# The device calls that issues 26 and 27 wait on (docs/PERFORMANCE.md, "The next calls"), kept in the tree so that
# a session that finds a GPU runs them as written (untracked call scripts were lost with the machine twice).
# Usage (device tool, repo root): OUT=$OUT bash scripts/next_gpu_calls.sh 1|2|3|4|5|6|7|8|9|10|11|13|14|15|16|17|18|19|20|21|22|23|24|25|26|27|28|29|31|33|34|36|37|38|39|40
#   1: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, every [gpu] test, the allocator's history of
#      8B 1 x 117,760 at 22.3 GiB (where the 1 H a token the footprint model misses is held: memory_history.py).
#   2: carry [".peers", ".usite", ".peerscripts"]: build, 8B 2 x 2048 at 24 GiB against Unsloth's modes 0 and 1
#      and at 80 GiB against its mode 0 (its fastest where memory allows; issue 27's table), each its own process.
#   4: carry [".peers", ".usite", ".peerscripts"]: build, 8B 1 x 8192 whole-document and packed (documents of median
#      330 tokens) at 80 GiB against Unsloth's mode 0 (issue 27's table: its packed row against Unsloth's fastest);
#      then 8B 2 x 2048 at 80 GiB with cuBLASLt preferred for the base GEMMs against cuBLAS (TORCH_BLAS_PREFER_CUBLASLT,
#      read by ATen at start; the base GEMMs ran at 710-771 TFLOP/s of the 790 the bench measures), two rounds.
#   5: carry [".peers", ".peerscripts"]: build, issue 27's hand search (the plan picked against the 3 fastest other
#      plans that fit, 8B 2 x 2048 at 24 and 80 GiB: the 3% target).
#   7: carry [".peers", ".peerscripts"]: build, LoRA dropout's cost (0.05 against none at 80 GiB, two rounds: the
#      cost model's BW_elem is an estimate).
#   8: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, the [lora] and [fused_ops] [gpu] tests, the
#      input gradients' LoRA terms inside the base GEMMs against their own GEMMs (QT_LORA_GRAD_GEMM=0), two rounds.
#   Several calls in one command: SUMMARY=s6.txt bash scripts/next_gpu_calls.sh 6; SUMMARY=s7.txt ... 7
#   9: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, the [fused_ops] and [lora] [gpu] tests, LoRA
#      dropout 0.05 through the counter-based mask kernels against at::dropout's masks (QT_LORA_DROPOUT_KERNELS=0) and
#      against no dropout, 8B 2 x 2048 at 80 GiB, two rounds; then one profiled step with dropout (the kernels' time).
#   10: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, the [fused_ops] and [lora] [gpu] tests (the
#      dropout recomputation test and scaled_copies' among them, not yet run on a GPU), steps overlapped against read
#      back one by one (QT_OVERLAP_STEPS=0) and the LoRA factors refreshed in one launch against remade one by one
#      (QT_LORA_FACTOR_REFRESH=0), 8B 2 x 2048 at 80 GiB, two rounds; then call 6 in the same command for the profile: SUMMARY=s10.txt bash scripts/next_gpu_calls.sh 10; SUMMARY=s6.txt bash scripts/next_gpu_calls.sh 6
#   11: no carry: build, the residual add and RMSNorm in one kernel against apart (QT_FUSED_ADD_NORM=0), 8B 2 x 2048
#      at 80 GiB, two rounds (its [gpu] test runs in call 10's [fused_ops] tests); then call 6 in the same command:
#      SUMMARY=s11.txt bash scripts/next_gpu_calls.sh 11; SUMMARY=s6.txt bash scripts/next_gpu_calls.sh 6
#   6: no carry: build, two profiled steps of 8B 2 x 2048 (another row: PROF_ROW="--shape llama-3.2-1b --batch 4
#      --seq 2048") without checkpointing on the whole GPU (QT_PROFILE_STEP=4,
#      QT_PROFILE_STEPS=2: the host's work between two steps, where the GPU waits, is in the trace;
#      scripts/trace_summary.py): the time by op, and by kernel name for LoRA's, cuDNN attention's (its backward's
#      three kernels apart: the grouped K / V's reduction over query heads among them), RoPE's, SwiGLU's and the norms'.
#   12: the seventeenth session's LoRA GEMM kernels (ran in the eighteenth); 13 replaces it.
#   13: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, the [fused_ops] and [lora] [gpu] tests, bench_lora_gemm
#      (each kernel at 1, 2, 4 and 8 CTAs a cluster), the projection kernel alone, the gradients' alone and both against
#      ATen's GEMMs, 8B 2 x 2048 at 80 GiB, three rounds; then call 6 with the kernels on (their in-model times):
#      SUMMARY=s13.txt bash scripts/next_gpu_calls.sh 13; QT_LORA_GEMM_KERNELS=1 SUMMARY=s6.txt bash scripts/next_gpu_calls.sh 6
#   14: carry [".peers", ".peerscripts"]: build, 8B 2 x 2048 at 80 GiB, ours alone (MFU at the run's own matrix rate).
#   15: carry [".peers", ".usite", ".peerscripts", "build/tests/fixtures"]: build, the [fused_ops] and [lora] [gpu] tests
#      (RoPE's q / k / v in one launch), 8B 1 x 8192 whole and packed at 80 GiB against Unsloth 0 (call 4's first half);
#      then call 6 for the profile: SUMMARY=s15.txt bash scripts/next_gpu_calls.sh 15; SUMMARY=s6.txt ... 6
#   16: carry as 15: build, the [fused_ops] and [lora] [gpu] tests (RoPE's kernel a token a CTA), 1B 4 x 2048 at 80 GiB
#      against Unsloth 0; then call 6 for the profile (RoPE's time).
#   17: carry build/tests/fixtures/lora, data and dora: build, the [fused_ops] and [lora] [gpu] tests, bench_elementwise
#      (SwiGLU's flat grid-stride loop against the rows grid: where the rows grid wins, swiglu.cu's launches take it
#      by default; RoPE's one launch against its bytes); bench_fused_ce's frozen rows (the loss's token chunks of 512
#      to 2048 rows against the rule's 768: lm_head's GEMMs ran at 86% of the bench's rate in the 8B step);
#      bench_lora_gemm (cuBLAS on each LoRA product transposed beside the ATen path's orientation).
#   18: carry [".peers", ".peerscripts"]: build, the loss's logits in the plan's 2048-token tiles against the loss's own
#      rule (train.memory.loss_chunk_tokens=0), 1B 4 x 2048 and 8B 2 x 2048 at 80 GiB, two rounds.
#   19: carry [".peers", ".peerscripts", "build/tests/fixtures/lora", "build/tests/fixtures/data",
#      "build/tests/fixtures/dora"]: build, the [fused_ops] and [lora] [gpu] tests, bench_lora_gemm at the 1B block's
#      shapes (8192 tokens) and the 8B's (4096), each projection also as cuBLAS batched over 2, 4 and 8 K slices
#      (lora_project_split; where it wins, the LoRA nodes take it by default); the [fused_ce] [gpu] tests; bench_fused_ce's frozen rows at the 8B step's 4096 tokens,
#      with 4096-token tiles and with the tile kernel on its persistent grid (one CTA an SM: where it wins, the
#      default); in the step, that grid (QT_CE_RESIDENT_TILES=1), the 4-slice x A^T (QT_LORA_PROJECT_SPLIT=4) and
#      flash attention at head_dim 64 against none of them, 1B 4 x 2048 at 80 GiB, two rounds (within 600 s: run the
#      call alone).
#   20: carry as 19: build, the [fused_ops] and [lora] [gpu] tests; in the step, LoRA's gradients' kernel on the narrow
#      nodes only (QT_LORA_GEMM_KERNELS=narrow: q / k / v and o_proj, where call 19's bench_lora_gemm ran it 1.1-2.3x
#      cuBLAS), on every node (grads) and the loss's persistent tile grid (QT_CE_RESIDENT_TILES=1) against none of
#      them, 8B 2 x 2048 at 80 GiB, three rounds; then base / narrow / resident at 1B 4 x 2048, three rounds.
#   21: carry [".peers", ".peerscripts", "build/tests/fixtures"]: build, every [gpu] test (a linear's base GEMM
#      accumulating onto its rank-r term, the default since the twenty-first session, among them); in the step, that
#      order against the addmm after the base GEMM (QT_LORA_ADD_AFTER=1), 8B 2 x 2048 (two rounds) and 1B 4 x 2048
#      (three) at 80 GiB.
#   22: carry [".peers", ".usite", ".peerscripts"]: build, issue 27's 8B 1 x 32768 row (not measured since the plan
#      chooses for speed): at 24 GiB against Unsloth's modes u and 1, at 80 GiB against 0, u and 1 (its best that
#      completes), each its own process.
#   23: carry [".peers", ".peerscripts"]: build, issue 27's hand search on the rows it has not covered (only 8B
#      2 x 2048 so far): 1B 4 x 2048 and 8B 1 x 8192 at 24 and 80 GiB, the plan picked against the 3 fastest others.
#   24: no carry (WITH_TESTS=1: carry build/tests/fixtures, and every [gpu] test runs after): build, bench_gemm_algos
#      (the trainer's base GEMMs through ATen against each candidate of cuBLASLt's heuristic, timed: whether GEMMs picked
#      by measurement reach nearer the 8192^3 rate) and bench_nf4_dequant --overlap=4096 (the 24 GiB plan's
#      dequantization a linear ahead on a side stream against in turn, 8 blocks of the 8B forward linears).
#   25: carry build/tests/fixtures: build, every [gpu] test (the tuned GEMM's, and 21's counter check), bench_gemm_algos
#      with the tuned GEMM's column (lib/kernels/tuned_gemm.h) and the candidates' bits.
#   26: no carry (or build/tests/fixtures/lora, data and dora: the [lora] and [fused_ops] [gpu] tests first): build, in the
#      step the tuned GEMMs against ATen's (QT_GEMM_TUNE=0): 8B 2 x 2048 at 80 GiB, 1B 4 x 2048 at 80, 8B 2 x 2048 at 24
#      (two rounds each).
#   27: no carry: build, bench_gemm_algos at 8B with 200 calls a timing (the candidates' leads under sustained load),
#      then 8B 2 x 2048 on the whole GPU with the tuned GEMMs and without (QT_GEMM_TUNE=0), two rounds, the SM clock and
#      power sampled by nvidia-smi every 100 ms (the twenty-second session's hypothesis: the power cap, not the tile, sets
#      the 8B step's GEMM rate, so the tuner's isolated gains vanish there).
#   28: carry [".peers", ".peerscripts"]: build, the allocator's history of 8B 1 x 32768 at 24 GiB (the footprint model
#      over-predicted it by 3.4 GiB, 80 GiB's by 4.2, until the blocks without checkpointing and the recomputation were
#      taken as never alive together: whether the plan that fix picks, 2 blocks without, peaks where predicted), then
#      the hand search on that row (NO_HISTORY=1: the hand search alone).
#   29: carry [".peers", ".peerscripts"]: build, the hand search on 8B 1 x 32768 at 80 GiB and the packed row at 24
#      and 80 GiB.
#   31: carry [".peers", ".usite", ".peerscripts"]: build, 8B 1 x 32768 at 80 and 24 GiB and 8B 1 x 8192 at 24 GiB
#      against Unsloth, ours without the gate / up output kept beside.
#   33: carry [".peers", ".usite", ".peerscripts", "build/tests/fixtures/lora", "build/tests/fixtures/data",
#      "build/tests/fixtures/dora", "build/tests/fixtures/nf4"]: build, the [lora] and [fused_ops] [gpu] tests (packed
#      rows keeping the gate / up output among them), 8B 1 x 32768 at 24 GiB against Unsloth's 1 and ours without the
#      gate / up output kept: what the twenty-third session left unrun.
#   34: carry as 33: build, 8B 1 x 32768 at 80 GiB with the gate / up output kept and without, the [lora] and
#      [fused_ops] [gpu] tests, Unsloth's 1 (ran in the twenty-third session).
#   36: carry as 33: build, the [lora] and [fused_ops] [gpu] tests (gate / up outputs offloaded to the host and packed
#      rows keeping theirs among them), 8B 1 x 32768 at 24 GiB: the plan (gate / up outputs offloaded) against none and
#      14 offloaded (gate_up_offloaded_blocks=0 / 14), one round, then Unsloth's 1 on that row.
#   38: carry [".peers", ".usite", ".peerscripts"]: build, 8B 1 x 32768 at 24 GiB after the PCIe refit: the plan against
#      none and 14 offloaded, one round, then Unsloth's 1 (36 again, without the tests).
#   47: carry ["build/tests/fixtures"]: build, the e2e [gpu] scripts test_fp16_gpu.py (fp16 loss scaling through its
#      overflow path on CUDA) and test_eval_gpu.py (about 120 s); with 46 in the same command for every [gpu] test:
#      SUMMARY=s46.txt bash scripts/next_gpu_calls.sh 46; SUMMARY=s47.txt bash scripts/next_gpu_calls.sh 47
#   46: carry ["build/tests/fixtures"]: build, every [gpu] test of qt_tests (about 170 s).
#   59 (ran in the thirty-eighth session, with the KTO demo on CUDA): carry ["build/tests/fixtures"]: build, the [generate] [gpu] tests, a warm-up
#      process, bench --generate 8B and 1B by default (graphs), eager and forward_cached; the demo's exact match on CUDA.
#   Next: 57 on an H200 (issue 27's table on its own machine). Before timing generation again, warm up each shape:
#   a warm-up process helps only its own shape (call 59: the first 8B process after a 1B warm-up ran cold).
#   62 (ran twice in the thirty-eighth session): carry ["build/tests/fixtures"]: build, the [dpo] tests, KTO against DPO at 8B (random NF4
#      weights, the demo's pairs, 2 rows of 4,096 tokens a step): KTO's step about 3/4 of DPO's (its pass with gradient
#      over the records alone), about 250 s.
#   63: carry ["build/tests/fixtures"]: build, KTO's held-out evaluation on CUDA (the KTO demo with a tenth held out,
#      then eval --config of its adapter); about 60 s with the build.
#   64: carry ["build/tests/fixtures"]: build, the [train] [gpu] tests (8-bit AdamW's kernel against its CPU loop, bit
#      for bit), then 8B 2 x 2048 with optim adamw against adamw_8bit, LoRA alone and with embed_tokens and lm_head
#      trained in full (step time and allocator peak), and that at a 24 GiB budget; about 400 s. Next session: SUMMARY=s63.txt ... 63; 64 after.
#   60: call 59 in less device time: no forward_cached runs, no SFT demo. 61: the [generate] [gpu] and [dpo] tests and
#      the CPO / ORPO demo runs on CUDA alone (about 150 s with the build).
#   58 (ran in the thirty-seventh session): as 59 without the warm-up, the default then eager.
#   56 (ran in the thirty-seventh session): carry ["build/tests/fixtures"]: build, the [generate] [gpu] tests (the CUDA graph
#      of the decoding steps, opt-in until they pass), bench --generate 8B / 16,384 with QT_GENERATE_GRAPHS=1, eager
#      and 0, the [dpo] tests, DPO against SFT at 8B (the plan's dpo_reference term; exact match in a training
#      process), 1B generation. About 550 s; on an H200 then 57: carry [".peers", ".usite", ".peerscripts"]: 8B
#      2 x 2048 at 80 GiB against Unsloth 0 (issue 27 on its own machine).
#   52: carry ["build/tests/fixtures"]: build, the [generate] [gpu] tests, bench --generate at 8B / 16,384 (about 170 s).
#   51: carry ["build/tests/fixtures"]: build, the [generate] [gpu] tests, then 50's bench --generate rows (generation
#      no longer times GEMM problems).
#   50: carry ["build/tests/fixtures"]: build, every [gpu] test (the cached forward's among them), then bench
#      --generate on the 8B (batch_tokens 4096 and 16384) and 1B shapes: 100 prompts of median 200 tokens, 32 new.
#   48: carry [".peers", ".usite", ".peerscripts"]: build, issue 27's 48 GiB column (never run before): 8B 1 x 8192
#      whole-document and packed (median 330) against Unsloth's 0, the rest of the GPU held by the holder process.
#   49: carry as 48: build, the 48 GiB column's 8B 1 x 32768 against Unsloth's 1 (its 0 ran out of memory at 80 GiB,
#      its u ran no faster than 1), then 8B 2 x 2048 against its 0 (the plan the 80 GiB budget picks needs 38 GiB).
#   45: no carry: build, 8B 1 x 32768 on the whole GPU (the 80 GiB plan) with the GPU's clocks, power, temperature and
#      throttle reasons sampled each second, then one profiled step (trace_summary.py): why calls 37 and 43's machines
#      ran the 32k row 1.7x slower than others with a 55 GB/s host link (about 400 s). Compare with a machine that runs
#      it at its usual rate (about 8,750 tok/s, 3.74 s a step).
#   44: no carry: build, the [nf4_gemm] [gpu] tests alone (about 130 s).
#   43: carry [".peers", ".peerscripts"]: build, the [nf4_gemm] [gpu] tests, the hand search on the packed row at 24 and
#      80 GiB (3 others) and on 8B 1 x 32768 at 80 GiB (2 others): 29 in about 560 s.
#   41: no carry: build, the fused NF4 GEMM's [gpu] tests ([nf4_gemm]: the kernel's and the model's with it), bench_nf4_gemm
#      (the fused kernel against the grouped dequantization + cuBLAS, and cuBLAS alone, at the 8B and 1B projections;
#      NF4_GEMM_ONLY=SUBSTRING; every variant's column and the fastest with right values), variant 11's test and bench
#      column apart (its own timeouts), then QT_NF4_GEMM=1 with
#      QT_NF4_GEMM_VARIANT=NF4_VARIANT (default 8) against the default at 8B 2 x 2048 / 24 GiB, 2 rounds (NO_AB=1: not;
#      about 110 s with NO_AB=1, about 350 s without).
#   40: carry [".peers", ".peerscripts"]: build, the host link probe's [plan][gpu] test, `plan` at 8B 1 x 32768 / 24 GiB
#      with the measured link, then 39's hand search (about 450 s in all; PROBE_ONLY=1: without the hand search).
#   39: carry [".peers", ".peerscripts"]: build, the hand search on 1B 4 x 2048 at 24 and 80 GiB and 8B 1 x 8192 at
#      80 GiB (what 23 covers beyond 37's 8k row at 24 GiB).
#   37: carry [".peers", ".peerscripts"]: build, the hand search on 8B 1 x 32768 at 24 GiB (the plan against the 3
#      fastest others, as 28's second half) and 8B 1 x 8192 at 24 GiB (23's 8k half).
#   3: carry [".peers", ".peerscripts"]: build, issue 26's context search at a fixed budget (bench.py --max-context
#      at 7.44 GiB free from the 47,232 tokens fit_table.py predicts for an 8 GB card, r=32).
# Calls 1-3 and most of 4 ran on an H100 in the thirteenth session, 5, 6, 8 and 2 in the fourteenth, 2, 6, 7 and 9 in
# the fifteenth, 10, 11 and 6 and 2's 80 GiB row in the sixteenth, 12 and 6 (H100) and 13 (H200) in the eighteenth
# (docs/PERFORMANCE.md); 2, 15, 16 and 6 ran on H100s in the nineteenth; 17, 5, 6 (1B), 18, 2, 16, 15 and 5 in the
# twentieth; 19 and 20 in the twenty-first; 24, 22, 25 and 26 (twice) in the twenty-second (21's counter check passed
# there in 25's [gpu] tests); 34 in the twenty-third; 36 in the twenty-fourth (33's tests with it); 38 and 37 in the
# twenty-fifth; 40, 41, 43 and 44 in the twenty-sixth (43 covered 29's hand search); 41 with NO_AB=1 twice in the
# twenty-seventh (variants 4 and 5). What is left: 41 with NO_AB=1 (variants 6-11, written after the twenty-seventh
# session's last call: their tests and bench columns; then, where the fastest variant beats dequantization + cuBLAS
# in the bench, 41 without NO_AB for the step), 45 (the slow 32k machines), 27; 2, 15 and 16 on an H200 where one comes (the issue's and the cost model's machine: its table and the memory-bound rate's refit
# there), 6 there; 2 and 15 again on an H100 for issue 27's table with the tuned GEMMs. Carry
# at most 64 MiB: with .usite, carry only build/tests/fixtures/lora, data and dora (the [lora] and [fused_ops] tests'
# fixtures).
# Before the calls, on this machine (../shared/peers/README.md; each session's checkout is fresh):
#   cp -r ../shared/peers .peerscripts && bash .peerscripts/get-peers.sh .peers && bash .peerscripts/get-unsloth.sh .usite
#   (cd build && python3 ../tests/oracles/generate.py --out tests/fixtures)     # the fixtures call 1 carries
# Everything but summary.txt goes back in logs.tgz (at most 8 files come back from $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL=${1:?usage: next_gpu_calls.sh 1|2|3|4|5|6|7|8|9|10|11|13|14|15|16|17|18|19}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT/logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[ -x /opt/torch/.venv/bin/python3 ] && export PATH=/opt/torch/.venv/bin:$PATH
summary=$OUT/${SUMMARY:-summary.txt}
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
pack() { tar -C "$OUT" -czf "$OUT/logs$CALL.tgz" logs 2>/dev/null && rm -rf "$OUT/logs"; }
trap pack EXIT
L=$OUT/logs

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
# The PCIe link and the pinned copy rates each way (1 GiB, best of 3): offloading rows depend on them, and one H100
# machine of the twenty-fifth session ran the 32k row's offloading plans 1.75x slower than another.
nvidia-smi --query-gpu=pcie.link.gen.current,pcie.link.width.current --format=csv,noheader | sed 's/^/pcie gen, width: /' |
  tee -a "$summary"
python3 - <<'PY' 2>&1 | tee -a "$summary"
import torch
d = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
h = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
for name, dst, src in (("device to host", h, d), ("host to device", d, h)):
    best = 1e9
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); dst.copy_(src, non_blocking=True); b.record(); b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    print(f"pinned copy {name}: {(1 << 30) / best / 1e9:.1f} GB/s")
PY
note "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) files changed"
t0=$(date +%s)
BUILD_DIR=build-gpu JOBS=$(nproc) bash scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90 >"$L/build.log" 2>&1
if [ ! -x build-gpu/qlora-train ]; then
  grep -B 2 -A 12 -E "error|FAILED" "$L/build.log" | head -n 60 | tee -a "$summary"
  note "BUILD FAILED"
  exit 1
fi
note "build: $(($(date +%s) - t0)) s"
BENCH="python3 scripts/bench.py --binary build-gpu/qlora-train --out $L"
R32="--set lora.r=32 --set lora.alpha=32"
# run LOG SECONDS BENCH-ARGS...: one bench.py run within SECONDS, its log in logs/LOG, its table into the summary.
run() {
  local log=$1 seconds=$2
  shift 2
  timeout "$seconds" $BENCH "$@" >"$L/$log" 2>&1
  grep -E '^\|' "$L/$log" >>"$summary"
}

# gpu_tests SECONDS FILTER: the Catch2 tests FILTER names on the carried fixtures (build/tests/fixtures), their count
# and any failure into the summary. lora_gpu_tests: the [lora] and [fused_ops] [gpu] tests; all_gpu_tests: every one.
gpu_tests() {
  mkdir -p build-gpu/tests
  rm -rf build-gpu/tests/fixtures && cp -r build/tests/fixtures build-gpu/tests/fixtures
  local t0
  t0=$(date +%s)
  (cd build-gpu && timeout "$1" ./tests/qt_tests "$2") >"$L/tests_gpu.log" 2>&1
  tail -n 4 "$L/tests_gpu.log" >>"$summary"
  grep -B 4 -A 12 "FAILED" "$L/tests_gpu.log" | head -n 60 >>"$summary"
  note "tests: $(($(date +%s) - t0)) s"
}
# dpo_against_sft: DPO's step against SFT's at 8B (random NF4 weights, the demo's tokenizer and task: its pairs for
# DPO, its chat records for SFT), rows of 4,096 tokens packed, 2 a step, the plan's default on the whole GPU.
dpo_against_sft() {  # objectives: "$1" (default "dpo sft")
  # The model: Llama 3.1 8B's shape with the demo's tokenizer (vocab 512), random NF4 weights.
  mkdir -p "$L/base8b" && cp configs/demo/base/tokenizer* configs/demo/base/generation_config.json "$L/base8b/"
  python3 - "$L/base8b/config.json" <<'PY'
import json, sys
c = json.load(open("configs/demo/base/config.json"))
c.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
         head_dim=128, max_position_embeddings=8192, tie_word_embeddings=False,
         rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
json.dump(c, open(sys.argv[1], "w"), indent=1)
PY
  for obj in ${1:-dpo sft}; do
    # (SFT measures exact match on the demo's eval records before and after: generation inside a training process,
    # under the 8B plan, each batch's time)
    em='"eval": {}, '
    if [ $obj = dpo ] || [ $obj = kto ]; then
      data='"train_file": "configs/demo/task_pairs.jsonl", "format": "preference", "max_seq_len": 2048'
    else data='"train_file": "configs/demo/task_train.jsonl", "format": "chat", "max_seq_len": 4096'
      em='"eval": {"exact_match_file": "configs/demo/task_eval.jsonl", "max_examples": 100, "max_new_tokens": 8}, '; fi
    cat >"$L/$obj.json" <<JSON
{"output_dir": "$L/$obj", "model": {"init": "random", "path": "$L/base8b", "quant": "nf4", "device": "cuda"},
 "lora": {"r": 16, "alpha": 32},
 "data": {$data, "chat_template": "llama2", "packing": true}, $em
 "train": {"objective": "$obj", "steps": 8, "batch_size": 2, "micro_batch_size": 2, "log_every": 1},
 "checkpoint": {"every": 0}, "logging": {"progress": "lines"}}
JSON
    QT_GENERATE_TIMES=1 timeout 200 build-gpu/qlora-train --config "$L/$obj.json" >"$L/$obj.log" 2>&1
    echo "$obj: $(grep -E '^step [5-8]/8' "$L/$obj.log" | cut -c1-150 | tr '\n' ';')" >>"$summary"
    grep -E "^\{|plan:|error|^generate:|warning|exact-match" "$L/$obj.log" | cut -c1-300 | tail -n 8 >>"$summary"
  done
}
lora_gpu_tests() { gpu_tests "$1" "[lora][gpu],[fused_ops][gpu]"; }
# ab_env LOG SECONDS ROW BUDGET ROUNDS NAME VAR=VALUE: the defaults (base) against one environment switch (NAME), 6 timed
# steps after 2, interleaved over ROUNDS.
ab_env() {
  run "$1" "$2" --rows "$3" --budget "$4" --ab base= --ab "$6=--env $7" --rounds "$5" --steps 6 --warm 2
}
all_gpu_tests() { gpu_tests "$1" "[gpu]"; }
# ab_gate_up LOG SECONDS ROW BUDGET STEPS WARM: the plan's default against no gate / up output kept, one round.
ab_gate_up() {
  run "$1" "$2" --rows "$3" --budget "$4" --ab base= --ab none="--set train.memory.gate_up_kept_blocks=0" --rounds 1 \
    --steps "$5" --warm "$6"
}

case "$CALL" in
1 | 3)
  [ "$CALL" = 3 ] && {
    note "== issue 26: the longest 8B row at 7.44 GiB free (bench.py --max-context from 47,232, r=32)"
    timeout 480 $BENCH --peers none --rows 8b-1x47232 --budget 7.44 --no-whole --max-context --steps 2 --warm 1 $R32 \
      >"$L/max_context.log" 2>&1
    grep -E '^\{|^\|' "$L/max_context.log" | cut -c1-400 | tail -n 12 >>"$summary"
    exit 0
  }
  mkdir -p build-gpu/tests
  if [ -d build/tests/fixtures ]; then
    rm -rf build-gpu/tests/fixtures && cp -r build/tests/fixtures build-gpu/tests/fixtures
  else
    PYTHONPATH=$PWD/.peers python3 tests/oracles/generate.py --out build-gpu/tests/fixtures >"$L/oracles.log" 2>&1 ||
      note "oracles: FAILED"
  fi
  t0=$(date +%s)
  (cd build-gpu && timeout 300 ctest -L gpu --output-on-failure --timeout 900 -E oracles_generate) >"$L/ctest_gpu.log" 2>&1
  grep -E "tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|\(Timeout\)|Exception" "$L/ctest_gpu.log" | tee -a "$summary"
  note "[gpu] tests: $(($(date +%s) - t0)) s"
  note "== the allocator's history of 8B 1 x 117,760 at 22.3 GiB (QT_MEMORY_HISTORY)"
  QT_MEMORY_HISTORY=/tmp/h117.pickle timeout 200 $BENCH --peers none --rows 8b-1x117760 --budget 22.3 --no-whole \
    --steps 1 --warm 0 $R32 >"$L/history_117760.log" 2>&1
  grep -E '^\{' "$L/history_117760.log" | cut -c1-400 >>"$summary"
  for f in /tmp/h117.pickle /tmp/h117.pickle.oom; do
    [ -f "$f" ] && python3 scripts/memory_history.py "$f" --top 25 --depth 2 2>&1 | tee "$L/$(basename "$f").txt" |
      head -n 40 >>"$summary"
  done
  ;;
2)
  note "== issue 27: 8B 2 x 2048 at 24 GiB (Unsloth 0, 1) and 80 GiB (Unsloth 0)"
  run budget_24.log 300 --peers unsloth --unsloth-modes 0,1 --rows 8b-2x2048 --budget 24 --no-whole --steps 6 --warm 2
  run budget_80.log 200 --peers unsloth --unsloth-modes 0 --rows 8b-2x2048 --budget 80 --no-whole --steps 6 --warm 2
  ;;
4)
  note "== issue 27: 8B 1 x 8192, whole documents and packed (median 330), at 80 GiB against Unsloth 0"
  run budget_80_8k.log 280 --peers unsloth --unsloth-modes 0 --rows 8b-1x8192,8b-1x8192p330 --budget 80 --no-whole --steps 4 \
    --warm 2
  note "== issue 27: cuBLASLt against cuBLAS, 8B 2 x 2048 at 80 GiB"
  run ab_cublaslt.log 200 --rows 8b-2x2048 --budget 80 --ab base= --ab lt="--env TORCH_BLAS_PREFER_CUBLASLT=1" --rounds 2 \
    --steps 6 --warm 2
  ;;
5)
  note "== issue 27: the plan picked against the 3 fastest others that fit, 8B 2 x 2048 at 24 and 80 GiB"
  run hand_search.log 330 --rows 8b-2x2048 --budget 24,80 --hand-search 3 --steps 6 --warm 2
  ;;
7)
  note "== issue 27: LoRA dropout 0.05 against none, 8B 2 x 2048 at 80 GiB"
  run ab_dropout.log 200 --rows 8b-2x2048 --budget 80 --ab none= --ab drop="--set lora.dropout=0.05" --rounds 2 \
    --steps 6 --warm 2
  ;;
8)
  note "== issue 27: the LoRA [gpu] and fused-op [gpu] tests, then the input gradients' LoRA terms in the base GEMMs"
  note "   against their own GEMMs (QT_LORA_GRAD_GEMM=0), 8B 2 x 2048 at 80 GiB, two rounds"
  lora_gpu_tests 150
  run ab_grad_gemm.log 220 --rows 8b-2x2048 --budget 80 --ab fold= --ab own="--env QT_LORA_GRAD_GEMM=0" --rounds "${ROUNDS:-2}" \
    --steps 6 --warm 2
  ;;
9)
  note "== LoRA dropout's kernels: the [fused_ops] and [lora] [gpu] tests, then dropout 0.05 through them against"
  note "   at::dropout's masks (QT_LORA_DROPOUT_KERNELS=0) and against none, 8B 2 x 2048 at 80 GiB, two rounds"
  lora_gpu_tests 200
  run ab_dropout_kernels.log 300 --rows 8b-2x2048 --budget 80 --ab kernels="--set lora.dropout=0.05" \
    --ab at_dropout="--set lora.dropout=0.05 --env QT_LORA_DROPOUT_KERNELS=0" --ab none= --rounds "${ROUNDS:-2}" \
    --steps 6 --warm 2
  note "== one profiled step with dropout 0.05: the dropout kernels' time (the backward nodes' rows include SwiGLU's)"
  QT_PROFILE_STEP=4 timeout 200 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 2 --seq 2048 --out "$L/prof" \
    --steps 5 --warmup 2 --set lora.dropout=0.05 >"$L/prof.log" 2>&1
  trace=$(find "$L/prof" -name profile_trace.json | head -n 1)
  [ -n "$trace" ] && python3 scripts/trace_summary.py "$trace" --top 40 >"$L/trace_summary.txt" 2>&1 &&
    grep -E 'GPU time|dropout|LoraLinearFn|GroupLora' "$L/trace_summary.txt" | cut -c1-200 | head -n 8 >>"$summary"
  rm -rf "$L/prof"
  ;;
10)
  note "== the [fused_ops] and [lora] [gpu] tests; steps overlapped (the next queued before the host reads one back)"
  note "   against each read back first (QT_OVERLAP_STEPS=0) and the LoRA factors refreshed in one launch against each"
  note "   remade in its first use (QT_LORA_FACTOR_REFRESH=0), 8B 2 x 2048 at 80 GiB, two rounds"
  lora_gpu_tests 200
  note "== a step queued behind another waits for nothing (QT_TEST_SYNC_DEBUG=2: CUDA's sync debug mode raises there)"
  QT_TEST_SYNC_DEBUG=2 TORCH_SHOW_CPP_STACKTRACES=1 timeout 120 build-gpu/qlora-train bench --shape llama-3.1-8b \
    --batch 2 --seq 2048 --out "$L/sync" --steps 3 --warmup 1 >"$L/sync_debug.log" 2>&1
  note "sync debug: exit $? $(grep -m1 -iE 'synchroniz' "$L/sync_debug.log" | cut -c1-200)"
  grep -A 12 -m1 -iE 'synchroniz' "$L/sync_debug.log" | grep -E 'qt::|at::' | head -n 8 >>"$summary"
  rm -rf "$L/sync"
  run ab_overlap.log 300 --rows 8b-2x2048 --budget 80 --ab overlap= --ab serial="--env QT_OVERLAP_STEPS=0" \
    --ab remade="--env QT_LORA_FACTOR_REFRESH=0" --rounds "${ROUNDS:-2}" --steps 6 --warm 2
  ;;
11)
  note "== the residual add and RMSNorm in one kernel against apart (QT_FUSED_ADD_NORM=0), 8B 2 x 2048 at 80 GiB"
  run ab_add_norm.log 240 --rows 8b-2x2048 --budget 80 --ab fused= --ab apart="--env QT_FUSED_ADD_NORM=0" \
    --rounds "${ROUNDS:-2}" --steps 6 --warm 2
  ;;
15)
  note "== RoPE's q / k / v in one launch (v copied by the rope kernel): the [fused_ops] and [lora] [gpu] tests;"
  note "   issue 27: 8B 1 x 8192 whole and packed (median 330) at 80 GiB against Unsloth 0"
  lora_gpu_tests 150
  run budget_80_8k.log 300 --peers unsloth --unsloth-modes 0 --rows 8b-1x8192,8b-1x8192p330 --budget 80 --no-whole --steps 4 \
    --warm 2
  ;;
16)
  note "== RoPE's kernel a token a CTA (32-bit indices): the [fused_ops] and [lora] [gpu] tests; issue 27: 1B 4 x 2048"
  note "   at 80 GiB against Unsloth 0"
  lora_gpu_tests 150
  run budget_80_1b.log 200 --peers unsloth --unsloth-modes 0 --rows 1b-4x2048 --budget 80 --no-whole --steps 6 --warm 2
  ;;
17)
  note "== the elementwise kernels against the copy bandwidth (bench_elementwise: SwiGLU's flat loop against its rows"
  note "   grid, RoPE's one launch) and the [fused_ops] and [lora] [gpu] tests (the rows grid's bits among them)"
  lora_gpu_tests 150
  timeout 120 build-gpu/bench_elementwise >"$L/bench_elementwise.log" 2>&1
  note "bench_elementwise: exit $?"
  cat "$L/bench_elementwise.log" >>"$summary"
  timeout 200 build-gpu/bench_fused_ce >"$L/bench_fused_ce.log" 2>&1
  note "bench_fused_ce: exit $?"
  grep -iE "frozen|matmul rate|T x H x V" "$L/bench_fused_ce.log" | grep -v " done" >>"$summary"
  timeout 150 build-gpu/bench_lora_gemm >"$L/bench_lora_gemm.log" 2>&1
  note "bench_lora_gemm: exit $?"
  cat "$L/bench_lora_gemm.log" >>"$summary"
  ;;
19)
  note "== the [fused_ops] and [lora] [gpu] tests (x A^T over K slices among them)"
  lora_gpu_tests 150
  note "== LoRA's products at the 1B block's shapes (8192 tokens: the 1B profile ran x A^T at 37-45% of the bandwidth)"
  note "   and the 8B's, with cuBLAS batched over K slices beside; bench_fused_ce's frozen rows (the 8B step's 4096 tokens)"
  timeout 150 build-gpu/bench_lora_gemm 8192 1b >"$L/bench_lora_gemm_1b.log" 2>&1
  note "bench_lora_gemm 1b: exit $?"
  cat "$L/bench_lora_gemm_1b.log" >>"$summary"
  timeout 150 build-gpu/bench_lora_gemm 4096 8b >"$L/bench_lora_gemm_8b.log" 2>&1
  note "bench_lora_gemm 8b: exit $?"
  cat "$L/bench_lora_gemm_8b.log" >>"$summary"
  note "== the fused loss's [gpu] tests (the tile kernel's persistent grid against the default grid's bits)"
  (cd build-gpu && timeout 200 ./tests/qt_tests "[fused_ce][gpu]") >"$L/tests_fused_ce.log" 2>&1
  tail -n 4 "$L/tests_fused_ce.log" >>"$summary"
  grep -B 4 -A 12 "FAILED" "$L/tests_fused_ce.log" | head -n 40 >>"$summary"
  timeout 240 build-gpu/bench_fused_ce >"$L/bench_fused_ce.log" 2>&1
  note "bench_fused_ce: exit $?"
  grep -iE "frozen|resident|fused trainable|matmul rate|T x H x V" "$L/bench_fused_ce.log" | grep -v " done" >>"$summary"
  note "== in the step: the tile kernel's persistent grid (QT_CE_RESIDENT_TILES=1), x A^T over 4 K slices"
  note "   (QT_LORA_PROJECT_SPLIT=4) and FlashAttention-2 for head_dim 64 (cuDNN's backward ran at 255 TFLOP/s there)"
  note "   against none of them, 1B 4 x 2048 at 80 GiB, two rounds"
  run ab_resident_split_1b.log 330 --rows 1b-4x2048 --budget 80 --ab base= --ab resident="--env QT_CE_RESIDENT_TILES=1" \
    --ab split4="--env QT_LORA_PROJECT_SPLIT=4" --ab flash="--set train.memory.attention=flash" --rounds "${ROUNDS:-2}" \
    --steps 6 --warm 2
  ;;
22)
  note "== issue 27: 8B 1 x 32768 at 24 GiB (Unsloth u, 1) and 80 GiB (Unsloth 0, u, 1)"
  run budget_24_32k.log 270 --peers unsloth --unsloth-modes u,1 --rows 8b-1x32768 --budget 24 --no-whole --steps 3 --warm 1
  run budget_80_32k.log 300 --peers unsloth --unsloth-modes 0,u,1 --rows 8b-1x32768 --budget 80 --no-whole --steps 3 \
    --warm 1
  ;;
23)
  note "== issue 27: the plan picked against the 3 fastest others that fit, 1B 4 x 2048 and 8B 1 x 8192 at 24 and 80 GiB"
  run hand_search_rows.log 540 --rows 1b-4x2048,8b-1x8192 --budget 24,80 --hand-search 3 --steps 4 --warm 2
  ;;
25)
  note "== every [gpu] test (the tuned GEMM's among them; the base GEMM onto a linear's rank-r term counted)"
  all_gpu_tests 240
  note "== the trainer's GEMMs: ATen, cuBLASLt's candidates, and the tuned GEMM (bench_gemm_algos)"
  timeout 200 build-gpu/bench_gemm_algos 32 >"$L/bench_gemm_algos.log" 2>&1
  note "bench_gemm_algos: exit $?"
  cat "$L/bench_gemm_algos.log" >>"$summary"
  ;;
26)
  [ -d build/tests/fixtures ] && lora_gpu_tests 100
  note "== in the step: the tuned GEMMs (base) against ATen's (QT_GEMM_TUNE=0), 8B 2 x 2048 (two rounds) and 1B 4 x 2048"
  note "   (two) at 80 GiB, 8B 2 x 2048 at 24 GiB (two)"
  ab_env ab_tune_8b.log 170 8b-2x2048 80 "${ROUNDS:-2}" aten QT_GEMM_TUNE=0
  ab_env ab_tune_1b.log 100 1b-4x2048 80 2 aten QT_GEMM_TUNE=0
  ab_env ab_tune_8b_24.log 170 8b-2x2048 24 2 aten QT_GEMM_TUNE=0
  ;;
27)
  note "== the tuned GEMMs under sustained load: bench_gemm_algos at 8B with 200 calls a timing (whether tile 201's lead"
  note "   survives the power cap), then the step tuned and not, 8B 2 x 2048 on the whole GPU, SM clock and power sampled"
  timeout 240 build-gpu/bench_gemm_algos 32 8b 200 >"$L/bench_gemm_algos_sustained.log" 2>&1
  note "bench_gemm_algos 8b 200: exit $?"
  cat "$L/bench_gemm_algos_sustained.log" >>"$summary"
  for round in 1 2; do
    for tune in 1 0; do
      nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 100 >"$L/smi_${tune}_$round.csv" &
      smi=$!
      QT_GEMM_TUNE=$tune timeout 150 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 2 --seq 2048 \
        --out "$L/b_${tune}_$round" --steps 8 --warmup 3 >"$L/b_${tune}_$round.log" 2>&1
      kill $smi 2>/dev/null
      wait $smi 2>/dev/null
      tps=$(grep -E '^\{' "$L/b_${tune}_$round.log" | tail -n 1 | tr ',' '\n' | grep -E '"tokens_per_s"' | cut -d: -f2)
      # the samples while the GPU was busy (power over 300 W): the steps, not the load
      f="$L/smi_${tune}_$round.csv"
      clk=$(awk -F', ' '$2 > 300 {print $1}' "$f" | sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}')
      pw=$(awk -F', ' '$2 > 300 {print $2}' "$f" | sort -n | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)] " W, " NR " samples"}')
      note "round $round, QT_GEMM_TUNE=$tune: $tps tok/s; median SM clock and power while busy: $clk MHz, $pw"
      rm -rf "$L/b_${tune}_$round"
    done
  done
  ;;
28)
  note "== 8B 1 x 32768 at 24 GiB: what the allocator held at the peak (the footprint model predicted 22.69 GiB, the"
  note "   driver showed 19.32 in the twenty-second session's call 22), then the plan against the 3 fastest others"
  if [ -z "${NO_HISTORY:-}" ]; then
    QT_MEMORY_HISTORY=/tmp/h32k.pickle timeout 200 $BENCH --peers none --rows 8b-1x32768 --budget 24 --no-whole \
      --steps 1 --warm 0 >"$L/history_32k.log" 2>&1
    grep -E '^\{' "$L/history_32k.log" | cut -c1-600 >>"$summary"
    for f in /tmp/h32k.pickle /tmp/h32k.pickle.oom; do
      [ -f "$f" ] && python3 scripts/memory_history.py "$f" --top 25 --depth 2 2>&1 | tee "$L/$(basename "$f").txt" |
        head -n 40 >>"$summary"
    done
  fi
  run hand_search_32k.log 330 --rows 8b-1x32768 --budget 24 --hand-search 3 --steps 2 --warm 1
  ;;
34)
  note "== 8B 1 x 32768 at 80 GiB, ours with the gate / up output kept (the default) and without, then Unsloth's 1;"
  note "   the [lora] and [fused_ops] [gpu] tests (ran in the twenty-third session)"
  ab_gate_up ab_gate_up_32k_80.log 130 8b-1x32768 80 3 1
  [ -d build/tests/fixtures ] && lora_gpu_tests 100
  run budget_80_32k_unsloth.log 150 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 80 --no-whole \
    --steps 3 --warm 1 --binary /bin/false
  ;;
33)
  note "== the [lora] and [fused_ops] [gpu] tests (packed rows keeping the gate / up output: not yet run on a GPU)"
  [ -d build/tests/fixtures ] && lora_gpu_tests 100
  note "== issue 27: 8B 1 x 32768 at 24 GiB against Unsloth's 1 (u ran 0.2% slower in the twenty-second session), ours"
  note "   also with no gate / up output kept (8B 1 x 8192 at 24 GiB ran in the twenty-third session: 1.46x)"
  run budget_24_32k.log 150 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 24 --no-whole --steps 3 --warm 1
  run ab_gate_up_32k_24.log 80 --rows 8b-1x32768 --budget 24 --ab none="--set train.memory.gate_up_kept_blocks=0" \
    --rounds 1 --steps 3 --warm 1
  ;;
36 | 38)
  if [ "$CALL" = 36 ]; then
    note "== the [lora] and [fused_ops] [gpu] tests (gate / up outputs offloaded to the host, packed rows keeping theirs)"
    [ -d build/tests/fixtures ] && lora_gpu_tests 100
  fi
  note "== 8B 1 x 32768 at 24 GiB: the plan (gate / up outputs offloaded) against none and 14 offloaded, then Unsloth 1"
  # (LEAN=1: the plan and none offloaded alone; LEAN=2: the plan alone)
  others=(--ab none="--set train.memory.gate_up_offloaded_blocks=0" --ab half="--set train.memory.gate_up_offloaded_blocks=14")
  [ "${LEAN:-}" = 1 ] && others=("${others[@]:0:2}")
  [ "${LEAN:-}" = 2 ] && others=()
  run ab_gate_up_offload_32k_24.log 250 --rows 8b-1x32768 --budget 24 --ab base= "${others[@]}" --rounds 1 --steps 3 \
    --warm 1
  run budget_24_32k_unsloth.log 160 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 24 --no-whole \
    --steps 3 --warm 1 --binary /bin/false
  ;;
48)
  note "== issue 27 at 48 GiB: 8B 1 x 8192 whole and packed (median 330) against Unsloth 0"
  run budget_48_8k.log 320 --peers unsloth --unsloth-modes 0 --rows 8b-1x8192,8b-1x8192p330 --budget 48 --no-whole \
    --steps 4 --warm 2
  ;;
49)
  note "== issue 27 at 48 GiB: 8B 1 x 32768 against Unsloth 1, 8B 2 x 2048 against Unsloth 0"
  run budget_48_32k.log 230 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 48 --no-whole --steps 3 --warm 1
  run budget_48_2k.log 200 --peers unsloth --unsloth-modes 0 --rows 8b-2x2048 --budget 48 --no-whole --steps 6 --warm 2
  ;;
50)
  note "== generation through the key / value cache (thirty-fourth session): every [gpu] test (the cached forward's"
  note "   among them), then bench --generate: 100 random prompts of median 200 tokens, 32 new tokens each, as the"
  note "   exact-match metric generates them (batches of at most a training micro-batch's tokens), against 4 without"
  note "   the cache, on the 8B and 1B shapes"
  all_gpu_tests 300
  for args in "llama-3.1-8b 2 2048" "llama-3.1-8b 8 2048" "llama-3.2-1b 4 2048"; do
    set -- $args
    timeout 200 build-gpu/qlora-train bench --shape "$1" --batch "$2" --seq "$3" --generate 100 --prompt-tokens 200 \
      --max-new-tokens 32 --uncached 4 --out "$L/gen" >"$L/gen_$1_$2.log" 2>&1
    echo "$1 batch_tokens $(($2 * $3)): $(grep -E '^\{' "$L/gen_$1_$2.log" | tail -n 1)" | tee -a "$summary"
    grep -iE "error|what\(\)" "$L/gen_$1_$2.log" | head -n 5 >>"$summary"
  done
  ;;
51)
  note "== generation without GEMM tuning (in call 50 each new shape was timed over cuBLASLt's candidates) and its"
  note "   prompts batched by length: the [generate] [gpu] tests, then call 50's bench --generate rows"
  gpu_tests 120 "[generate][gpu]"
  for args in "llama-3.1-8b 2 2048" "llama-3.1-8b 8 2048" "llama-3.2-1b 4 2048"; do
    set -- $args
    [ "$1 $2" = "llama-3.1-8b 2" ] && export QT_PROFILE_GENERATE=$L/prof || unset QT_PROFILE_GENERATE
    timeout 200 build-gpu/qlora-train bench --shape "$1" --batch "$2" --seq "$3" --generate 100 --prompt-tokens 200 \
      --max-new-tokens 32 --uncached 4 --out "$L/gen" >"$L/gen_$1_$2.log" 2>&1
    echo "$1 batch_tokens $(($2 * $3)): $(grep -E '^\{' "$L/gen_$1_$2.log" | tail -n 1)" | tee -a "$summary"
    grep -iE "error|what\(\)" "$L/gen_$1_$2.log" | head -n 5 >>"$summary"
  done
  unset QT_PROFILE_GENERATE
  [ -f "$L/prof/profile_kernels.txt" ] && head -n 25 "$L/prof/profile_kernels.txt" >>"$summary"
  [ -f "$L/prof/profile_trace.json" ] && python3 scripts/trace_summary.py "$L/prof/profile_trace.json" 2>&1 |
    head -n 40 >>"$summary"
  ;;
52)
  note "== the review's fixes to generation (q / k / v as one projection, the factors in the generation's own cache,"
  note "   each row's sampling generator, the cache within the context): the [generate] [gpu] tests, 8B at 16,384"
  gpu_tests 60 "[generate][gpu]"
  timeout 90 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 8 --seq 2048 --generate 100 --prompt-tokens 200 \
    --max-new-tokens 32 --uncached 2 --out "$L/gen" >"$L/gen_52.log" 2>&1
  echo "llama-3.1-8b batch_tokens 16384: $(grep -E '^\{' "$L/gen_52.log" | tail -n 1)" | tee -a "$summary"
  grep -iE "error|what\(\)" "$L/gen_52.log" | head -n 5 >>"$summary"
  ;;
53)
  note "== DPO on CUDA (thirty-fifth session): the [dpo] tests (the fused loss's per-token rows against the fp32"
  note "   full-logits path; a DPO step's loss and LoRA gradients against the CPU's), the [fused_ce] [gpu] tests; then"
  note "   call 52: the review's fixes to generation ([generate] [gpu] tests, 8B at 16,384)"
  gpu_tests 120 "[dpo],[fused_ce][gpu],[generate][gpu]"
  # The DPO demo on CUDA (its exact match and reward accuracy), then the SFT demo (a step's time against DPO's).
  for c in demo-dpo demo; do
    timeout 90 build-gpu/qlora-train --config configs/$c.json --set output_dir="$L/$c" --set model.device=cuda \
      --set logging.progress=lines >"$L/$c.log" 2>&1
    echo "$c: $(grep -E 'step 60/60' "$L/$c.log" | tail -n 1)" >>"$summary"
    echo "$c: $(grep -E '^\{' "$L/$c.log" | tail -n 1)" >>"$summary"
  done
  # Call 50's 8B row took 7.9 s in call 51 and 17.8 s in the first run of this call: each batch's prefill and steps.
  QT_GENERATE_TIMES=1 timeout 90 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 8 --seq 2048 --generate 100 \
    --prompt-tokens 200 --max-new-tokens 32 --uncached 2 --out "$L/gen" >"$L/gen_53.log" 2>&1
  echo "llama-3.1-8b batch_tokens 16384: $(grep -E '^\{' "$L/gen_53.log" | tail -n 1)" | tee -a "$summary"
  grep -E "^generate:" "$L/gen_53.log" >>"$summary"
  grep -iE "error|what\(\)" "$L/gen_53.log" | head -n 5 >>"$summary"
  ;;
64)
  note "== 8-bit AdamW on CUDA (optim.name adamw_8bit, thirty-ninth session): the [train] [gpu] tests (the kernel's bits"
  note "   equal the CPU loop's, fp32 and bf16 parameters, state on the GPU and on the host); 8B 2 x 2048 on the whole"
  note "   GPU, adamw against adamw_8bit, LoRA alone and with embed_tokens and lm_head trained in full (1.05 B elements),"
  note "   the latter at a 24 GiB budget too. Predicted at an H100's bandwidth: 24 GiB 0.316 s a step with fp32 moments,"
  note "   0.281 s with 8-bit ones (the 6.3 GB freed keep residuals and 29 blocks' gate / up); whole GPU 53.60 -> 47.52 GiB"
  gpu_tests 90 "[train][gpu]"
  for mts in none both both24; do
    extra=()
    if [ "$mts" != none ]; then extra=(--set 'lora.modules_to_save=["embed_tokens","lm_head"]'); fi
    if [ "$mts" = both24 ]; then extra+=(--set train.memory.gpu_memory_gib=24); fi
    for opt in adamw adamw_8bit; do
      timeout 150 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 2 --seq 2048 --steps 6 --warmup 2 \
        --out "$L/adamw_${mts}_$opt" --set optim.name=$opt "${extra[@]}" >"$L/adamw_${mts}_$opt.log" 2>&1
      echo "modules_to_save $mts, $opt: $(grep -E '^\{' "$L/adamw_${mts}_$opt.log" | tail -n 1 | cut -c1-400)" |
        tee -a "$summary"
      grep -E "plan:|error|what\(\)" "$L/adamw_${mts}_$opt.log" | head -n 3 | cut -c1-300 >>"$summary"
    done
  done
  ;;
63)
  note "== KTO's held-out evaluation on CUDA (each pass over half a row, one KL baseline over the held-out records):"
  note "   the demo's pairs, a tenth held out, evaluated every 20 steps; eval --config of the adapter on them"
  timeout 120 build-gpu/qlora-train --config configs/demo-dpo.json --set output_dir="$L/kto_eval" \
    --set train.objective=kto --set kto.undesirable_weight=0.25 --set data.eval_fraction=0.1 --set train.eval_every=20 \
    --set model.device=cuda --set logging.progress=lines >"$L/kto_eval.log" 2>&1
  grep -E "eval_loss|held-out|exact-match|error" "$L/kto_eval.log" | cut -c1-200 >>"$summary"
  grep -E '"eval_loss"' "$L/kto_eval/metrics.jsonl" | tail -n 1 >>"$summary"
  echo "kto held-out demo: $(grep -E '^\{' "$L/kto_eval.log" | tail -n 1)" >>"$summary"
  timeout 120 build-gpu/qlora-train eval --config "$L/kto_eval/config.resolved.json" --adapter "$L/kto_eval/adapter" \
    --data "$L/kto_eval/eval.jsonl" --device cuda >"$L/kto_eval_cmd.log" 2>&1
  echo "eval --config: $(tail -n 1 "$L/kto_eval_cmd.log")" >>"$summary"
  ;;
62)
  note "== KTO on CUDA at 8B against DPO (thirty-eighth session): the demo's pairs unpaired, rows of 4,096 tokens packed,"
  note "   2 a step; KTO's KL sequences in their own pass without gradient (split_pairs), the records alone with it"
  gpu_tests 60 "[dpo]"
  dpo_against_sft "kto dpo"
  ;;
58|59|60|61)
  # 58 (ran in the thirty-seventh session): the default then Decoder eagerly, against graphs (1) and forward_cached (0).
  # 59: the default now the graphs; a warm-up process first (call 58's first process on a fresh machine ran 2.7x
  # slower, whichever mode it ran: the libraries' kernels loaded from a cold disk), then each mode. 60: 59 without
  # forward_cached and the SFT demo. 61: the tests and the CPO / ORPO runs alone.
  note "== generation on CUDA: the [generate] [gpu] tests (graphed, eager and forward_cached tokens equal); bench"
  note "   --generate 8B / 16,384 and 1B / 8,192 by default (graphs), eager and through forward_cached (0)"
  if [ "$CALL" = 58 ]; then gpu_tests 90 "[generate][gpu]"; else gpu_tests 120 "[generate][gpu],[dpo]"; fi
  if [ "$CALL" != 58 ]; then
    # CPO and ORPO (train.objective "cpo" / "orpo", thirty-seventh session) on CUDA: the DPO demo's pairs, exact match.
    # KTO (thirty-eighth session) likewise, its undesirable records weighted 0.25 as tests/e2e/test_kto.py's demo.
    for obj in cpo orpo kto; do
      extra=""
      if [ "$obj" = kto ]; then extra="--set kto.undesirable_weight=0.25"; fi
      timeout 90 build-gpu/qlora-train --config configs/demo-dpo.json --set output_dir="$L/$obj" \
        --set train.objective=$obj --set model.device=cuda --set logging.progress=lines $extra >"$L/$obj.log" 2>&1
      grep -E "step 60/60|exact-match|error" "$L/$obj.log" >>"$summary"
      echo "$obj demo: $(grep -E '^\{' "$L/$obj.log" | tail -n 1)" >>"$summary"
    done
  fi
  modes="default 1 0"
  case "$CALL" in 59) modes="default eager 0" ;; 60) modes="default eager" ;; 61) modes="" ;; esac
  if [ "$CALL" = 59 ] || [ "$CALL" = 60 ]; then
    timeout 120 build-gpu/qlora-train bench --shape llama-3.2-1b --batch 4 --seq 2048 --generate 100 --prompt-tokens 200 \
      --max-new-tokens 32 --uncached 1 --out "$L/gen" >"$L/gen_warmup.log" 2>&1
  fi
  for shape in "llama-3.1-8b 8" "llama-3.2-1b 4"; do
    set -- $shape
    for graphs in $modes; do
      if [ "$graphs" = default ]; then unset QT_GENERATE_GRAPHS; else export QT_GENERATE_GRAPHS=$graphs; fi
      QT_GENERATE_TIMES=1 timeout 120 build-gpu/qlora-train bench --shape "$1" --batch "$2" --seq 2048 --generate 100 \
        --prompt-tokens 200 --max-new-tokens 32 --uncached 1 --out "$L/gen" >"$L/gen_${CALL}_$1_$graphs.log" 2>&1
      echo "graphs $graphs: $1: $(grep -E '^\{' "$L/gen_${CALL}_$1_$graphs.log" | tail -n 1)" | tee -a "$summary"
      grep -E "^generate:|warning" "$L/gen_${CALL}_$1_$graphs.log" >>"$summary"
      grep -iE "error|what\(\)" "$L/gen_${CALL}_$1_$graphs.log" | head -n 5 >>"$summary"
    done
    unset QT_GENERATE_GRAPHS
  done
  # The SFT demo on CUDA: its exact match before and after training through the default decoding.
  if [ "$CALL" = 58 ] || [ "$CALL" = 59 ]; then
    QT_GENERATE_TIMES=1 timeout 90 build-gpu/qlora-train --config configs/demo.json --set output_dir="$L/demo" \
      --set model.device=cuda --set logging.progress=lines >"$L/demo.log" 2>&1
    grep -E "^generate:|exact-match|warning" "$L/demo.log" >>"$summary"
    echo "demo: $(grep -E '^\{' "$L/demo.log" | tail -n 1)" >>"$summary"
  fi
  ;;
57)
  note "== issue 27 on an H200 (its own machine): 8B 2 x 2048 at 80 GiB against Unsloth 0 (call 2's second half)"
  run budget_80.log 240 --peers unsloth --unsloth-modes 0 --rows 8b-2x2048 --budget 80 --no-whole --steps 6 --warm 2
  ;;
56)
  note "== generation's decoding steps as CUDA graphs (thirty-sixth session): the [generate] [gpu] and [dpo] tests;"
  note "   bench --generate at 8B in batches of 16,384 tokens with graphs (QT_GENERATE_GRAPHS=1, opt-in until this"
  note "   call), through Decoder without them (eager) and through forward_cached (0, the default), each batch's steps;"
  note "   then the [dpo] tests and call 54's DPO against SFT at 8B"
  gpu_tests 90 "[generate][gpu]"
  for graphs in 1 eager 0; do
    QT_GENERATE_GRAPHS=$graphs QT_GENERATE_TIMES=1 timeout 120 build-gpu/qlora-train bench --shape llama-3.1-8b \
      --batch 8 --seq 2048 --generate 100 --prompt-tokens 200 --max-new-tokens 32 --uncached 1 --out "$L/gen" \
      >"$L/gen_56_$graphs.log" 2>&1
    echo "graphs $graphs: llama-3.1-8b batch_tokens 16384: $(grep -E '^\{' "$L/gen_56_$graphs.log" | tail -n 1)" |
      tee -a "$summary"
    grep -E "^generate:|warning" "$L/gen_56_$graphs.log" >>"$summary"
    grep -iE "error|what\(\)" "$L/gen_56_$graphs.log" | head -n 5 >>"$summary"
  done
  gpu_tests 90 "[dpo]"
  dpo_against_sft
  QT_GENERATE_TIMES=1 timeout 100 build-gpu/qlora-train bench --shape llama-3.2-1b --batch 4 --seq 2048 \
    --generate 100 --prompt-tokens 200 --max-new-tokens 32 --uncached 1 --out "$L/gen" >"$L/gen_56_1b.log" 2>&1
  echo "llama-3.2-1b batch_tokens 8192: $(grep -E '^\{' "$L/gen_56_1b.log" | tail -n 1)" | tee -a "$summary"
  ;;
55)
  note "== the [dpo] tests alone (fresh adapters left out of the reference pass, on CUDA too; call 54's first part)"
  gpu_tests 60 "[dpo]"
  ;;
54)
  note "== the [dpo] tests (fresh adapters left out of the reference pass, on CUDA too); DPO's step against SFT's at 8B"
  note "   (random NF4 weights, the demo's tokenizer and task: its pairs for DPO, its chat records for SFT), rows of"
  note "   4,096 tokens packed, 2 a step, the plan's default on the whole GPU"
  gpu_tests 60 "[dpo]"
  dpo_against_sft
  # Generation at 8B in batches of 16,384 tokens: each batch's prefill and steps, and a kernel profile of two
  # decoding steps of the bench's phases batch (launches against kernel time).
  QT_GENERATE_TIMES=1 QT_PROFILE_GENERATE=$L/prof timeout 120 build-gpu/qlora-train bench --shape llama-3.1-8b \
    --batch 8 --seq 2048 --generate 100 --prompt-tokens 200 --max-new-tokens 32 --uncached 1 --out "$L/gen" \
    >"$L/gen_54.log" 2>&1
  echo "llama-3.1-8b batch_tokens 16384: $(grep -E '^\{' "$L/gen_54.log" | tail -n 1)" | tee -a "$summary"
  grep -E "^generate:" "$L/gen_54.log" >>"$summary"
  grep -iE "error|what\(\)" "$L/gen_54.log" | head -n 5 >>"$summary"
  [ -f "$L/prof/profile_kernels.txt" ] && head -n 30 "$L/prof/profile_kernels.txt" >>"$summary"
  ;;
46)
  note "== every [gpu] test on the current code (the last full run: the twenty-second session, 54 of 54)"
  all_gpu_tests 300
  ;;
47)
  note "== fp16 loss scaling on CUDA (test_fp16_gpu.py: overflowing steps skipped, the scale halved and resumed"
  note "   byte for byte, fp16 following fp32's losses) and bf16 eval against transformers (test_eval_gpu.py)"
  mkdir -p build-gpu/tests
  rm -rf build-gpu/tests/fixtures && cp -r build/tests/fixtures build-gpu/tests/fixtures
  (cd build-gpu && timeout 240 ctest -R "e2e: test_(fp16|eval)_gpu" -FA oracles --output-on-failure \
    --timeout 200) >"$L/ctest_e2e_gpu.log" 2>&1
  grep -E "tests passed|tests failed|Passed|\(Failed\)|FAILED|checks passed|cuda bf16" "$L/ctest_e2e_gpu.log" |
    head -n 30 >>"$summary"
  ;;
45)
  note "== why some machines run 8B 1 x 32768 1.7x slower (calls 37 and 43, with 55 GB/s host links): the row's steps"
  note "   at 80 GiB with the GPU's clocks, power and throttle reasons sampled each second, then one profiled step"
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader -l 1 >"$L/clocks.csv" 2>&1 &
  smi=$!
  timeout 150 build-gpu/qlora-train bench --shape llama-3.1-8b --batch 1 --seq 32768 --out "$L/plain" --steps 4 \
    --warmup 1 >"$L/plain.log" 2>&1
  kill "$smi" 2>/dev/null
  grep -E '^\{' "$L/plain.log" | tail -n 1 | tr ',' '\n' | grep -E 'tokens_per_s|step_ms|wall' >>"$summary"
  # The samples in one line: SM clock and power ranges, and how many samples each throttle-reason mask had.
  awk -F', ' '{sm=$1+0; w=$3+0; if (NR==1||sm<smin) smin=sm; if (sm>smax) smax=sm; if (w>wmax) wmax=w; r[$5]++}
    END {printf "clocks: %d samples, SM %d-%d MHz, power up to %.0f W; throttle masks:", NR, smin, smax, wmax;
         for (k in r) printf " %s x%d", k, r[k]; print ""}' "$L/clocks.csv" >>"$summary"
  QT_PROFILE_STEP=2 QT_PROFILE_STEPS=1 timeout 200 \
    build-gpu/qlora-train bench --shape llama-3.1-8b --batch 1 --seq 32768 --out "$L/prof" --steps 3 --warmup 1 \
    >"$L/prof.log" 2>&1
  trace=$(find "$L/prof" -name profile_trace.json | head -n 1)
  [ -n "$trace" ] && python3 scripts/trace_summary.py "$trace" --top 40 >"$L/trace_summary.txt" 2>&1 &&
    head -n 50 "$L/trace_summary.txt" >>"$summary"
  rm -rf "$L/prof" "$L/plain"
  ;;
44)
  note "== the fused NF4 GEMM's [gpu] tests ([nf4_gemm]; the rounding bound at 2^-7 of the rounded magnitudes)"
  (cd build-gpu && timeout 90 ./tests/qt_tests "[nf4_gemm]") >"$L/tests_nf4_gemm.log" 2>&1
  tail -n 3 "$L/tests_nf4_gemm.log" >>"$summary"
  grep -B 4 -A 16 "FAILED" "$L/tests_nf4_gemm.log" | head -n 40 >>"$summary"
  ;;
43)
  note "== the fused NF4 GEMM's [gpu] tests (the reference's bound with a tail corrected), then the hand search on the"
  note "   packed SFT row at 24 and 80 GiB and on 8B 1 x 32768 at 80 GiB (the 2 fastest others: call 29 in less time)"
  (cd build-gpu && timeout 90 ./tests/qt_tests "[nf4_gemm]") >"$L/tests_nf4_gemm.log" 2>&1
  tail -n 3 "$L/tests_nf4_gemm.log" >>"$summary"
  grep -B 4 -A 16 "FAILED" "$L/tests_nf4_gemm.log" | head -n 40 >>"$summary"
  run hand_search_packed.log 280 --rows 8b-1x8192p330 --budget 24,80 --hand-search 3 --steps 4 --warm 2
  run hand_search_32k_80.log 170 --rows 8b-1x32768 --budget 80 --hand-search 2 --steps 2 --warm 1
  ;;
41)
  note "== the fused NF4 GEMM (issue 27 item 2): its [gpu] tests, then bench_nf4_gemm against dequantization + cuBLAS"
  (cd build-gpu && timeout 120 ./tests/qt_tests "[nf4_gemm]") >"$L/tests_nf4_gemm.log" 2>&1
  rc=$?
  tail -n 3 "$L/tests_nf4_gemm.log" >>"$summary"
  grep -B 4 -A 16 "FAILED" "$L/tests_nf4_gemm.log" | head -n 50 >>"$summary"
  [ "$rc" = 124 ] && { note "tests timed out (a hang): no bench"; exit 1; }
  # Rows reach the summary as they are measured (NF4_VARIANTS=5,6,12,13 for a short call; NO_CLUSTER=1 skips 11's).
  timeout 150 build-gpu/bench_nf4_gemm ${NF4_GEMM_ONLY:+--only=$NF4_GEMM_ONLY} ${NF4_VARIANTS:+--variants=$NF4_VARIANTS} \
    2>&1 | tee "$L/bench_nf4_gemm.log" | grep --line-buffered -E '^\|' >>"$summary"
  note "bench_nf4_gemm: exit ${PIPESTATUS[0]}"
  [ -n "${NO_CLUSTER:-}" ] && exit 0
  # Variant 11 (clusters sharing x's tiles by multicast) last, on its own timeouts: a hang there costs nothing above.
  note "== variant 11 (clusters of two CTAs sharing x's tiles): its [gpu] test, then its bench column"
  (cd build-gpu && timeout 60 ./tests/qt_tests "[nf4_gemm_cluster]") >"$L/tests_nf4_gemm_cluster.log" 2>&1
  note "cluster test: exit $?"
  tail -n 3 "$L/tests_nf4_gemm_cluster.log" >>"$summary"
  grep -B 4 -A 12 "FAILED" "$L/tests_nf4_gemm_cluster.log" | head -n 30 >>"$summary"
  timeout 60 build-gpu/bench_nf4_gemm --variants=11,15 ${NF4_GEMM_ONLY:+--only=$NF4_GEMM_ONLY} \
    >"$L/bench_nf4_gemm_cluster.log" 2>&1
  note "bench_nf4_gemm --variants=11,15: exit $?"
  grep -E '^\|' "$L/bench_nf4_gemm_cluster.log" >>"$summary"
  [ -n "${NO_AB:-}" ] && exit 0
  # In the step: 8B 2 x 2048 at 24 GiB (the blocks not holding their weights dequantize them in each pass), the
  # kernel's variant NF4_VARIANT (QT_NF4_GEMM_VARIANT; default 8: W in registers on a persistent grid).
  ab_env ab_nf4_gemm_24.log 240 8b-2x2048 24 2 nf4_gemm "QT_NF4_GEMM=1 --env QT_NF4_GEMM_VARIANT=${NF4_VARIANT:-8}"
  ;;
40)
  note "== the host link probe ([plan][gpu]), the plan of 8B 1 x 32768 at 24 GiB at the measured link, then the hand"
  note "   search on 1B 4 x 2048 at 24 and 80 GiB and 8B 1 x 8192 at 80 GiB (39's)"
  (cd build-gpu && timeout 60 ./tests/qt_tests "[plan][gpu]" -s) >"$L/tests_plan_gpu.log" 2>&1
  grep -E 'GB/s|passed|failed' "$L/tests_plan_gpu.log" | tail -n 4 >>"$summary"
  timeout 60 build-gpu/qlora-train plan --shape llama-3.1-8b --batch 1 --seq 32768 --gpu-memory-gib 23.9 2>&1 |
    head -n 1 | tee -a "$summary"
  [ -n "${PROBE_ONLY:-}" ] && exit 0
  run hand_search_1b.log 200 --rows 1b-4x2048 --budget 24,80 --hand-search 3 --steps 4 --warm 2
  run hand_search_8k_80.log 150 --rows 8b-1x8192 --budget 80 --hand-search 3 --steps 4 --warm 2
  ;;
39)
  note "== issue 27: the plan against the 3 fastest others, 1B 4 x 2048 at 24 and 80 GiB, 8B 1 x 8192 at 80 GiB"
  run hand_search_1b.log 200 --rows 1b-4x2048 --budget 24,80 --hand-search 3 --steps 4 --warm 2
  run hand_search_8k_80.log 150 --rows 8b-1x8192 --budget 80 --hand-search 3 --steps 4 --warm 2
  ;;
37)
  note "== issue 27: the plan against the 3 fastest others, 8B 1 x 32768 and 8B 1 x 8192 at 24 GiB"
  run hand_search_32k_24.log 330 --rows 8b-1x32768 --budget 24 --hand-search 3 --steps 2 --warm 1
  run hand_search_8k_24.log 240 --rows 8b-1x8192 --budget 24 --hand-search 3 --steps 4 --warm 2
  ;;
31)
  note "== issue 27: 8B 1 x 32768 against Unsloth's best mode (1: the twenty-second session's 0 ran out of memory at"
  note "   80 GiB and u ran 0.1-0.2% slower than 1 at both budgets), 80 and 24 GiB; 8B 1 x 8192 at 24 GiB against"
  note "   Unsloth's 0 and 1, and ours with no gate / up output kept"
  run budget_80_32k.log 150 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 80 --no-whole --steps 3 --warm 1
  run budget_24_32k.log 150 --peers unsloth --unsloth-modes 1 --rows 8b-1x32768 --budget 24 --no-whole --steps 3 --warm 1
  run budget_24_8k.log 150 --peers unsloth --unsloth-modes 0,1 --rows 8b-1x8192 --budget 24 --no-whole --steps 6 --warm 2
  run ab_gate_up_8k_24.log 80 --rows 8b-1x8192 --budget 24 --ab none="--set train.memory.gate_up_kept_blocks=0" \
    --rounds 1 --steps 6 --warm 2
  ;;
29)
  note "== issue 27: the plan picked against the 3 fastest others that fit, 8B 1 x 32768 at 80 GiB and the packed"
  note "   SFT row (8B 1 x 8192, median 330) at 24 and 80 GiB"
  run hand_search_32k_80.log 300 --rows 8b-1x32768 --budget 80 --hand-search 3 --steps 2 --warm 1
  run hand_search_packed.log 280 --rows 8b-1x8192p330 --budget 24,80 --hand-search 3 --steps 4 --warm 2
  ;;
24)
  note "== the trainer's base GEMMs through ATen against every candidate of cuBLASLt's heuristic (bench_gemm_algos)"
  timeout 240 build-gpu/bench_gemm_algos "${CANDIDATES:-32}" >"$L/bench_gemm_algos.log" 2>&1
  note "bench_gemm_algos: exit $?"
  cat "$L/bench_gemm_algos.log" >>"$summary"
  note "== the 24 GiB plan's NF4 dequantization a linear ahead on a side stream against in turn (bench_nf4_dequant --overlap)"
  timeout 90 build-gpu/bench_nf4_dequant 30 --overlap=4096 >"$L/bench_overlap.log" 2>&1
  note "bench_nf4_dequant --overlap: exit $?"
  cat "$L/bench_overlap.log" >>"$summary"
  [ -n "${WITH_TESTS:-}" ] && {
    note "== every [gpu] test"
    all_gpu_tests 240
  }
  ;;
21)
  note "== every [gpu] test (the base GEMM accumulating onto a linear's rank-r term among them)"
  all_gpu_tests 200
  note "== in the step: the rank-r term first and the base GEMM accumulating onto it (base) against the addmm after it"
  note "   (after: QT_LORA_ADD_AFTER=1), 8B 2 x 2048 (two rounds) and 1B 4 x 2048 (three) at 80 GiB"
  ab_env ab_add_order_8b.log 150 8b-2x2048 80 "${ROUNDS:-2}" after QT_LORA_ADD_AFTER=1
  ab_env ab_add_order_1b.log 100 1b-4x2048 80 3 after QT_LORA_ADD_AFTER=1
  ;;
20)
  note "== the [fused_ops] and [lora] [gpu] tests (QT_LORA_GEMM_KERNELS=narrow in the model among them)"
  lora_gpu_tests 150
  note "== in the step: LoRA's gradients' kernel on q / k / v and o_proj only (narrow), on every node (grads), the loss's"
  note "   persistent tile grid (resident) against none of them, 8B 2 x 2048 at 80 GiB, three rounds"
  run ab_narrow_8b.log 330 --rows 8b-2x2048 --budget 80 --ab base= --ab narrow="--env QT_LORA_GEMM_KERNELS=narrow" \
    --ab grads="--env QT_LORA_GEMM_KERNELS=grads" --ab resident="--env QT_CE_RESIDENT_TILES=1" --rounds "${ROUNDS:-3}" \
    --steps 6 --warm 2
  note "== the same at 1B 4 x 2048 (base, narrow, resident), three rounds"
  run ab_narrow_1b.log 150 --rows 1b-4x2048 --budget 80 --ab base= --ab narrow="--env QT_LORA_GEMM_KERNELS=narrow" \
    --ab resident="--env QT_CE_RESIDENT_TILES=1" --rounds "${ROUNDS:-3}" --steps 6 --warm 2
  ;;
18)
  note "== the loss's logits in the plan's 2048-token tiles against the loss's own rule (768 tokens at this vocabulary;"
  note "   train.memory.loss_chunk_tokens=0), 1B 4 x 2048 and 8B 2 x 2048 at 80 GiB, two rounds"
  run ab_loss_tiles_1b.log 170 --rows 1b-4x2048 --budget 80 --ab wide= --ab rule="--set train.memory.loss_chunk_tokens=0" \
    --rounds "${ROUNDS:-2}" --steps 6 --warm 2
  run ab_loss_tiles_8b.log 240 --rows 8b-2x2048 --budget 80 --ab wide= --ab rule="--set train.memory.loss_chunk_tokens=0" \
    --rounds "${ROUNDS:-2}" --steps 6 --warm 2
  ;;
14)
  note "== issue 27: 8B 2 x 2048 at 80 GiB, ours alone (the default plan and code; MFU at this run's matrix rate)"
  run ours_80.log 120 --peers none --rows 8b-2x2048 --budget 80 --no-whole --steps 6 --warm 2
  ;;
13)
  note "== LoRA's rank-r GEMM kernels, the projection's second version: the [fused_ops] and [lora] [gpu] tests, their"
  note "   benchmark against cuBLAS with 1 to 8 CTAs a cluster, then each kernel alone and both against ATen's GEMMs"
  note "   (QT_LORA_GEMM_KERNELS=0), 8B 2 x 2048 at 80 GiB"
  lora_gpu_tests 200
  timeout 150 build-gpu/bench_lora_gemm >"$L/bench_lora_gemm.log" 2>&1
  note "bench_lora_gemm: exit $?"
  cat "$L/bench_lora_gemm.log" >>"$summary"
  run ab_lora_gemm.log 300 --rows 8b-2x2048 --budget 80 --ab aten="--env QT_LORA_GEMM_KERNELS=0" --ab both="--env QT_LORA_GEMM_KERNELS=1" --ab project="--env QT_LORA_GEMM_KERNELS=project" --ab grads="--env QT_LORA_GEMM_KERNELS=grads" \
    --rounds "${ROUNDS:-3}" --steps 6 --warm 2
  ;;
6)
  PROF_ROW=${PROF_ROW:---shape llama-3.1-8b --batch 2 --seq 2048}
  note "== issue 27: two profiled steps (the boundary between them included), $PROF_ROW, whole GPU"
  QT_PROFILE_STEP=4 QT_PROFILE_STEPS=2 timeout 240 build-gpu/qlora-train bench $PROF_ROW --out "$L/prof" \
    --steps 6 --warmup 2 >"$L/prof.log" 2>&1
  tail -n 1 "$L/prof.log" | cut -c1-300 >>"$summary"
  trace=$(find "$L/prof" -name profile_trace.json | head -n 1)
  [ -n "$trace" ] && python3 scripts/trace_summary.py "$trace" --top 80 --kernels lora_,fmha,sdpa,cudnn,rope_,swiglu_,rms_ \
    >"$L/trace_summary.txt" 2>&1 &&
    { head -n 40 "$L/trace_summary.txt"; grep -A 24 '^kernels matching' "$L/trace_summary.txt";
      grep -A 40 '^compute stream' "$L/trace_summary.txt"; } >>"$summary"
  grep -E '^\{' "$L/prof.log" | tail -n 1 | tr ',' '\n' | grep -E 'tokens_per_s|step_ms|mfu|wall' >>"$summary"
  rm -rf "$L/prof"  # (tens of MB; the summary is what comes back)
  ;;
*)
  echo "unknown call $CALL" >&2
  exit 2
  ;;
esac
