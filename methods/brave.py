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
The views are the ``narrow_broad`` generator's (``params.views``); the method holds one backbone
per broad view (``params.broad_backbones``, in the generator's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from cropbench.views.generators import NarrowBroad, ViewGenerator


@dataclass(frozen=True)
class BroadBackbone:
    """The backbone of one broad view (the view itself is the generator's: ``narrow_broad``)."""

    backbone: str = "r3d_micro"  # BACKBONES name
    backbone_args: dict[str, Any] = field(default_factory=dict)


def regression(h: Tensor, z: Tensor) -> Tensor:
    """BraVe's term 0.5·‖h/‖h‖ − sg(z)/‖z‖‖² (= 1 − cos), batch mean (via BYOL's 2 − 2·cos)."""
    return 0.5 * normalized_mse(h, z)


@METHODS.register("brave")
class BraVe(SSLMethod):
    modality = "video"

    # global BN: hk.BatchNorm(cross_replica_axis="i") [google-deepmind/brave@1ae5f0a modules.py]
    batchnorm = "sync"
    default_views = "narrow_broad"

    @dataclass(frozen=True)
    class Config:
        # one backbone per broad view of the generator, in its order (``params.views.broad``)
        broad_backbones: tuple[BroadBackbone, ...] = (BroadBackbone(),)
        window: int = 49  # decoded frames >= the longest broad span (+1 for frame differences)
        hidden_dim: int = 4096  # BraVe projector / predictor width
        out_dim: int = 128  # BraVe output dim
        predictor_grad_scale: float = 10.0  # BraVe: predictor gradients x10, before the optimizer

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        if not isinstance(views, NarrowBroad):
            raise ConfigError(f"params.views: BraVe needs the narrow_broad generator, got {type(views).__name__}")
        if len(cfg.broad_backbones) != len(views.cfg.broad):
            raise ConfigError(
                f"params.broad_backbones: one per broad view, got {len(cfg.broad_backbones)} for "
                f"{len(views.cfg.broad)} views (params.views.broad)"
            )
        self.broad_backbones = nn.ModuleList(build_backbone(b.backbone, **b.backbone_args) for b in cfg.broad_backbones)
        dims = {backbone.feat_dim, *(bb.feat_dim for bb in self.broad_backbones)}
        if len(dims) != 1:
            raise ConfigError(
                f"params.broad_backbones: the shared projector needs equal feature dims, got {sorted(dims)}"
            )
        d = backbone.feat_dim
        self.projector = mlp([d, cfg.hidden_dim, cfg.out_dim], hidden_norm="bn", last_norm="bn")
        self.predictor = mlp([cfg.out_dim, cfg.hidden_dim, cfg.out_dim], hidden_norm="bn")
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
        return self.groups_apart(self.predictor, grad_scale=self.cfg.predictor_grad_scale)
