"""SimSiam (Chen & He 2021, arXiv 2011.10566): one shared encoder, a predictor, stop-gradient,
symmetric negative cosine; MoCo v2 augmentation; the predictor keeps a fixed lr (``--fix-pred-lr``).

Reusable parts (RegionCL-S builds on them): ``project`` / ``predict`` and ``siamese_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import simsiam_predictor, simsiam_projector
from cropbench.methods.losses import negative_cosine, symmetric
from cropbench.optim import check_lr_scale
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import ViewGenerator


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    batchnorm = "sync"  # convert_sync_batchnorm [facebookresearch/simsiam@a7bc177 main_simsiam.py]

    @dataclass(frozen=True)
    class Config:
        dim: int = 2048  # projector width and output (simsiam --dim)
        pred_dim: int = 512  # predictor bottleneck (simsiam --pred-dim)
        fix_pred_lr: bool = True  # simsiam --fix-pred-lr: predictor lr not decayed by the schedule
        pred_lr_scale: float = 1.0  # predictor lr multiplier (SimSiam: 1; a micro deviation when not 1)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        check_lr_scale("params.pred_lr_scale", cfg.pred_lr_scale)
        self.projector = simsiam_projector(backbone.feat_dim, cfg.dim)
        self.predictor = simsiam_predictor(cfg.dim, cfg.pred_dim)
        self.views = views

    def project(self, x: Tensor) -> Tensor:
        """B×3×h×w -> B×dim projections z."""
        return self.projector(self.backbone(x))

    def predict(self, z: Tensor) -> Tensor:
        return self.predictor(z)

    def siamese_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        """L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)) (SimSiam eq. 2)."""
        return symmetric(negative_cosine, p1, p2, z1, z2, weight=0.5)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2 = self.make_views(batch, generator)
        z1, z2 = self.project(v1.tensor), self.project(v2.tensor)
        p1, p2 = self.predict(z1), self.predict(z2)
        return StepOutput(self.siamese_loss(p1, p2, z1, z2))

    def param_groups(self) -> list[dict[str, Any]]:
        """Encoder + projector follow the schedule; the predictor gets ``fixed_lr`` if asked."""
        return self.groups_apart(self.predictor, fixed_lr=self.cfg.fix_pred_lr, lr_scale=self.cfg.pred_lr_scale)
