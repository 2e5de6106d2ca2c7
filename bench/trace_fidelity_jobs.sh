#!/usr/bin/env bash
# The issue-13 trace-fidelity grid (bf16, traces cut at 4K, budgets 128-1024, every policy) as two
# background jobs, one per core; each resumes from its results file, so run `start` again in any later
# session until both are done, then `tables`. MODEL: qwen (Qwen2.5-Coder-0.5B, the default) or smollm2
# (SmolLM2-135M: its 8K context holds every 4K cut).
#   bash bench/trace_fidelity_jobs.sh start|stop|status|tables [qwen|smollm2]
set -euo pipefail
cd "$(dirname "$0")/.."
TRACES=../shared/data/reasoning_traces
RESULTS=bench/results
case "${2:-qwen}" in
  qwen) MODEL=qwen2.5-coder-0.5b-instruct; TAG=qwen05b ;;
  smollm2) MODEL=smollm2-135m-instruct; TAG=smollm2_bf16 ;;
  *) echo "model must be qwen or smollm2, got ${2}" >&2; exit 2 ;;
esac
COMMON=(-m "$MODEL" --dtype bfloat16 --max-trace-tokens 4096 --batch 16
        --policies dense,raas,raas-capped,quest,h2o,streaming,random --budgets 128,256,512,1024)
# name, trace file, stages (traces spread evenly over the file, each stage resuming the one before, so a
# run stopped early covers every writer model), results file. MATH500: all 260 rows; GSM8K: 200 R1 traces.
JOBS=("math500 $TRACES/five_models_math500_subset52.jsonl 52,130,260 fidelity_traces_math500_$TAG"
      "gsm8k_r1 $TRACES/deepseek_r1_gsm8k.jsonl 200 fidelity_traces_gsm8k_r1_$TAG")

case "${1:-status}" in
  start)
    for job in "${JOBS[@]}"; do
      read -r name file stages out <<<"$job"
      if pgrep -f "lemma eval .*$out.jsonl" >/dev/null; then echo "$name: already running"; continue; fi
      (for count in ${stages//,/ }; do
         OMP_NUM_THREADS=1 LEMMA_HOME="${LEMMA_HOME:-$PWD/weights}" .venv/bin/lemma eval "${COMMON[@]}" \
           --traces "$file" --sample "$count" --out "$RESULTS/$out.jsonl" || exit
       done) >"/tmp/$name-$TAG.log" 2>&1 &
      disown
      echo "$name: started, stages $stages (log /tmp/$name-$TAG.log)"
    done ;;
  stop)
    pkill -f "trace_fidelity_jobs.sh start" || true
    pkill -f "lemma eval .*fidelity_traces_" && echo "stopped (every model's jobs)" || echo "nothing running" ;;
  status)
    for job in "${JOBS[@]}"; do
      read -r name file stages out <<<"$job"
      count=${stages##*,}
      traces=$(grep -c '"kind": "trace"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      records=$(grep -c '"kind": "fidelity"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      echo "$name: ${traces:-0}/$count Dense traces, ${records:-0}/$((count * 24)) policy records"
    done ;;
  tables)
    for job in "${JOBS[@]}"; do
      read -r name file stages out <<<"$job"
      .venv/bin/python -m bench.fidelity_tables "$RESULTS/$out.jsonl" --plots >"$RESULTS/$out.md"
      echo "$RESULTS/$out.md"
    done ;;
  *) echo "usage: $0 start|stop|status|tables [qwen|smollm2]" >&2; exit 2 ;;
esac
