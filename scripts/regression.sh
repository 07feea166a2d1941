#!/usr/bin/env bash
# Micro-scale regression: re-run, from scratch, the jobs listed in results/golden/jobs.txt and
# `cropbench check` the fresh records against the committed goldens.
#   scripts/regression.sh WORKDIR                  # what CI runs: seed 0 of every job, whole or traced
#   scripts/regression.sh WORKDIR --all            # seed 0 of every job whole (and every trace)
#   scripts/regression.sh WORKDIR --update         # regenerate the goldens: every job whole with its seeds,
#                                                  # and every trace (commit them, saying why)
#   scripts/regression.sh WORKDIR --update-traces  # regenerate the trace goldens only
# A job line is `ENTRY VARIANT EVAL[,EVAL...] [random-init] [seeds=N] [trace=K]`.
# Whole: `cropbench run` pretrains the whole schedule and evaluates. With --update a job runs seeds
# 0..N-1 (N defaults to 3), so each golden is a distribution over N seeds and `cropbench check`
# compares a fresh seed with it (mean, std and a prediction interval: results/golden/tolerances.yaml).
# Traced (`trace=K`): CI does not re-run the job whole but `cropbench run ... --trace-epochs K --seed 0`,
# the first K epochs of the same schedule, and checks epoch K's mean loss and the first step's loss
# against results/golden/traces (tolerances in results/golden/traces/tolerances.yaml). Every job with
# a trace is still re-run whole by --all and --update.
# REGRESSION_DRY_RUN=1 prints the commands instead of running them (nothing is written);
# REGRESSION_JOBS=FILE reads the jobs from FILE instead of results/golden/jobs.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:?usage: scripts/regression.sh WORKDIR [--all | --update | --update-traces]}"
mode="${2:-}"
jobs="${REGRESSION_JOBS:-results/golden/jobs.txt}"
dry="${REGRESSION_DRY_RUN:-}"
golden=results/golden
traces="$golden/traces"
default_seeds=3  # seeds per golden job when updating and the job line has no seeds=N
case "$mode" in "" | --all | --update | --update-traces) ;; *)
  echo "regression.sh: unknown option '$mode' (expected --all, --update or --update-traces)" >&2
  exit 2
  ;;
esac
export CROPBENCH_DATA="${CROPBENCH_DATA:-$work/data}"
# Pin intra-op threads: the reduction order (and so the float result of a run) depends on it.
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
[ -r "$jobs" ] || { echo "regression.sh: cannot read the jobs file '$jobs'" >&2; exit 2; }
[ -n "$dry" ] || mkdir -p "$work"

# job_args ENTRY VARIANT EVALS [COLUMN...]: print one job's whole `cropbench run` arguments, one per
# line, then a line `trace=K` (K empty: the job has no trace)
job_args() {
  local entry="$1" variant="$2" evals="$3" seeds=1 col n e s trace=""
  shift 3
  printf '%s\n' "$entry" --variant "$variant"
  for e in ${evals//,/ }; do printf '%s\n' --eval "$e"; done
  if [ "$mode" = "--update" ]; then seeds="$default_seeds"; fi
  for col in "$@"; do
    case "$col" in
      random-init) printf '%s\n' --random-init ;;
      seeds=*)
        n="${col#seeds=}"
        if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
          echo "$jobs: $entry $variant: '$col': seeds=N needs a whole number N >= 1" >&2
          return 2
        fi
        if [ "$mode" = "--update" ]; then seeds="$n"; fi ;;
      trace=*)
        trace="${col#trace=}"
        if ! [[ "$trace" =~ ^[1-9][0-9]*$ ]]; then
          echo "$jobs: $entry $variant: '$col': trace=K needs a whole number of epochs K >= 1" >&2
          return 2
        fi ;;
      *) echo "$jobs: $entry $variant: unknown column '$col' (expected random-init, seeds=N or trace=K)" >&2; return 2 ;;
    esac
  done
  for ((s = 0; s < seeds; s++)); do printf '%s\n' --seed "$s"; done
  printf 'trace=%s\n' "$trace"
}

