#!/usr/bin/env bash
# Micro-scale regression: re-run, from scratch, every job listed in results/golden/jobs.txt and
# `cropbench check` the fresh records against the committed golden records in results/golden/micro.
#   scripts/regression.sh WORKDIR            # what CI runs: seed 0 of every job
#   scripts/regression.sh WORKDIR --update   # regenerate the goldens: every job with its seeds (commit them, saying why)
# A job line is `ENTRY VARIANT EVAL[,EVAL...] [random-init] [seeds=N]`. With --update a job runs seeds
# 0..N-1 (`cropbench run ... --seed 0 --seed 1 ...`; N defaults to 3), so each golden is a
# distribution over N seeds and `cropbench check` compares a fresh seed with it (mean, std and a
# prediction interval: results/golden/tolerances.yaml). Without --update the seeds column is ignored.
# REGRESSION_DRY_RUN=1 prints the commands instead of running them (nothing is written);
# REGRESSION_JOBS=FILE reads the jobs from FILE instead of results/golden/jobs.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:?usage: scripts/regression.sh WORKDIR [--update]}"
update="${2:-}"
jobs="${REGRESSION_JOBS:-results/golden/jobs.txt}"
dry="${REGRESSION_DRY_RUN:-}"
default_seeds=3  # seeds per golden job when updating and the job line has no seeds=N
case "$update" in "" | --update) ;; *) echo "regression.sh: unknown option '$update' (expected --update)" >&2; exit 2 ;; esac
export CROPBENCH_DATA="${CROPBENCH_DATA:-$work/data}"
# Pin intra-op threads: the reduction order (and so the float result of a run) depends on it.
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
[ -n "$dry" ] || mkdir -p "$work"

# job_args ENTRY VARIANT EVALS [COLUMN...]: print one job's `cropbench run` arguments, one per line
job_args() {
  local entry="$1" variant="$2" evals="$3" seeds=1 col n e s
  shift 3
  printf '%s\n' "$entry" --variant "$variant"
  for e in ${evals//,/ }; do printf '%s\n' --eval "$e"; done
  if [ "$update" = "--update" ]; then seeds="$default_seeds"; fi
  for col in "$@"; do
    case "$col" in
      random-init) printf '%s\n' --random-init ;;
      seeds=*)
        n="${col#seeds=}"
        if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
          echo "$jobs: $entry $variant: '$col': seeds=N needs a whole number N >= 1" >&2
          return 2
        fi
        if [ "$update" = "--update" ]; then seeds="$n"; fi ;;
      *) echo "$jobs: $entry $variant: unknown column '$col' (expected random-init or seeds=N)" >&2; return 2 ;;
    esac
  done
  for ((s = 0; s < seeds; s++)); do printf '%s\n' --seed "$s"; done
}

grep -v '^\s*#' "$jobs" | while read -r entry variant evals flags; do
  [ -n "$entry" ] || continue
  [ -n "$evals" ] || { echo "$jobs: '$entry $variant': expected ENTRY VARIANT EVAL[,EVAL...]" >&2; exit 2; }
  # a command substitution carries job_args' exit status; `wait $!` on a process substitution raced
  # (under load the substitution could be reaped first, and the job was dropped with status 2)
  # shellcheck disable=SC2086  # flags: the optional columns, split on blanks
  job=$(job_args "$entry" "$variant" "$evals" $flags) || exit 2
  mapfile -t args <<<"$job"
  if [ -n "$dry" ]; then
    echo "cropbench run ${args[*]} --quiet --out $work/records --work-dir $work/runs"
    continue
  fi
  echo "-- $(date -u +%H:%M:%S) cropbench run ${args[*]}"
  cropbench run "${args[@]}" --quiet --out "$work/records" --work-dir "$work/runs"
done
if [ "$update" = "--update" ]; then
  if [ -n "$dry" ]; then
    echo "rm -rf results/golden/micro && cp -r $work/records/micro results/golden/micro"
  else
    rm -rf results/golden/micro
    cp -r "$work/records/micro" results/golden/micro
    echo "goldens regenerated from $work/records/micro"
  fi
fi
if [ -n "$dry" ]; then
  echo "cropbench check --scale micro --require-all --records $work/records"
else
  cropbench check --scale micro --require-all --records "$work/records"
fi
