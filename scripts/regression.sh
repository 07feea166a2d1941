#!/usr/bin/env bash
# Micro-scale regression: re-run, from scratch, every job listed in results/golden/jobs.txt
# (ENTRY VARIANT EVAL[,EVAL...] [random-init]) and `cropbench check` the fresh records against the
# committed golden records in results/golden/micro.
#   scripts/regression.sh WORKDIR            # what CI runs
#   scripts/regression.sh WORKDIR --update   # regenerate the goldens (commit them, saying why)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:?usage: scripts/regression.sh WORKDIR [--update]}"
update="${2:-}"
export CROPBENCH_DATA="${CROPBENCH_DATA:-$work/data}"
# Pin intra-op threads: the reduction order (and so the float result of a run) depends on it.
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$work"
grep -v '^\s*#' results/golden/jobs.txt | while read -r entry variant evals flag; do
  [ -n "$entry" ] || continue
  args=()
  for e in ${evals//,/ }; do args+=(--eval "$e"); done
  [ "$flag" = "random-init" ] && args+=(--random-init)
  echo "-- $(date -u +%H:%M:%S) cropbench run $entry --variant $variant ${args[*]}"
  cropbench run "$entry" --variant "$variant" "${args[@]}" --quiet --out "$work/records" --work-dir "$work/runs"
done
if [ "$update" = "--update" ]; then
  rm -rf results/golden/micro
  cp -r "$work/records/micro" results/golden/micro
  echo "goldens regenerated from $work/records/micro"
fi
cropbench check --scale micro --require-all --records "$work/records"
