#!/usr/bin/env bash
# Seed sweep of the micro image entries: every image job of results/golden/jobs.txt for the given seeds,
# each with its random-init encoder, then a per-entry report (scripts/seed_report.py).
#   scripts/seed_sweep.sh WORKDIR [SEED...]      # default seeds 0 1 2
# Golden records (seed 0) can be copied into WORKDIR/records first to skip re-running seed 0.
# SWEEP_DATASET=NAME pretrains and evaluates (kNN, linear) on another classification dataset, e.g.
# synth_clutter (results/micro_clutter.md); SWEEP_ARGS are added to every `cropbench run` (e.g.
# --resume, to evaluate a WORKDIR whose checkpoints are complete without training again).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:?usage: scripts/seed_sweep.sh WORKDIR [SEED...]}"
shift
seeds=("${@:-0 1 2}")
export CROPBENCH_DATA="${CROPBENCH_DATA:-$work/data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$work"
seed_args=()
for s in ${seeds[*]}; do seed_args+=(--seed "$s"); done
extra=()
if [ -n "${SWEEP_DATASET:-}" ]; then
  for key in data.dataset eval.knn.dataset eval.linear.dataset; do extra+=(--set "$key=$SWEEP_DATASET"); done
fi
# shellcheck disable=SC2206  # SWEEP_ARGS is a list of words on purpose
extra+=(${SWEEP_ARGS:-})
grep -v '^\s*#' results/golden/jobs.txt | while read -r entry variant evals flag; do
  [ -n "$entry" ] || continue
  case "$evals" in *knn*|*linear*) ;; *) continue ;; esac
  args=()
  for e in ${evals//,/ }; do args+=(--eval "$e"); done
  echo "-- $(date -u +%H:%M:%S) cropbench run $entry --variant $variant ${args[*]} ${seed_args[*]} ${extra[*]}"
  cropbench run "$entry" --variant "$variant" "${args[@]}" "${seed_args[@]}" "${extra[@]}" --random-init --quiet \
    --out "$work/records" --work-dir "$work/runs"
done
python scripts/seed_report.py "$work/records"
