#!/usr/bin/env bash
# The issue-13 trace-fidelity grid (bf16, traces cut at 4K, budgets 128-1024, every policy) for both demo
# models, as two background lanes, one per core. Each lane runs its jobs in order and each job resumes
# from its results file, so run `start` again in any later session until `status` shows all done, then
# `tables`. Qwen2.5-Coder-0.5B's MATH500 rows on one core (the most work left: ~60 core-hours on
# 2026-12-04); its GSM8K R1 traces, then SmolLM2-135M (~3.7x fewer FLOPs per token; its 8K context holds
# every 4K cut) on the other (~30).
#   bash bench/trace_fidelity_jobs.sh start|stop|status|tables
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
TRACES=../shared/data/reasoning_traces
RESULTS=bench/results
COMMON=(--dtype bfloat16 --max-trace-tokens 4096 --batch 16
        --policies dense,raas,raas-capped,quest,h2o,streaming,random --budgets 128,256,512,1024)
LANES=("gsm8k_r1:qwen gsm8k_r1:smollm2 math500:smollm2" "math500:qwen")

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
    for lane in "${LANES[@]}"; do
      if pgrep -f "trace_fidelity_jobs.sh lane $lane" >/dev/null; then echo "lane '$lane': already running"; continue; fi
      nohup bash "$SELF" lane "$lane" >"/tmp/trace-fidelity-lane-${lane%% *}.log" 2>&1 &
      echo "lane '$lane': started (logs /tmp/trace-fidelity-*.log)"
    done ;;
  lane)  # one core's jobs in order; a failed job stops its lane
    for job in $2; do
      read -r id file stages out <<<"$(describe "$job")"
      for count in ${stages//,/ }; do
        echo "$(date -u +%FT%TZ) $job: $count traces"
        OMP_NUM_THREADS=1 LEMMA_HOME="${LEMMA_HOME:-$PWD/weights}" .venv/bin/lemma eval -m "$id" "${COMMON[@]}" \
          --traces "$file" --sample "$count" --out "$RESULTS/$out.jsonl" >"/tmp/trace-fidelity-$out.log" 2>&1
      done
    done
    echo "$(date -u +%FT%TZ) lane done" ;;
  stop)
    pkill -f "trace_fidelity_jobs.sh (lane|start)" || true
    pkill -f "lemma eval .*fidelity_traces_" && echo "stopped" || echo "nothing running" ;;
  status)
    for job in ${LANES[*]}; do
      read -r id file stages out <<<"$(describe "$job")"
      count=${stages##*,}
      traces=$(grep -c '"kind": "trace"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      records=$(grep -c '"kind": "fidelity"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      echo "$job: ${traces:-0}/$count Dense traces, ${records:-0}/$((count * 24)) policy records"
    done ;;
  tables)
    for job in ${LANES[*]}; do
      read -r id file stages out <<<"$(describe "$job")"
      [ -s "$RESULTS/$out.jsonl" ] || continue
      .venv/bin/python -m bench.fidelity_tables "$RESULTS/$out.jsonl" --plots >"$RESULTS/$out.md"
      echo "$RESULTS/$out.md"
    done ;;
  *) echo "usage: $0 start|stop|status|tables" >&2; exit 2 ;;
esac
