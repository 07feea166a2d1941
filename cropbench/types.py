"""The core data types every layer shares: collated batches and views with their provenance.

The data layer collates samples into ``ImageBatch`` / ``VideoBatch``; view operators
(``cropbench.views``) turn a batch into ``View``s whose ``ViewProvenance`` says where each view
came from in the source canvas (crop boxes, flips, and method-specific extras such as RegionCL
region boxes, CYBORGS mask ids or video time windows). Methods, evaluations and the plotting
module (``cropbench.viewplot``) read these types; this module imports nothing from cropbench.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


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


@dataclass(frozen=True)
class EpochCurve:
    """A per-epoch plot a method asks for, as data: ``cropbench.viewplot.draw_epoch_curves`` draws
    each ``(log key, legend label)`` of ``series`` against the epoch, from the epoch rows of the
    run's metrics (the scalars ``on_epoch_end`` returns), into ``file`` in the run folder."""

    file: str  # PNG name in the run folder
    title: str
    series: tuple[tuple[str, str], ...]  # (epoch-log key, legend label)
