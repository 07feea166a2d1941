#!/usr/bin/env bash
# One prepared device check (issue 14): run it on a lent GPU machine from the repository root.
# Needs no internet: only this repository and a Python environment with torch, torchvision and
# cropbench's dependencies (a .venv here is activated; cropbench itself is installed offline with
# `pip install --no-deps --no-build-isolation -e .` when it is not importable).
#
#   OUT=/some/folder bash scripts/gpu_check.sh        # logs, JSON and summary.txt go to $OUT
#
# Steps, in priority order, each bounded by `timeout`; the whole script stays under
# GPU_CHECK_BUDGET seconds (default 390, i.e. < 7 min; a step that no longer fits is skipped):
#   env      nvidia-smi, torch / CUDA / cuDNN / NCCL versions, device name, bf16 support
#   data     the embedded synth_images data set (generated, no download)
#   bench    cropbench bench --device cuda: views on the GPU, the micro step, the ResNet-50 224-px
#            SimCLR step in bf16 + channels_last with images/s and the fraction of the bf16 peak
#   compile  micro SimCLR pretraining on CUDA (bf16, channels_last), train.epochs=1, train.compile=true
#   nccl     the same pretraining under torchrun (1 process): the joined-launch path, NCCL, DDP
#   e2e      cropbench bench --only e2e: `cropbench run simclr --eval knn` at micro, wall time
#   bench_compile  the ResNet-50 step again with --set train.compile=true (both sides compiled)
#   bench_cpu      views and step on this machine's CPU cores (quick sizes), for comparison
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-390}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cropbench-gpu-check.XXXXXX")
export CROPBENCH_DATA=${CROPBENCH_DATA:-$WORK/data}
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS CMD...: run CMD under `timeout` (cut to the budget left), log to $OUT/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    say "SKIP $name: the time budget is spent"
    return 0
  fi
  say "=== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  # through bash -c, so CMD may be one of the exported functions below
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 30 "$OUT/$name.log"
  local why=""
  ((rc == 124 || rc == 137)) && why=" TIMEOUT"
  say "--- $name: exit $rc$why after $(($(date +%s) - t0)) s (log: $OUT/$name.log)"
}

# ---------------------------------------------------------------- Python environment
if [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
PY=${PYTHON:-python}
if ! "$PY" -c "import cropbench.bench" >/dev/null 2>&1; then
  say "cropbench is not importable: installing it offline (pip --no-deps --no-build-isolation -e .)"
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/pip_install.log" 2>&1 ||
    say "offline install failed (see $OUT/pip_install.log); the steps below will fail to import cropbench"
fi
CB=("$PY" -m cropbench)
export PY OUT WORK

# ---------------------------------------------------------------- steps (exported: run by bash -c)
env_info() {
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF2'
import os

import torch
import torchvision

print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| CUDA", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(), "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
    print("bf16 supported:", torch.cuda.is_bf16_supported(), "| NCCL", torch.cuda.nccl.version())
print("CPU cores:", os.cpu_count(), "| torch threads:", torch.get_num_threads())
EOF2
}

has_compile() {
  "$PY" -c "import dataclasses as d, cropbench.recipe as r; exit('compile' not in {f.name for f in d.fields(r.TrainConfig)})"
}

# pretrain NAME LAUNCHER [--set ...]: micro SimCLR on CUDA (bf16 + channels_last are the CUDA
# defaults), one epoch, then kNN; LAUNCHER is the command line before `run`
pretrain() {
  local name=$1 launcher=$2
  shift 2
  $launcher run simclr --device cuda --eval knn --set train.epochs=1 \
    --work-dir "$WORK/$name/runs" --out "$WORK/$name/records" "$@"
}

compile_run() {
  if has_compile; then
    pretrain compile "$PY -m cropbench" --set train.compile=true
  else
    echo "train.compile is not a recipe key in this checkout (the --compile change has not landed):"
    echo "running the same pretraining without it"
    pretrain compile "$PY -m cropbench"
  fi
}

nccl_run() {
  # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*: cropbench run joins that launch (NCCL
  # on CUDA, DDP); one process, as there is one GPU. NCCL_DEBUG=INFO shows whether NCCL started.
  NCCL_DEBUG=INFO pretrain nccl "$PY -m torch.distributed.run --standalone --nproc-per-node 1 -m cropbench" \
    2>&1 | tee "$WORK/nccl.out"
  local rc=${PIPESTATUS[0]}
  echo "NCCL INFO lines: $(grep -c 'NCCL INFO' "$WORK/nccl.out") (0: NCCL never started)"
  return "$rc"
}
export -f env_info has_compile pretrain compile_run nccl_run

step env 30 env_info
step data 60 "${CB[@]}" data synth --only synth_images --root "$CROPBENCH_DATA"
step bench 150 "${CB[@]}" bench --device cuda --only views,step,gpu --json "$OUT/bench_cuda.json"
step compile 120 compile_run
step nccl 90 nccl_run
step e2e 100 "${CB[@]}" bench --device cuda --only e2e --json "$OUT/bench_e2e.json"
if has_compile; then
  step bench_compile 150 "${CB[@]}" bench --device cuda --quick --only gpu --set train.compile=true \
    --json "$OUT/bench_cuda_compile.json"
fi
step bench_cpu 60 "${CB[@]}" bench --device cpu --threads "$(getconf _NPROCESSORS_ONLN)" --quick --only views,step \
  --json "$OUT/bench_cpu.json"

say "total $(($(date +%s) - START)) s of a ${BUDGET}-s budget; outputs in $OUT"
rm -rf "$WORK"
