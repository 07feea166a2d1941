"""Supervised pretraining: the positive control of every transfer table (He et al. 2016, arXiv
1512.03385; the "ImageNet supervised" row of MoCo, DenseCL and RegionCL).

One augmented view per image, the backbone's pooled feature, a linear classifier, cross-entropy
with the dataset's class labels. At micro it trains the same backbone on the same views and budget
as the micro SSL recipes, so its kNN / linear / dense numbers show what a good encoder scores there;
at small / paper the entry evaluates torchvision's ImageNet-supervised ResNet-50 through
``cropbench eval`` instead of pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import ViewGenerator


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the batch; an unlabelled sample (label -1) is an error, not skipped.

    logits: B×C, labels: B int64 in [0, C)."""
    n_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(
            f"supervised: labels must lie in [0, {n_classes}) (params.num_classes); got "
            f"{int(labels.min())}..{int(labels.max())}; -1 marks an unlabelled dataset, which cannot train it"
        )
    return F.cross_entropy(logits, labels)


@METHODS.register("supervised")
class Supervised(SSLMethod):
    """Supervised pretraining: cross-entropy of a linear classifier on the backbone's pooled features."""

    default_views = "single"  # one augmented view + its label
    batchnorm = "local"  # torchvision's classification reference uses per-GPU BN unless --sync-bn is given

    @dataclass(frozen=True)
    class Config:
        num_classes: int = 1000  # ImageNet-1k; micro: the 10 texture classes of synth_images

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        if cfg.num_classes < 2:
            raise ValueError(f"params.num_classes must be >= 2, got {cfg.num_classes}")
        self.classifier = nn.Linear(backbone.feat_dim, cfg.num_classes)  # torchvision ResNet ``fc``
        self.views = views

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        (view,) = self.make_views(batch, generator)
        logits = self.classifier(self.backbone(view.tensor))  # B×num_classes
        loss = supervised_loss(logits, batch.labels)
        acc = (logits.argmax(1) == batch.labels).float().mean().item() * 100.0
        return StepOutput(loss, {"train_top1": acc})

    def extra_repr(self) -> str:
        return f"num_classes={self.cfg.num_classes}"
