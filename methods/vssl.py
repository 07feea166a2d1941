"""Video SimCLR / MoCo / BYOL: the image objectives on two clips of the same video.

The ρ = 2 setting of Feichtenhofer et al., "A Large-Scale Study on Unsupervised Spatiotemporal
Representation Learning" (CVPR 2021): each positive pair is two clips taken at different times
of one video, each with its own spatial crop and colour augmentation (``cropbench.views.video``).
Objectives, heads and momentum encoders are the image baselines' (``simclr``, ``mocov2``,
``byol``); only the views change. The dataset decodes a ``window`` of frames per video; both
clips are drawn from it, so ``window`` bounds how far apart in time they can be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cropbench.data.video import Window, with_window
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext
from cropbench.methods.byol import BYOL
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.simclr import SimCLR
from cropbench.registry import METHODS
from cropbench.views.generators import ViewGenerator


def clip_window(dataset: Any, window: int, views: ViewGenerator) -> Any:
    """The dataset decoding ``window`` frames per sample at the native frame rate; an error when
    a view of ``views`` needs more (``params.window``)."""
    if window < views.span:
        raise ConfigError(f"params.window: {window} frames, but a view needs {views.span} ((frames - 1) * stride + 1)")
    return with_window(dataset, Window(window, 1))


@METHODS.register("vsimclr")
class VideoSimCLR(SimCLR):
    """SimCLR's NT-Xent over two clips of each video. BatchNorm: SimCLR's global BN (inherited)."""

    modality = "video"
    default_views = "clip_pair"

    @dataclass(frozen=True)
    class Config(SimCLR.Config):  # SimCLR's heads and temperature (0.1, as Feichtenhofer et al.)
        window: int = 32  # decoded frames per video sample (bounds the clips' time offset)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)


@METHODS.register("vmoco")
class VideoMoCoV2(MoCoV2):
    """MoCo v2 (momentum key encoder, queue, InfoNCE) over two clips of each video.

    BatchNorm: MoCo v2's shuffle-BN (``batchnorm = "shuffle"``, inherited), as the image method.
    """

    modality = "video"
    default_views = "clip_pair"

    @dataclass(frozen=True)
    class Config(MoCoV2.Config):  # MoCo v2's defaults, declared once (``MoCoV2.Config``)
        window: int = 32

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)


@METHODS.register("vbyol")
class VideoBYOL(BYOL):
    """BYOL (online predictor regresses an EMA target) over two clips of each video.

    BYOL's asymmetric blur / solarize probabilities apply to the per-clip image part.
    BatchNorm: BYOL's global BN (``batchnorm = "sync"``, inherited).
    """

    modality = "video"
    default_views = "clip_pair"

    @dataclass(frozen=True)
    class Config(BYOL.Config):  # BYOL's heads, momentum and Table 6 blur / solarize per clip
        window: int = 32

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)
