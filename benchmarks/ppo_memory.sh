#!/usr/bin/env bash
# Runs benchmarks/ppo_memory for every variant in its own process (peak RSS is per process) and prints a table and
# the JSON lines. Usage: benchmarks/ppo_memory.sh [BUILD_DIR] [extra flags for ppo_memory]
set -euo pipefail
build=${1:-build}
shift || true
bin="$build/benchmarks/ppo_memory"
results=()
for variant in full frozen lora; do
  for precision in fp32 bf16; do
    results+=("$("$bin" --variant "$variant" --precision "$precision" "$@" | tail -n 1)")
  done
done
printf '%-7s %-5s %14s %12s %12s %14s\n' variant dtype "trainable" "s/phase" "s training" "peak RSS MB"
for line in "${results[@]}"; do
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-7s %-5s %14d %12.2f %12.2f %14.0f" % (r["variant"], r["precision"], r["trainable_parameters"], r["seconds_per_phase"], r["seconds_training"], r["peak_rss_mb"]))' "$line"
done
printf '%s\n' "${results[@]}"
