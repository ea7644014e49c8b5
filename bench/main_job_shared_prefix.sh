#!/usr/bin/env bash
# The README's main job with shared_prefix on (the default) and off, seeds 0 and 1, one at a time under
# the CPU lock; each finished run's small files go to results/main-job/<shared|plain>-s<seed>/ (rerun:
# runs already there are skipped). Then: .venv/bin/python bench/main_job_backends.py
set -euo pipefail
cd "$(dirname "$0")/.."
for run in ${RUNS:-shared-s0 plain-s0 shared-s1 plain-s1}; do
  variant=${run%-s*}; seed=${run##*-s}
  dest=results/main-job/$run
  [ -f "$dest/eval_after.json" ] && { echo "$run: done already"; continue; }
  flag=true; [ "$variant" = plain ] && flag=false
  out=runs/main-$run; rm -rf "$out"; mkdir -p "$out"
  # an empty baseline-eval cache: each run evaluates its untrained model itself, as a newcomer's first run does
  TEPO_BASELINE_EVALS="$out/baseline-evals" \
  flock /tmp/tepo-cpu.lock /usr/bin/time -v -o "$out/time.txt" .venv/bin/tepo train --config recipes/quickstart.yaml \
    --output_dir "$out" --seed "$seed" --shared_prefix "$flag"
  mkdir -p "$dest"
  cp "$out"/{run.json,metrics.jsonl,eval_before.json,eval_after.json,monitor.json,time.txt} "$dest"/
  echo "$run: $(grep 'Elapsed' "$dest/time.txt")"
done
