"""Side by side: the torchvision and detectron2 backends of ``coco`` / ``voc`` on one checkpoint.

    python scripts/backends_side_by_side.py CHECKPOINT [--eval coco|voc] [--iterations N] [--data-root DIR]

Same encoder, same data, same Settings (the micro defaults with a shorter schedule); prints, per
backend, the training time per iteration (PreciseBN included, as both run it), the test time, and
the metrics after the same number of iterations. Needs detectron2 installed (README, detectron2).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from cropbench.config import from_dict
from cropbench.evaluations import coco, detection, voc
from cropbench.evaluations import detectron2_backend as d2
from cropbench.evaluations.base import EvalData
from cropbench.runner import load_encoder


def timed_training(backend: str, box: dict[str, float]) -> None:
    """Patch the training call of ``backend`` to record its wall time in ``box['train_s']``."""
    if backend == "torchvision":
        inner = detection.train_detector

        def wrapped(*a: object, **k: object) -> object:
            t = time.perf_counter()
            out = inner(*a, **k)
            box["train_s"] = time.perf_counter() - t
            return out

        for mod in (coco, voc):
            mod.train_detector = wrapped
        return
    from detectron2.engine import DefaultTrainer

    train = DefaultTrainer.train

    def d2_train(self: DefaultTrainer) -> object:
        t = time.perf_counter()
        out = train(self)
        box["train_s"] = time.perf_counter() - t
        return out

    DefaultTrainer.train = d2_train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--eval", default="coco", choices=["coco", "voc"])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("CROPBENCH_DATA", "~/.cache/cropbench/data")))
    args = p.parse_args()
    torch.set_num_threads(1)
    mod, it = (coco, args.iterations) if args.eval == "coco" else (voc, args.iterations)
    Settings = coco.CocoSettings if args.eval == "coco" else voc.VocSettings
    shared = {"iterations": it, "steps": [it * 2 // 3, it * 8 // 9], "warmup_iters": min(50, it // 2)}
    for backend in ("torchvision", "detectron2"):
        if backend == "detectron2" and not d2.available():
            print(f"detectron2: not installed ({d2.INSTALL_HINT})")
            continue
        box: dict[str, float] = {}
        timed_training(backend, box)
        s = from_dict(Settings, {**shared, "backend": backend}, args.eval)
        enc = load_encoder(args.checkpoint, torch.device("cpu"))
        t = time.perf_counter()
        m = mod.evaluate(enc, s, EvalData(root=args.data_root.expanduser(), seed=0, log=lambda _: None))
        total = time.perf_counter() - t
        main_metrics = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.endswith(("AP", "AP50")))
        print(
            f"{args.eval} {backend:<11} {it} it: train {box['train_s'] / it:.3f} s/it, "
            f"test {total - box['train_s']:.1f} s; {main_metrics}"
        )


if __name__ == "__main__":
    main()
