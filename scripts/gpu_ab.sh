#!/usr/bin/env bash
# A/B of our trainer under several environment settings, interleaved, on the GPU machine (after a build into
# build-gpu): one `qlora-train bench` per (variant, row, round), the median tokens/s and the peak memory of each.
# Usage: ROWS="8b:2:2048 1b:4:2048" ROUNDS=2 bash scripts/gpu_ab.sh "NAME=[ENV=V ...][|bench args]" ...
#   e.g. bash scripts/gpu_ab.sh "base=" "kept=|--set train.memory.keep=attention" "prof=QT_PROFILE_STEP=3"
set -uo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-"8b:2:2048"}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-6}
WARM=${WARM:-2}
BIN=${BIN:-build-gpu/qlora-train}
OUTF=${OUT:-/tmp}/ab.jsonl
: >"$OUTF"
for round in $(seq 1 "$ROUNDS"); do
  for row in $ROWS; do
    IFS=: read -r shape batch seq <<<"$row"
    case $shape in 1b) s=llama-3.2-1b ;; 8b) s=llama-3.1-8b ;; *) s=$shape ;; esac
    for v in "$@"; do
      name=${v%%=*}
      spec=${v#*=}
      envs=${spec%%|*}
      args=""
      [[ $spec == *"|"* ]] && args=${spec#*|}
      line=$(env $envs "$BIN" bench --shape "$s" --batch "$batch" --seq "$seq" --steps "$STEPS" --warmup "$WARM" \
        --device cuda --out "/tmp/qt_ab_$name" $args 2>/tmp/qt_ab_err | tail -n 1)
      [ -z "$line" ] && line="{\"error\":\"$(tail -c 300 /tmp/qt_ab_err | tr '"\n' "' ")\"}"
      echo "{\"variant\":\"$name\",\"row\":\"$row\",\"round\":$round,\"result\":$line}" | tee -a "$OUTF"
      rm -rf "/tmp/qt_ab_$name"
    done
  done
done
python3 - "$OUTF" <<'EOF'
import json, statistics, sys, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    d = json.loads(l)
    rows[(d["row"], d["variant"])].append(d["result"])
print(f"| row | variant | tok/s (median of rounds) | runs | peak GiB |")
print("|---|---|---|---|---|")
for (row, v), rs in rows.items():
    ok = [r for r in rs if "tokens_per_s" in r]
    if not ok:
        print(f"| {row} | {v} | error: {rs[0].get('error', '')[:80]} | | |")
        continue
    t = statistics.median(r["tokens_per_s"] for r in ok)
    runs = ", ".join(format(r["tokens_per_s"], ",.0f") for r in ok)
    peak = max(r["peak_gib"] for r in ok)
    print(f"| {row} | {v} | {t:,.0f} | {runs} | {peak:.2f} |")
EOF
