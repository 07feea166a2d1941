"""SimCLR (Chen et al. 2020, arXiv 2002.05709): two views, NT-Xent, 2N − 2 in-batch negatives.

The loss is the paper's eq. 1 (mean over the 2N anchors); the official code's is twice that (sum
of the two views' means, ``losses.nt_xent``), a constant factor on loss and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import simclr_projector
from cropbench.methods.losses import nt_xent
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import ViewGenerator


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    batchnorm = "sync"  # global BN: --global_bn True [google-research/simclr@383d414 run.py]

    @dataclass(frozen=True)
    class Config:
        hidden_dim: int = 2048  # projection MLP width = feature dim of R50 (SimCLR)
        out_dim: int = 128  # SimCLR projection output
        temperature: float = 0.1  # google-research/simclr ImageNet command (README @383d414)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        self.projector = simclr_projector(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        self.views = views

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2 = self.make_views(batch, generator)
        # one forward over both views: BN statistics over all 2N images, as the official code
        z = self.projector(self.backbone(torch.cat([v1.tensor, v2.tensor])))  # 2N×out_dim
        z1, z2 = z.chunk(2)
        return StepOutput(nt_xent(z1, z2, self.cfg.temperature, self.ctx.dist))

    def extra_repr(self) -> str:
        return f"temperature={self.cfg.temperature}"
