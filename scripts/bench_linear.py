"""Wall time of the linear probe on cached features vs re-running the frozen backbone every epoch.

A thin wrapper of ``cropbench bench --only linear`` (the logic lives in ``cropbench/bench.py``):
both train the same probe (same settings, sample order and init, centre-crop inputs) on the micro
synthetic data with a random-init ``resnet_micro``, so their top-1 agree and only the time differs:

    python scripts/bench_linear.py [--epochs 100] [--threads 2] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cropbench.bench import BenchOptions, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="probe epochs (default: the micro protocol's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    opts = BenchOptions(args.device, args.threads, only=("linear",), json_path=args.json, linear_epochs=args.epochs)
    sys.exit(run_bench(opts))


if __name__ == "__main__":
    main()