# say_or_run CMD...: print the command (dry run) or run it
say_or_run() {
  if [ -n "$dry" ]; then echo "$*"; else "$@"; fi
}

whole_jobs=()  # "ENTRY/VARIANT" of each job re-run whole in this mode (CI's golden subset)
traced=0
while read -r entry variant evals flags; do
  [ -n "$entry" ] || continue
  [ -n "$evals" ] || { echo "$jobs: '$entry $variant': expected ENTRY VARIANT EVAL[,EVAL...]" >&2; exit 2; }
  # a command substitution carries job_args' exit status; `wait $!` on a process substitution raced
  # (under load the substitution could be reaped first, and the job was dropped with status 2)
  # shellcheck disable=SC2086  # flags: the optional columns, split on blanks
  job=$(job_args "$entry" "$variant" "$evals" $flags) || exit 2
  mapfile -t args <<<"$job"
  trace="${args[-1]#trace=}"
  unset 'args[-1]'
  runs=()
  if [ "$mode" != "--update-traces" ] && { [ -z "$trace" ] || [ -n "$mode" ]; }; then
    runs+=("${args[*]} --quiet --out $work/records --work-dir $work/runs")
    whole_jobs+=("$entry/$variant")
  fi
  if [ -n "$trace" ]; then
    runs+=("$entry --variant $variant --trace-epochs $trace --seed 0 --quiet --out $work/traces --work-dir $work/runs")
    traced=1
  fi
  for r in "${runs[@]}"; do
    if [ -n "$dry" ]; then
      echo "cropbench run $r"
      continue
    fi
    echo "-- $(date -u +%H:%M:%S) cropbench run ${r%% --quiet*}"
    # shellcheck disable=SC2086  # r: the arguments, none of which holds a blank
    cropbench run $r
  done
done < <(grep -v '^\s*#' "$jobs")
if [ "${#whole_jobs[@]}" -eq 0 ] && [ "$traced" = 0 ]; then
  echo "regression.sh: $jobs has no job for this mode (a line: ENTRY VARIANT EVAL[,EVAL...] [random-init] [seeds=N] [trace=K])" >&2
  exit 2
fi

case "$mode" in
  --update)
    say_or_run rm -rf "$golden/micro"
    say_or_run cp -r "$work/records/micro" "$golden/micro"
    [ -n "$dry" ] || echo "goldens regenerated from $work/records/micro" ;;
esac
if [ "$mode" = "--update" ] || [ "$mode" = "--update-traces" ]; then
  if [ "$traced" = 1 ]; then
    say_or_run rm -rf "$traces/micro"
    say_or_run cp -r "$work/traces/micro" "$traces/micro"
    [ -n "$dry" ] || echo "trace goldens regenerated from $work/traces/micro"
  fi
fi

if [ "${#whole_jobs[@]}" -gt 0 ]; then
  against="$golden"
  if [ -z "$mode" ]; then
    # CI re-runs some jobs whole: check them against their own goldens only (with --require-all,
    # every one of them must have been run); the traced jobs are checked against their traces
    against="$work/golden-whole"
    say_or_run mkdir -p "$against/micro"
    say_or_run cp "$golden/tolerances.yaml" "$against/"
    for j in "${whole_jobs[@]}"; do
      say_or_run mkdir -p "$against/micro/${j%%/*}"
      for d in "$golden/micro/$j" "$golden/micro/$j+random_init"; do
        if [ -n "$dry" ] || [ -d "$d" ]; then say_or_run cp -r "$d" "$against/micro/${j%%/*}/"; fi
      done
    done
  fi
  say_or_run cropbench check --scale micro --require-all --records "$work/records" --golden "$against"
fi
if [ "$traced" = 1 ]; then
  say_or_run cropbench check --scale micro --require-all --records "$work/traces" --golden "$traces"
fi
