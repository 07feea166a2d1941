"""Video SimCLR / MoCo / BYOL: the image objectives on two clips of the same video.

The ρ = 2 setting of Feichtenhofer et al., "A Large-Scale Study on Unsupervised Spatiotemporal
Representation Learning" (CVPR 2021): each positive pair is two clips taken at different times
of one video, each with its own spatial crop and colour augmentation (``methods.video_views``).
Objectives, heads and momentum encoders are the image baselines' (``simclr``, ``mocov2``,
``byol``); only the views change. The dataset decodes a ``window`` of frames per video; both
clips are drawn from it, so ``window`` bounds how far apart in time they can be.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cropbench.data.video import Window, with_window
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod, VideoBatch, View
from cropbench.methods.byol import BYOL
from cropbench.methods.heads import byol_mlp
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.momentum import momentum_copy
from cropbench.methods.simclr import SimCLR
from cropbench.methods.video_views import VideoViewConfig, make_video_view
from cropbench.registry import METHODS


class VideoViews:
    """Mixin for the video methods: decode ``cfg.window`` frames per sample, cut views on device.

    Host classes set ``view_configs`` (one ``VideoViewConfig`` per view) in ``__init__``.
    """

    modality = "video"
    view_configs: list[VideoViewConfig]
    view_names: list[str] | None = None

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        """Set the decode window: ``cfg.window`` frames at the native frame rate."""
        need = max(vc.span for vc in self.view_configs)
        if self.cfg.window < need:
            raise ConfigError(
                f"params.window: {self.cfg.window} frames, but a view needs {need} ((frames - 1) * stride + 1)"
            )
        return with_window(dataset, Window(self.cfg.window, 1))

    def make_views(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        return [make_video_view(batch.video, vc, generator, looped=batch.looped) for vc in self.view_configs]


@METHODS.register("vsimclr")
class VideoSimCLR(VideoViews, SimCLR):
    """SimCLR's NT-Xent over two clips of each video. BatchNorm: SimCLR's global BN (inherited)."""

    @dataclass(frozen=True)
    class Config:
        views: VideoViewConfig = field(default_factory=VideoViewConfig)  # both clips
        window: int = 32  # decoded frames per video sample (bounds the clips' time offset)
        hidden_dim: int = 2048  # projection MLP (SimCLR)
        out_dim: int = 128
        temperature: float = 0.1  # SimCLR ImageNet; Feichtenhofer et al. use 0.1 for ρSimCLR

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self.view_configs = [cfg.views, cfg.views]


@METHODS.register("vmoco")
class VideoMoCoV2(VideoViews, MoCoV2):
    """MoCo v2 (momentum key encoder, queue, InfoNCE) over two clips of each video.

    BatchNorm: MoCo v2's shuffle-BN (``batchnorm = "shuffle"``, inherited), as the image method.
    """

    @dataclass(frozen=True)
    class Config:
        views: VideoViewConfig = field(default_factory=VideoViewConfig)
        window: int = 32
        hidden_dim: int = 2048  # MoCo v2 MLP
        out_dim: int = 128
        temperature: float = 0.2  # MoCo v2
        queue_size: int = 65536  # MoCo v2 (K)
        momentum: float = 0.999  # MoCo v2 (m)
        shuffle_bn: bool = True  # MoCo's shuffle-BN for the key encoder (MoCoV2.Config)
        shuffle_bn_splits: int = 8  # BN groups of the key batch: MoCo's 8 GPUs (MoCoV2.Config)
        projector_bn: bool = False  # MoCoV2's option (BN projector); MoCo v2's plain MLP here

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self.view_configs = [cfg.views, cfg.views]


@METHODS.register("vbyol")
class VideoBYOL(VideoViews, BYOL):
    """BYOL (online predictor regresses an EMA target) over two clips of each video.

    BYOL's asymmetric blur / solarize probabilities apply to the per-clip image part.
    BatchNorm: BYOL's global BN (``batchnorm = "sync"``, inherited).
    """

    @dataclass(frozen=True)
    class Config:
        views: VideoViewConfig = field(default_factory=VideoViewConfig)
        window: int = 32
        blur_p: tuple[float, float] = (1.0, 0.1)  # BYOL Table 6
        solarize_p: tuple[float, float] = (0.0, 0.2)  # BYOL Table 6
        hidden_dim: int = 4096  # BYOL
        out_dim: int = 256  # BYOL
        base_momentum: float = 0.996  # BYOL τ_base
        final_momentum: float = 1.0

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        SSLMethod.__init__(self, cfg, backbone, ctx)  # BYOL.__init__ builds image views
        self.projector = byol_mlp(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        self.predictor = byol_mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)
        self.view_configs = [
            replace(cfg.views, image=replace(cfg.views.image, blur_p=b, solarize_p=s))
            for b, s in zip(cfg.blur_p, cfg.solarize_p, strict=True)
        ]
