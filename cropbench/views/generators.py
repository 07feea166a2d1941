"""View generators: the object a method receives to turn a batch into its views.

A method is *backbone + view generator + objective* (DESIGN.md). The generator is chosen in the
recipe (``params.views: {generator: NAME, ...}``, validated by the generator's ``Config``; every
entry names one, a recipe that names none gets the method's ``default_views`` name). Methods hold
no view settings. Generators compose (region
swap wraps another generator), never inherit through the method: a method calls ``self.views``.

    views = method.views(batch, generator)   # list[View], each with its provenance

Every generator draws its randomness from the explicit ``torch.Generator`` it is given, in a fixed
order (the goldens depend on it). Learned generators (ParamCrop's cube) are ``nn.Module``s whose
parameters the method's optimizer sees; the others hold no parameters.

Registered here: ``pair`` / ``single`` (image views sharing one ``ViewConfig``),
``asymmetric_pair`` (BYOL: per-view blur / solarize), ``clip_pair`` (two clips of each video, per
view photometric overrides, optionally one shared start), ``narrow_broad`` (BraVe). Generators
tied to a paper's mechanism register from that paper's module (``region_swap`` in
``methods/regioncl.py``, ``paramcrop_cube`` in ``methods/paramcrop.py``, ``cyborgs_masks`` in
``methods/cyborgs.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.errors import ConfigError
from cropbench.registry import Registry
from cropbench.types import EpochCurve, ImageBatch, VideoBatch, View
from cropbench.views.image import ViewConfig, make_view
from cropbench.views.video import VideoViewConfig, make_video_view, sample_starts

VIEW_GENERATORS: Registry = Registry("view generator")


class ViewGenerator(nn.Module, abc.ABC):
    """A batch -> its views (tensors + provenance), drawn from an explicit ``torch.Generator``.

    Subclasses set ``Config`` (a frozen dataclass: what the recipe's ``views`` section holds
    besides ``generator``), build themselves with ``from_config(cfg, stride)`` and implement
    ``forward``. ``span`` is the decoded window a video generator needs (0 for images). A generator
    with per-epoch statistics (ParamCrop's cube IoU) returns them from ``epoch_logs`` and declares
    their plot in ``epoch_curves``; the method's ``on_epoch_end`` / ``epoch_curves`` pass them on.
    """

    Config: ClassVar[type]
    description: ClassVar[str] = ""  # one line for ``cropbench list generators``
    modality: ClassVar[str] = "image"
    epoch_curves: ClassVar[tuple[EpochCurve, ...]] = ()

    @classmethod
    def from_config(cls, cfg: Any, stride: int | None = None) -> ViewGenerator:
        """The generator from its validated ``Config`` (``stride``: the backbone's output stride)."""
        return cls(cfg)  # type: ignore[call-arg]

    @abc.abstractmethod
    def forward(self, batch: Any, generator: torch.Generator) -> list[View]:
        """The views of ``batch``, drawn from ``generator``."""

    @property
    def span(self) -> int:
        return 0

    @property
    def grid_size(self) -> int | None:
        """The view side that must lie on the backbone's output grid (region swap), else None."""
        return None

    def reset_parameters(self) -> None:
        """(Re)draw the learned weights from the global RNG (none by default). ``build_method``
        builds the generator before the method and calls this after it: a learned generator's
        weights are drawn after the method's heads (the order the goldens pin)."""

    def epoch_logs(self, dist: DistContext) -> dict[str, float]:
        """Scalars of the epoch that just ended, reset for the next (none by default)."""
        return {}


# ---------------------------------------------------------------------------- image generators


@VIEW_GENERATORS.register("pair")
class PairViews(ViewGenerator):
    """``count`` independent views of each image under one ``ViewConfig`` (SimCLR, MoCo v2,
    SimSiam, DenseCL, HoughCL: two; the supervised control: one, registered as ``single``)."""

    Config = ViewConfig
    description = "two views of each image under one ViewConfig (SimCLR, MoCo v2, SimSiam, DenseCL, HoughCL)"
    count: int = 2

    def __init__(self, cfg: ViewConfig, count: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.count = self.count if count is None else count

    def forward(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        return [make_view(batch.images, self.cfg, generator) for _ in range(self.count)]


@VIEW_GENERATORS.register("single")
class SingleView(PairViews):
    """One view per image (the supervised positive control: one augmented view + its label)."""

    description = "one view of each image (the supervised control: one augmented view + its label)"
    count = 1


@dataclass(frozen=True)
class AsymmetricConfig:
    """BYOL's views (Table 6): a shared part and per-view blur / solarize probabilities."""

    views: ViewConfig = field(default_factory=ViewConfig)  # what the views share
    blur_p: tuple[float, ...] = (1.0, 0.1)  # BYOL Table 6: view 1 always blurred, view 2 rarely
    solarize_p: tuple[float, ...] = (0.0, 0.2)  # BYOL Table 6: only view 2 solarised


def photometric_pairs(blur_p: tuple[float, ...], solarize_p: tuple[float, ...], unit: str) -> list[tuple[float, float]]:
    """(blur_p, solarize_p) per view (or clip); the two lists must have one value per ``unit``."""
    if len(blur_p) != len(solarize_p):
        raise ConfigError(
            f"views.blur_p and views.solarize_p: one value per {unit}, got {len(blur_p)} and {len(solarize_p)}"
        )
    return list(zip(blur_p, solarize_p, strict=True))


@VIEW_GENERATORS.register("asymmetric_pair")
class AsymmetricPair(ViewGenerator):
    """One view per (blur_p, solarize_p) pair, each the shared ``ViewConfig`` with those two set."""

    Config = AsymmetricConfig
    description = "BYOL's two views: a shared ViewConfig with per-view blur / solarize probabilities"

    def __init__(self, cfg: AsymmetricConfig):
        super().__init__()
        self.cfg = cfg
        pairs = photometric_pairs(cfg.blur_p, cfg.solarize_p, "view")
        self.configs = [replace(cfg.views, blur_p=b, solarize_p=s) for b, s in pairs]

    def forward(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        return [make_view(batch.images, vc, generator) for vc in self.configs]


# ---------------------------------------------------------------------------- video generators


@dataclass(frozen=True)
class ClipConfig:
    """Two (or more) clips of each video (Feichtenhofer et al. CVPR 2021, ρ = 2)."""

    clip: VideoViewConfig = field(default_factory=VideoViewConfig)  # what the clips share
    # per-clip photometric overrides (BYOL's asymmetry on clips); empty: ``count`` identical configs
    blur_p: tuple[float, ...] = ()
    solarize_p: tuple[float, ...] = ()
    count: int = 2  # clips per video when no per-clip overrides are given
    shared_start: bool = False  # all clips start at one frame (VideoMoCo's query and key: one clip)


@VIEW_GENERATORS.register("clip_pair")
class ClipViews(ViewGenerator):
    """Clips cut from each decoded window: a time window, a spatial crop and per-clip colour."""

    Config = ClipConfig
    modality = "video"
    description = "two clips of each video (time window, crop, colour; per-clip overrides, optional shared start)"

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        image = cfg.clip.image
        pairs = photometric_pairs(cfg.blur_p, cfg.solarize_p, "clip")
        per_view = [replace(cfg.clip, image=replace(image, blur_p=b, solarize_p=s)) for b, s in pairs]
        self.configs = per_view or [cfg.clip] * cfg.count

    @property
    def span(self) -> int:
        return max(vc.span for vc in self.configs)

    @property
    def frames(self) -> int:
        """Frames of each clip (all clips share ``clip.frames``)."""
        return self.cfg.clip.frames

    def forward(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        starts = None
        if self.cfg.shared_start:
            starts = sample_starts(len(batch), batch.video.shape[2], self.cfg.clip, generator, batch.video.device)
        return [make_video_view(batch.video, vc, generator, starts, batch.looped) for vc in self.configs]


def frame_differences(x: Tensor) -> Tensor:
    """B×C×(T+1)×H×W -> B×C×T×H×W differences of consecutive frames (BraVe's flow stand-in)."""
    return x[:, :, 1:] - x[:, :, :-1]


@dataclass(frozen=True)
class BroadClip:
    """One broad view's clip and modality (the broad backbone is the method's, not the view's)."""

    view: VideoViewConfig
    modality: Literal["rgb", "diff"] = "rgb"  # "diff": frame differences, the stand-in for flow


@dataclass(frozen=True)
class NarrowBroadConfig:
    narrow: VideoViewConfig = field(default_factory=VideoViewConfig)
    broad: tuple[BroadClip, ...] = ()


@VIEW_GENERATORS.register("narrow_broad")
class NarrowBroad(ViewGenerator):
    """BraVe (ICCV 2021): a narrow clip and broad clips, all starting at the same frame; a "diff"
    broad view samples one more frame and returns the differences of consecutive frames."""

    Config = NarrowBroadConfig
    modality = "video"
    description = "BraVe: a narrow clip and broad clips (RGB or frame differences) starting at one frame"

    def __init__(self, cfg: NarrowBroadConfig):
        super().__init__()
        if not cfg.broad:
            raise ConfigError("views.broad: BraVe needs at least one broad view")
        self.cfg = cfg
        sampled = [replace(b.view, frames=b.view.frames + 1) if b.modality == "diff" else b.view for b in cfg.broad]
        self.configs = [cfg.narrow, *sampled]
        self.diff = [False] + [b.modality == "diff" for b in cfg.broad]

    @property
    def span(self) -> int:
        return max(vc.span for vc in self.configs)

    def forward(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        longest = max(self.configs, key=lambda vc: vc.span)
        starts = sample_starts(len(batch), batch.video.shape[2], longest, generator, batch.video.device)
        views = []
        for vc, diff in zip(self.configs, self.diff, strict=True):
            view = make_video_view(batch.video, vc, generator, starts, batch.looped)
            views.append(View(frame_differences(view.tensor), view.prov) if diff else view)
        return views


# ---------------------------------------------------------------------------- recipe selection


def build_views(spec: dict[str, Any], stride: int | None = None, where: str = "") -> ViewGenerator:
    """The generator a recipe's ``params.views`` names (``{generator: NAME, ...}``), its ``Config``
    validated strictly from the other keys: an unknown generator or key is a ``ConfigError``
    naming it. ``stride``: the backbone's output stride (region boxes lie on its grid)."""
    at = f"{where}: " if where else ""
    if not isinstance(spec, dict) or "generator" not in spec:
        raise ConfigError(f"{at}params.views: expected a mapping with a 'generator' key, got {spec!r}")
    name, params = spec["generator"], {k: v for k, v in spec.items() if k != "generator"}
    if not isinstance(name, str) or name not in VIEW_GENERATORS:
        known = ", ".join(VIEW_GENERATORS.names())
        raise ConfigError(f"{at}params.views.generator: unknown view generator {name!r}; expected one of {known}")
    cls = VIEW_GENERATORS.get(name)
    return cls.from_config(from_dict(cls.Config, params, where, "params.views"), stride)
