"""SimCLR (Chen et al. 2020, arXiv 2002.05709): two views, NT-Xent, 2N − 2 in-batch negatives.

The loss is the paper's eq. 1 (mean over the 2N anchors); the official code's is twice that (sum
of the two views' means, ``losses.nt_xent``), a constant factor on loss and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import simclr_projector
from cropbench.methods.losses import nt_xent
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import PairViews, ViewGenerator
from cropbench.views.image import ViewConfig


def simclr_views() -> ViewConfig:
    """SimCLR ImageNet views: crop scale 0.08, colour strength 1 (0.8·(1, 1, 1, 0.25)), blur 0.5."""
    return ViewConfig(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5)


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    batchnorm = "sync"  # global BN: --global_bn True [google-research/simclr@383d414 run.py]

    @dataclass(frozen=True)
    class Config:
        views: ViewConfig = field(default_factory=simclr_views)  # SimCLR paper appendix A
        hidden_dim: int = 2048  # projection MLP width = feature dim of R50 (SimCLR)
        out_dim: int = 128  # SimCLR projection output
        temperature: float = 0.1  # google-research/simclr ImageNet command (README @383d414)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator | None = None):
        super().__init__(cfg, backbone, ctx)
        self.projector = simclr_projector(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        self.views = views if views is not None else PairViews(cfg.views)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2 = self.make_views(batch, generator)
        # one forward over both views: BN statistics over all 2N images, as the official code
        z = self.projector(self.backbone(torch.cat([v1.tensor, v2.tensor])))  # 2N×out_dim
        z1, z2 = z.chunk(2)
        return StepOutput(nt_xent(z1, z2, self.cfg.temperature, self.ctx.dist))

    def extra_repr(self) -> str:
        return f"temperature={self.cfg.temperature}"
