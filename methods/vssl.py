"""Video SimCLR / MoCo / BYOL: the image objectives on two clips of the same video; and the
supervised positive control on clips (``vsupervised``).

The ρ = 2 setting of Feichtenhofer et al., "A Large-Scale Study on Unsupervised Spatiotemporal
Representation Learning" (CVPR 2021): each positive pair is two clips taken at different times
of one video, each with its own spatial crop and colour augmentation (``cropbench.views.video``).
Objectives, heads and momentum encoders are the image baselines' (``simclr``, ``mocov2``,
``byol``); only the views change. The dataset decodes a ``window`` of frames per video; both
clips are drawn from it, so ``window`` bounds how far apart in time they can be.

``vsupervised`` is the video analogue of ``supervised`` (the "supervised" rows of the video SSL
papers' tables: an R3D / R(2+1)D trained with Kinetics-400 labels): cross-entropy of a linear
classifier on the pooled clip feature, with the training set's action labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cropbench.data.video import Window, with_window
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, StepOutput
from cropbench.methods.byol import BYOL
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.simclr import SimCLR
from cropbench.methods.supervised import Supervised, supervised_loss
from cropbench.registry import METHODS
from cropbench.types import VideoBatch
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


@METHODS.register("vsupervised")
class VideoSupervised(Supervised):
    """Supervised pretraining on clips: the positive control of the video evaluations.

    Each clip the generator cuts (micro: one per video, ``clip_pair`` with ``count: 1``) is
    classified from the backbone's pooled feature; the loss is the mean cross-entropy over the
    clips, each with its video's label (``supervised_loss``: an unlabelled video, label -1, is an
    error). It reads only the training split (``data.train_split``: UCF101 split-1 ``trainlist01``
    at micro), never a test video. BatchNorm: per-process, as ``supervised``.
    """

    modality = "video"
    default_views = "clip_pair"

    @dataclass(frozen=True)
    class Config(Supervised.Config):
        num_classes: int = 400  # Kinetics-400; micro: the 10 classes of synth_ucf101
        window: int = 32  # decoded frames per video sample (bounds where a clip can start)

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)

    def training_step(self, batch: VideoBatch, step: int, generator: torch.Generator) -> StepOutput:
        clips = self.make_views(batch, generator)  # K views, each B×3×T×H×W
        logits = torch.cat([self.classifier(self.backbone(v.tensor)) for v in clips])  # (K·B)×C
        labels = batch.labels.repeat(len(clips))  # clip k of video b has b's label
        loss = supervised_loss(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean().item() * 100.0
        return StepOutput(loss, {"train_top1": acc})
