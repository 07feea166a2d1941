"""IMPORT AS ``cropbench.methods.*`` (never ``methods.*``: the folder installs as cropbench.methods).

The contract every SSL method follows.

A method = backbone + view generator + objective. The trainer hands it a collated batch of
*canvases* (uint8, on the training device); the method builds its views there (batched, so the
GPU does the augmentation), computes the loss and returns a ``StepOutput``.

    out = method.training_step(batch, step, generator)    # views -> loss
    out.loss.backward(); optimizer.step()
    method.after_step(step)                               # momentum encoders, queues

Views carry *provenance*: where each came from in the source canvas (crop boxes, flips, and
method-specific extras such as RegionCL region boxes, CYBORGS mask ids or video time windows).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cropbench.dist import DistContext


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x


@dataclass
class ImageBatch:
    images: Tensor  # B×3×H×W uint8 canvases
    labels: Tensor  # B int64 (-1 when unlabelled)
    index: Tensor  # B int64 dataset indices
    masks: Tensor | None = None  # B×H×W int64 segment ids (CYBORGS), same geometry as images

    def to(self, device: torch.device) -> ImageBatch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class VideoBatch:
    video: Tensor  # B×C×T×H×W uint8 clips (T = the decoded window the views are cut from)
    labels: Tensor  # B int64
    index: Tensor  # B int64
    fps: float = 25.0
    looped: Tensor | None = None  # B bool: the source was shorter than the window and was looped

    def to(self, device: torch.device) -> VideoBatch:
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def __len__(self) -> int:
        return self.video.shape[0]


@dataclass
class ViewProvenance:
    """Where a batch of views came from, in source-canvas pixel coordinates."""

    boxes: Tensor  # B×4 float (x0, y0, x1, y1), source pixels; the crop before resizing
    flipped: Tensor  # B bool, horizontal flip applied after cropping
    source_size: tuple[int, int]  # (H, W) of the canvas
    output_size: tuple[int, int]  # (H, W) of the view tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # method-specific: region boxes, mask ids, time windows

    def to(self, device: torch.device) -> ViewProvenance:
        return replace(
            self,
            boxes=self.boxes.to(device),
            flipped=self.flipped.to(device),
            extra={k: v.to(device) for k, v in self.extra.items()},
        )


@dataclass
class View:
    tensor: Tensor  # B×3×h×w float, normalised (or B×C×T×h×w for video)
    prov: ViewProvenance


@dataclass
class StepOutput:
    loss: Tensor  # scalar, what backward() is called on
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars for the metrics log


BATCHNORM_MODES = ("sync", "shuffle", "local")  # values of ``SSLMethod.batchnorm``


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it is part of."""

    dist: DistContext = DistContext()
    steps_per_epoch: int = 1
    epochs: int = 1
    batch_size: int = 1  # per process
    num_workers: int = 0  # data.num_workers: decode workers for a method's own passes over the data (CYBORGS masks)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


class SSLMethod(nn.Module, abc.ABC):
    """Base class: subclasses set ``Config`` (a frozen dataclass) and implement ``make_views``
    (the views of one batch, with their provenance: ``cropbench views`` draws them) and
    ``training_step`` (views -> loss). An entry whose method lacks either cannot be instantiated."""

    Config: ClassVar[type]
    modality: ClassVar[str] = "image"
    # How BatchNorm statistics are shared between processes, declared per method as its official
    # code does it (the trainer reads it; each subclass cites its source): "sync" = SyncBN over all
    # processes (global BN), "shuffle" = MoCo's shuffle-BN for the key encoder and per-process BN
    # elsewhere, "local" = per-process BN. On CPU (gloo) torch has no SyncBN: "sync" runs local.
    batchnorm: ClassVar[str] = "local"
    # Whether some steps leave trainable parameters without a gradient (VideoMoCo's frame generator
    # before ``adversarial_from``): DDP then walks each step's autograd graph to find them, a cost
    # the other methods skip (tests/test_ddp.py trains every registered method under DDP).
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, cfg: Any, backbone: nn.Module, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.ctx = ctx

    @property
    def encoder(self) -> nn.Module:
        """The backbone that evaluations receive (the online / query encoder)."""
        return self.backbone

    @abc.abstractmethod
    def make_views(self, batch: Any, generator: torch.Generator) -> list[View]:
        """The views of ``batch`` (tensors + provenance), drawn from ``generator``."""

    @abc.abstractmethod
    def training_step(self, batch: Any, step: int, generator: torch.Generator) -> StepOutput:
        """One optimisation step's loss (and logs) on ``batch``."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (momentum updates)."""

    def on_epoch_start(self, epoch: int, trainer: Any) -> None:
        """Called before each epoch (e.g. CYBORGS regenerates masks here)."""

    def on_epoch_end(self, epoch: int, trainer: Any) -> dict[str, float]:
        """Called after each epoch; returned scalars go to the epoch log (e.g. ParamCrop IoU)."""
        return {}

    def prepare_dataset(self, dataset: Any, run_dir: Any) -> Any:
        """Wrap the training dataset if the method needs more per sample (CYBORGS adds masks).

        The trainer collates with ``dataset.collate`` when the dataset has one, else ``collate_images``.
        """
        return dataset

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group lr (SimSiam fixed predictor lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
