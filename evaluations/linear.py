"""Linear probe on frozen, cached features (MoCo ``main_lincls`` protocol).

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020),
Sec. 4.1 and facebookresearch/moco ``main_lincls.py``: a linear classifier (weights N(0, 0.01),
bias 0) on the frozen encoder's pooled features, SGD momentum 0.9, lr 30, batch 256, weight decay
0, 100 epochs, lr × 0.1 at epochs 60 and 80. The backbone runs once: features are extracted and
cached, then only the linear layer trains on the feature tensors.

Selection rules, both reported and named by the metric: ``top1`` / ``top5`` are the LAST epoch's;
``top1_best`` is the best validation top-1 over all epochs (``best_acc1`` of MoCo's
``main_lincls.py``, the number RegionCL's linear log reports as "best"; it selects on the
validation set, so it is optimistic). A reference says which one it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropbench.errors import ConfigError
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.features import (
    FEATURE_PRESETS,
    MICRO_CROP,
    MICRO_RESIZE,
    extract_features,
    topk_accuracy,
)


@dataclass(frozen=True)
class LinearSettings:
    """Linear-probe protocol; defaults are MoCo's (see the module docstring).

    Reports the last epoch (``top1``, ``top5``) and the best epoch (``top1_best``): see the module
    docstring. Deviation from MoCo: it trains on RandomResizedCrop + flip views;
    we train on the cached features of the centre crop (Resize + CenterCrop, the validation
    transform), one per image: no backbone pass per epoch, usually a little less accurate.
    """

    dataset: str = "synth_images"  # registered dataset: train on train_split, report on val_split
    epochs: int = 100  # MoCo main_lincls
    lr: float = 30.0  # MoCo main_lincls, at batch 256 (no scaling rule)
    momentum: float = 0.9
    weight_decay: float = 0.0  # MoCo main_lincls
    batch_size: int = 256  # feature vectors per SGD step
    schedule: Literal["step", "cosine"] = "step"  # step: × 0.1 at each milestone; cosine: per epoch
    milestones: tuple[int, ...] = (60, 80)  # epochs (MoCo main_lincls --schedule 60 80)
    feature_bn: bool = False  # MAE: BatchNorm1d without affine before the linear layer
    resize: int = MICRO_RESIZE  # shorter side before the centre crop (features.py); paper scale: 256
    crop: int = MICRO_CROP  # centre crop (features.py); paper scale: 224
    extract_batch_size: int = 256  # images per feature-extraction batch
    train_split: str = "train"
    val_split: str = "val"


def lr_at(settings: LinearSettings, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based), as MoCo's ``adjust_learning_rate``."""
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))
    return settings.lr * 0.1 ** sum(epoch >= m for m in settings.milestones)


def make_probe(dim: int, num_classes: int, feature_bn: bool, generator: torch.Generator) -> nn.Sequential:
    """[BatchNorm1d(affine=False)] + Linear(dim, C), weights N(0, 0.01) and bias 0 (MoCo)."""
    fc = nn.Linear(dim, num_classes)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * 0.01)
        fc.bias.zero_()
    layers = [nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc] if feature_bn else [fc]
    return nn.Sequential(*layers)


def train_probe(
    feats: Tensor,
    labels: Tensor,
    num_classes: int,
    settings: LinearSettings,
    seed: int = 0,
    after_epoch: Callable[[nn.Module], None] | None = None,
) -> nn.Sequential:
    """Train the probe on N×D features, N labels (on their device); returns it in eval() mode.

    ``after_epoch(probe)`` runs after every epoch with the probe in eval() mode (validation)."""
    if settings.epochs < 1 or settings.batch_size < 1:
        raise ConfigError(
            f"linear: epochs and batch_size must be >= 1, got {settings.epochs} and {settings.batch_size}"
        )
    gen = torch.Generator().manual_seed(seed)
    probe = make_probe(feats.shape[1], num_classes, settings.feature_bn, gen).to(feats.device)
    opt = torch.optim.SGD(
        probe.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    probe.train()
    for epoch in range(settings.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, epoch)
        order = torch.randperm(feats.shape[0], generator=gen).to(feats.device)
        for idx in order.split(settings.batch_size):
            if settings.feature_bn and idx.numel() < 2:
                continue  # BatchNorm cannot normalise a batch of one
            loss = F.cross_entropy(probe(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if after_epoch is not None:
            after_epoch(probe.eval())
            probe.train()
    return probe.eval()


@torch.no_grad()
def probe_scores(probe: nn.Module, feats: Tensor, chunk: int = 4096) -> Tensor:
    """N×D features -> N×C logits, in chunks."""
    return torch.cat([probe(f) for f in feats.split(chunk)])


@register_evaluation("linear", LinearSettings, metrics=("top1", "top5", "top1_best"), presets=FEATURE_PRESETS)
def evaluate_linear(encoder: nn.Module, settings: LinearSettings, data: EvalData) -> dict[str, float]:
    """Linear probe on frozen cached features; top-1/top-5 (percent) at the last epoch, and the
    best epoch's top-1 (``top1_best``, MoCo main_lincls ``best_acc1``)."""
    kw = dict(resize=settings.resize, crop=settings.crop, batch_size=settings.extract_batch_size)
    train_x, train_y = extract_features(encoder, settings.dataset, data, settings.train_split, **kw)
    val_x, val_y = extract_features(encoder, settings.dataset, data, settings.val_split, **kw)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    device = torch.device(data.device)
    val_x = val_x.to(device)
    per_epoch: list[float] = []  # validation top-1 after each epoch

    def validate(probe: nn.Module) -> None:
        per_epoch.append(topk_accuracy(probe_scores(probe, val_x).cpu(), val_y, (1,))["top1"])

    probe = train_probe(train_x.to(device), train_y.to(device), num_classes, settings, data.seed, validate)
    out = topk_accuracy(probe_scores(probe, val_x).cpu(), val_y, (1, 5))
    best = max(range(len(per_epoch)), key=per_epoch.__getitem__)  # first epoch reaching the max
    data.log(f"linear: top1 {out['top1']:.2f} (last epoch), {per_epoch[best]:.2f} (best, epoch {best + 1})")
    return {**out, "top1_best": per_epoch[best]}
