#!/usr/bin/env bash
# The issue-13 trace-fidelity grid (bf16, traces cut at 4K, budgets 128-1024, every policy) for both demo
# models, as two background lanes, one per core. Each lane runs its jobs in order and each job resumes
# from its results file, so run `start` again in any later session until `status` shows all done, then
# `tables`. Every job is split in two shards (every other trace) that append to the same results file,
# one per lane, so both cores work on Qwen2.5-Coder-0.5B's GSM8K R1 traces, then its MATH500 rows (the
# most work: ~65 core-hours left on 2026-12-04), then SmolLM2-135M's (~3.7x fewer FLOPs per token; its
# 8K context holds every 4K cut), and the lanes finish together.
#   bash bench/trace_fidelity_jobs.sh start|stop|status|tables
# The lanes can keep running across sessions: `tables` tabulates and stages a consistent copy of each
# results file (the live one keeps growing), so there is no need to stop them (a restart replays Dense
# again to record the shared prefixes of its group: ~10-15 minutes per lane).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
TRACES=../shared/data/reasoning_traces
RESULTS=bench/results
COMMON=(--dtype bfloat16 --max-trace-tokens 4096 --batch 16
        --policies dense,raas,raas-capped,quest,h2o,streaming,random --budgets 128,256,512,1024)
JOBS="gsm8k_r1:qwen math500:qwen gsm8k_r1:smollm2 math500:smollm2"
LANES=(0/2 1/2)  # the shard of every job each lane replays

# job (name:model) -> model id, trace file, stages (traces spread evenly over the file, each stage resuming
# the one before, so a run stopped early covers every writer model), results file (no .jsonl)
describe() {
  local name=${1%%:*} model=${1##*:} id tag
  case "$model" in
    qwen) id=qwen2.5-coder-0.5b-instruct; tag=qwen05b ;;
    smollm2) id=smollm2-135m-instruct; tag=smollm2_bf16 ;;
  esac
  case "$name" in  # MATH500: all 260 rows; GSM8K: 200 DeepSeek-R1 traces
    math500) echo "$id $TRACES/five_models_math500_subset52.jsonl 52,130,260 fidelity_traces_math500_$tag" ;;
    gsm8k_r1) echo "$id $TRACES/deepseek_r1_gsm8k.jsonl 200 fidelity_traces_gsm8k_r1_$tag" ;;
  esac
}

case "${1:-status}" in
  start)
    for shard in "${LANES[@]}"; do
      if pgrep -f "trace_fidelity_jobs.sh lane $shard" >/dev/null; then echo "lane $shard: already running"; continue; fi
      nohup bash "$SELF" lane "$shard" >"/tmp/trace-fidelity-lane-${shard%/*}.log" 2>&1 &
      echo "lane $shard: started (logs /tmp/trace-fidelity-*.log)"
    done ;;
  lane)  # one core's shard of every job, in order; a failed job stops its lane
    shard=$2
    for job in $JOBS; do
      read -r id file stages out <<<"$(describe "$job")"
      for count in ${stages//,/ }; do
        echo "$(date -u +%FT%TZ) $job: shard $shard of $count traces"
        OMP_NUM_THREADS=1 LEMMA_HOME="${LEMMA_HOME:-$PWD/weights}" .venv/bin/lemma eval -m "$id" "${COMMON[@]}" \
          --traces "$file" --sample "$count" --shard "$shard" --out "$RESULTS/$out.jsonl" \
          >"/tmp/trace-fidelity-$out-${shard%/*}.log" 2>&1
      done
    done
    echo "$(date -u +%FT%TZ) lane done" ;;
  stop)
    pkill -f "trace_fidelity_jobs.sh (lane|start)" || true
    pkill -f "lemma eval .*fidelity_traces_" && echo "stopped" || echo "nothing running" ;;
  status)
    for job in $JOBS; do
      read -r id file stages out <<<"$(describe "$job")"
      count=${stages##*,}
      traces=$(grep -c '"kind": "trace"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      records=$(grep -c '"kind": "fidelity"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      echo "$job: ${traces:-0}/$count Dense traces, ${records:-0}/$((count * 24)) policy records"
    done ;;
  tables)  # safe while the lanes run: tables and plots of a locked copy, and that copy staged in git
    snap=$(mktemp -d)
    for job in $JOBS; do
      read -r id file stages out <<<"$(describe "$job")"
      [ -s "$RESULTS/$out.jsonl" ] || continue
      flock "$RESULTS/$out.jsonl" cp "$RESULTS/$out.jsonl" "$snap/"  # the lanes append under the same lock
      blob=$(git hash-object -w "$snap/$out.jsonl")
      if [ "$blob" = "$(git rev-parse -q --verify "HEAD:$RESULTS/$out.jsonl")" ]; then
        echo "$RESULTS/$out.jsonl: no new records since HEAD"; continue
      fi
      .venv/bin/python -m bench.fidelity_tables "$snap/$out.jsonl" --plots >"$RESULTS/$out.md"
      cp "$snap/$out".png "$snap/$out"-position.png "$RESULTS/"
      git update-index --add --cacheinfo "100644,$blob,$RESULTS/$out.jsonl"
      git add "$RESULTS/$out.md" "$RESULTS/$out".png "$RESULTS/$out"-position.png
      echo "$RESULTS/$out.md: staged with the $(grep -c . "$snap/$out.jsonl") lines it tabulates (commit without -a)"
    done
    rm -rf "$snap" ;;
  *) echo "usage: $0 start|stop|status|tables" >&2; exit 2 ;;
esac
