"""Wall time of the linear probe on cached features vs re-running the frozen backbone every epoch.

Both train the same probe (same settings, same sample order, centre-crop inputs) on the micro
synthetic data with ``resnet_micro``, so their accuracies agree and only the time differs:

    python scripts/bench_linear.py [--epochs 10] [--threads 2] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from cropbench.backbones import resnet_micro
from cropbench.data import build_dataset, default_data_root
from cropbench.data.images import collate_images, normalize
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.features import extract_features, topk_accuracy
from cropbench.evaluations.linear import (
    LinearSettings,
    lr_at,
    make_probe,
    probe_scores,
    train_probe,
)


def cached(encoder: nn.Module, settings: LinearSettings, data: EvalData) -> float:
    """Extract once (no disk cache: the extraction is timed), then train on feature tensors."""
    t0 = time.perf_counter()
    kw = dict(resize=settings.resize, crop=settings.crop)
    x, y = extract_features(encoder, settings.dataset, data, "train", **kw)
    xv, yv = extract_features(encoder, settings.dataset, data, "val", **kw)
    t1 = time.perf_counter()
    probe = train_probe(x, y, int(y.max()) + 1, settings, seed=0)
    print(f"{'':>22}  (extraction {t1 - t0:.2f} s, probe {time.perf_counter() - t1:.2f} s)")
    return topk_accuracy(probe_scores(probe, xv), yv)["top1"]


@torch.no_grad()
def _features(encoder: nn.Module, images: Tensor, crop: int) -> Tensor:
    return encoder(normalize(TF.center_crop(images, [crop, crop])))


def uncached(encoder: nn.Module, settings: LinearSettings, data: EvalData) -> float:
    """The same probe, but every step runs the frozen backbone on its images again."""
    train = build_dataset(settings.dataset, "train", data.root, image_size=settings.resize)
    val = build_dataset(settings.dataset, "val", data.root, image_size=settings.resize)
    encoder.eval()
    gen = torch.Generator().manual_seed(0)
    classes = max(train.targets) + 1
    probe = make_probe(encoder.feat_dim, classes, settings.feature_bn, gen)
    opt = torch.optim.SGD(
        probe.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    for epoch in range(settings.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, epoch)
        for idx in torch.randperm(len(train), generator=gen).split(settings.batch_size):
            batch = collate_images([train[int(i)] for i in idx])
            loss = F.cross_entropy(probe(_features(encoder, batch.images, settings.crop)), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()
    batch = collate_images([val[i] for i in range(len(val))])
    with torch.no_grad():
        scores = probe(_features(encoder, batch.images, settings.crop))
    return topk_accuracy(scores, batch.labels)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = EvalData(args.data_root or default_data_root(), log=lambda _m: None)
    steps = (int(args.epochs * 0.6), int(args.epochs * 0.8))  # MoCo's 60/80 of 100, scaled
    settings = replace(LinearSettings(), epochs=args.epochs, milestones=steps)
    torch.manual_seed(0)
    encoder = resnet_micro()
    build_dataset(settings.dataset, "train", data.root)  # generate embedded data before timing
    print(f"linear probe: {settings.epochs} epochs, resnet_micro, {settings.dataset}, {args.threads} threads")
    times = {}
    for name, fn in (("cached features", cached), ("backbone every epoch", uncached)):
        t0 = time.perf_counter()
        top1 = fn(encoder, settings, data)
        times[name] = time.perf_counter() - t0
        print(f"{name:>22}: {times[name]:7.2f} s   top1 {top1:.2f}")
    print(f"{'speed-up':>22}: {times['backbone every epoch'] / times['cached features']:7.1f}x")


if __name__ == "__main__":
    main()
