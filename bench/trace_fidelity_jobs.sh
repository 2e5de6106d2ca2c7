#!/usr/bin/env bash
# The issue-13 trace-fidelity grid (bf16, traces cut at 4K, budgets 128-1024, every policy) for both demo
# models, as two background lanes, one per core. Every job is cut into PARTS interleaved parts (part K
# replays every PARTS-th trace from the K-th, so each part spans every writer model of a file ordered by
# model); both lanes walk all parts of all jobs in order and each part runs in the lane that takes its
# lock first (the other skips it), so the lanes share every job and finish together. Each part resumes
# from the job's results file (both lanes append to it under a lock), so run `start` again in any later
# session until `status` shows all done, then `tables`. Order: Qwen2.5-Coder-0.5B's GSM8K R1 traces,
# its MATH500 rows, then SmolLM2-135M's (~3.7x fewer FLOPs per token; its 8K context holds every 4K cut).
#   bash bench/trace_fidelity_jobs.sh start|stop|status|tables
# `tables` tabulates and stages a consistent copy of each results file (the live one keeps growing), so
# the lanes need not stop for it. They do not outlive the dev VM's session: `start` at each session's
# start (a restarted part replays Dense again to record the shared prefixes of its traces: a few minutes).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
TRACES=../shared/data/reasoning_traces
RESULTS=bench/results
COMMON=(--dtype bfloat16 --max-trace-tokens 4096 --batch 16
        --policies dense,raas,raas-capped,quest,h2o,streaming,random --budgets 128,256,512,1024)
JOBS="gsm8k_r1:qwen math500:qwen gsm8k_r1:smollm2 math500:smollm2"
LANES=(0 1)
PARTS=8  # small enough that the lane finishing first waits for at most one part of the other

# job (name:model) -> model id, trace file, traces chosen (spread evenly over the file), results file (no .jsonl)
describe() {
  local name=${1%%:*} model=${1##*:} id tag
  case "$model" in
    qwen) id=qwen2.5-coder-0.5b-instruct; tag=qwen05b ;;
    smollm2) id=smollm2-135m-instruct; tag=smollm2_bf16 ;;
  esac
  case "$name" in  # MATH500: all 260 rows; GSM8K: 200 DeepSeek-R1 traces
    math500) echo "$id $TRACES/five_models_math500_subset52.jsonl 260 fidelity_traces_math500_$tag" ;;
    gsm8k_r1) echo "$id $TRACES/deepseek_r1_gsm8k.jsonl 200 fidelity_traces_gsm8k_r1_$tag" ;;
  esac
}

case "${1:-status}" in
  start)
    for lane in "${LANES[@]}"; do
      if pgrep -f "trace_fidelity_jobs.sh lane $lane\$" >/dev/null; then echo "lane $lane: already running"; continue; fi
      nohup bash "$SELF" lane "$lane" >"/tmp/trace-fidelity-lane-$lane.log" 2>&1 &
      echo "lane $lane: started (logs /tmp/trace-fidelity-*.log)"
    done ;;
  lane)  # every part of every job not already taken by the other lane, in order; a failed part stops the lane
    for job in $JOBS; do
      read -r id file count out <<<"$(describe "$job")"
      for ((part = 0; part < PARTS; part++)); do
        rc=0  # the part's lock is held by its eval and released when it exits, however it exits
        OMP_NUM_THREADS=1 LEMMA_HOME="${LEMMA_HOME:-$PWD/weights}" flock -n -E 75 "/tmp/trace-fidelity-$out-$part.lock" \
          .venv/bin/lemma eval -m "$id" "${COMMON[@]}" --traces "$file" --sample "$count" --shard "$part/$PARTS" \
          --out "$RESULTS/$out.jsonl" >>"/tmp/trace-fidelity-$out-$part.log" 2>&1 || rc=$?
        case $rc in
          0) echo "$(date -u +%FT%TZ) $job: part $part/$PARTS of $count traces done" ;;
          75) echo "$(date -u +%FT%TZ) $job: part $part/$PARTS is the other lane's" ;;
          *) echo "$(date -u +%FT%TZ) $job: part $part/$PARTS failed ($rc): /tmp/trace-fidelity-$out-$part.log"; exit "$rc" ;;
        esac
      done
    done
    echo "$(date -u +%FT%TZ) lane done" ;;
  stop)
    pkill -f "trace_fidelity_jobs.sh (lane|start)" || true
    pkill -f "lemma eval .*fidelity_traces_" && echo "stopped" || echo "nothing running" ;;
  status)
    for job in $JOBS; do
      read -r id file count out <<<"$(describe "$job")"
      traces=$(grep -c '"kind": "trace"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      records=$(grep -c '"kind": "fidelity"' "$RESULTS/$out.jsonl" 2>/dev/null || true)
      echo "$job: ${traces:-0}/$count Dense traces, ${records:-0}/$((count * 24)) policy records"
    done ;;
  tables)  # safe while the lanes run: tables and plots of a locked copy, and that copy staged in git
    snap=$(mktemp -d)
    for job in $JOBS; do
      read -r id file count out <<<"$(describe "$job")"
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
