"""BraVe (Recasens et al., ICCV 2021, arXiv 2103.16559): a narrow view (short, high resolution)
and one or more broad views (long, low resolution, possibly another modality), each through its
own backbone, one shared projector + predictor, and a symmetric regression loss.

Following the released code (papers.md §4.2): the broad window starts where the narrow clip
starts; a video shorter than the broad window is looped (``VideoBatch.looped``, also in the
views' provenance); broad RGB gets a random 2-D convolution on top of the narrow view's
augmentations; one projector (Linear-BN-ReLU-Linear-BN) and one predictor (Linear-BN-ReLU-Linear)
serve every direction; each term is 0.5·‖h/‖h‖ − sg(z)/‖z‖‖² between the prediction h of one view
and the stop-gradient projection z of the other (no EMA target), averaged over all directions;
the predictor's *gradient* is ×10 before the optimizer sees it (the released
``_scale_by_module_name`` runs first in the optax chain, so under LARS the trust ratio
normalises most of it away; it is not an lr ×10). Optical flow is replaced by frame differences of the broad
clip (``modality: diff``), a deviation the entry records. The evaluated encoder is the narrow one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cropbench.backbones import build_backbone
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import mlp
from cropbench.methods.losses import normalized_mse
from cropbench.methods.vssl import clip_window
from cropbench.registry import METHODS
from cropbench.types import VideoBatch
from cropbench.views.generators import BroadClip, NarrowBroad, NarrowBroadConfig, ViewGenerator
from cropbench.views.image import ViewConfig
from cropbench.views.video import VideoViewConfig


def narrow_view() -> VideoViewConfig:
    """Micro narrow view: 8 frames every 2, 32 px (BraVe: 16 frames every 2 at 224 px)."""
    return VideoViewConfig(
        8,
        2,
        ViewConfig(size=32, scale=(0.3, 1.0), ratio=(0.5, 2.0), jitter_order="fixed", blur_p=0.5),
    )


def broad_view() -> VideoViewConfig:
    """Micro broad view: 16 frames every 3, 24 px, random conv (BraVe: 64 every 4 at 112 px)."""
    image = ViewConfig(size=24, scale=(0.3, 1.0), ratio=(0.5, 2.0), jitter_order="fixed", blur_p=0.5)
    return VideoViewConfig(16, 3, image, random_conv_p=1.0)


@dataclass(frozen=True)
class BroadView:
    view: VideoViewConfig = field(default_factory=broad_view)
    modality: Literal["rgb", "diff"] = "rgb"  # "diff": frame differences, the stand-in for flow
    backbone: str = "r3d_micro"  # each broad view has its own backbone (BACKBONES name)
    backbone_args: dict[str, Any] = field(default_factory=dict)


def regression(h: Tensor, z: Tensor) -> Tensor:
    """BraVe's term 0.5·‖h/‖h‖ − sg(z)/‖z‖‖² (= 1 − cos), batch mean (via BYOL's 2 − 2·cos)."""
    return 0.5 * normalized_mse(h, z)


@METHODS.register("brave")
class BraVe(SSLMethod):
    modality = "video"

    # global BN: hk.BatchNorm(cross_replica_axis="i") [google-deepmind/brave@1ae5f0a modules.py]
    batchnorm = "sync"

    @dataclass(frozen=True)
    class Config:
        narrow: VideoViewConfig = field(default_factory=narrow_view)
        broad: tuple[BroadView, ...] = (BroadView(),)
        window: int = 49  # decoded frames >= the longest broad span (+1 for frame differences)
        hidden_dim: int = 4096  # BraVe projector / predictor width
        out_dim: int = 128  # BraVe output dim
        predictor_grad_scale: float = 10.0  # BraVe: predictor gradients x10, before the optimizer

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator | None = None):
        super().__init__(cfg, backbone, ctx)
        if not cfg.broad:
            raise ConfigError("params.broad: BraVe needs at least one broad view")
        self.broad_backbones = nn.ModuleList(build_backbone(b.backbone, **b.backbone_args) for b in cfg.broad)
        dims = {backbone.feat_dim, *(bb.feat_dim for bb in self.broad_backbones)}
        if len(dims) != 1:
            raise ConfigError(f"params.broad: the shared projector needs equal feature dims, got {sorted(dims)}")
        d = backbone.feat_dim
        self.projector = mlp([d, cfg.hidden_dim, cfg.out_dim], hidden_norm="bn", last_norm="bn")
        self.predictor = mlp([cfg.out_dim, cfg.hidden_dim, cfg.out_dim], hidden_norm="bn")
        if views is None:
            clips = tuple(BroadClip(b.view, b.modality) for b in cfg.broad)
            views = NarrowBroad(NarrowBroadConfig(cfg.narrow, clips))
        self.views = views

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)

    def training_step(self, batch: VideoBatch, step: int, generator: torch.Generator) -> StepOutput:
        narrow, *broad = self.make_views(batch, generator)
        z_n = self.projector(self.backbone(narrow.tensor))  # B×out_dim
        p_n = self.predictor(z_n)
        terms, logs = [], {}
        for i, (view, net) in enumerate(zip(broad, self.broad_backbones, strict=True)):
            z_b = self.projector(net(view.tensor))
            p_b = self.predictor(z_b)
            pair = [regression(p_n, z_b), regression(p_b, z_n)]  # narrow -> broad, broad -> narrow
            logs[f"loss_broad{i}"] = (pair[0] + pair[1]).detach() / 2
            terms += pair
        return StepOutput(torch.stack(terms).mean(), logs)

    def param_groups(self) -> list[dict[str, Any]]:
        """One lr for all; the predictor's gradients ×``predictor_grad_scale`` before the optimizer
        (``grad_scale``, applied by cropbench.optim as BraVe's ``_scale_by_module_name``)."""
        pred = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in pred]
        return [
            {"params": rest},
            {"params": list(self.predictor.parameters()), "grad_scale": self.cfg.predictor_grad_scale},
        ]
