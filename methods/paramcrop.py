"""ParamCrop (Qing et al., arXiv 2108.10501): a learned, differentiable cubic crop, trained
adversarially against the video encoder, on top of SimCLR / MoCo / BYOL.

A small MLP maps a noise vector to the two views' cubes (per view: a scale and a centre on each
of the t, y, x axes). Scales are squashed into ``[min, max]`` and centres into
``[scale/2, 1 − scale/2]``, so every cube stays inside the decoded window. The cube is cut by
trilinear 3-D affine sampling (``cube_sample``), so the contrastive loss is differentiable in
the crop parameters; a gradient-reversal layer between the parameters and the sampler makes the
crop MLP *maximise* the loss the encoder minimises (harder views), bounded by the scale limits.
ParamCrop is a view generator (``paramcrop_cube``, an ``nn.Module``), not a method: the entry
picks the framework (``method: vsimclr | vmoco | vbyol``) and names the generator in
``params.views``. Each epoch logs the mean 3-D IoU and centre distance of the two views; the
generator declares their curve (``epoch_curves``, passed on by the method), which the trainer has
``cropbench.viewplot`` redraw every epoch (``paramcrop_views.png`` in the run folder): the
quantities the paper shows evolving.

Everything about the MLP (noise size, depth, one generator for both views) and the bounds is
[UNVERIFIED] (no code was released; papers.md §1.2) and recorded as deviations in the entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from cropbench.dist import DistContext, all_reduce_mean
from cropbench.errors import ConfigError
from cropbench.types import EpochCurve, VideoBatch, View, ViewProvenance
from cropbench.views.generators import VIEW_GENERATORS, ViewGenerator
from cropbench.views.image import hflip
from cropbench.views.video import VideoViewConfig, cube_centre_distance, cube_iou, photometric
from cropbench.views.video_transforms import cube_sample, normalize_video


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Identity forward; backward multiplies the gradient by −``weight`` (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, weight)


def params_to_cubes(
    p: Tensor,
    spatial: tuple[float, float],
    temporal: tuple[float, float],
    window: int,
    size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """B×6 parameters in (0, 1): (scale t, y, x; position t, y, x) -> boxes B×4 (x0, y0, x1, y1)
    in canvas pixels and times B×2 (t0, t1) in window frames, always inside the window."""
    lo = p.new_tensor([temporal[0], spatial[0], spatial[0]])
    hi = p.new_tensor([temporal[1], spatial[1], spatial[1]])
    scale = lo + (hi - lo) * p[:, :3]  # fraction of the extent per axis
    centre = scale / 2 + (1 - scale) * p[:, 3:]
    first, last = centre - scale / 2, centre + scale / 2  # B×3 (t, y, x), in [0, 1]
    h, w = size
    boxes = torch.stack([first[:, 2] * w, first[:, 1] * h, last[:, 2] * w, last[:, 1] * h], dim=1)
    return boxes, torch.stack([first[:, 0], last[:, 0]], dim=1) * window


class CubeGenerator(nn.Module):
    """noise B×noise_dim -> MLP -> sigmoid -> B×views×6 crop parameters in (0, 1)."""

    def __init__(self, noise_dim: int, hidden: int, views: int = 2):
        super().__init__()
        self.noise_dim, self.views = noise_dim, views
        self.net = nn.Sequential(nn.Linear(noise_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 6 * views))

    def forward(self, noise: Tensor) -> Tensor:
        return torch.sigmoid(self.net(noise)).view(noise.shape[0], self.views, 6)


@dataclass(frozen=True)
class CubeConfig:
    """The recipe's ``views`` for ``paramcrop_cube`` ([UNVERIFIED] MLP and bounds, module doc)."""

    clip: VideoViewConfig = field(default_factory=VideoViewConfig)  # frames and per-clip image part
    # per-view photometric overrides (ParamCrop on BYOL: BYOL's asymmetry); empty: the same for both
    blur_p: tuple[float, ...] = ()
    solarize_p: tuple[float, ...] = ()
    noise_dim: int = 16  # noise vector per sample
    crop_hidden: int = 64  # crop MLP width
    spatial_scale: tuple[float, float] = (0.35, 1.0)  # crop side / canvas side
    temporal_scale: tuple[float, float] = (0.5, 1.0)  # cube length / window length
    grl_weight: float = 1.0  # gradient-reversal strength


@VIEW_GENERATORS.register("paramcrop_cube")
class CubeViews(ViewGenerator):
    """ParamCrop's two learned cubes: noise -> crop MLP -> gradient reversal -> cube sampling, then
    each view's flip and photometric ops. A module: the method's optimizer trains the crop MLP
    (adversarially, through the reversal). The framework (SimCLR, MoCo v2, BYOL) is the entry's
    ``method``; with MoCo the key cube gets no gradient (the key encoder runs without one)."""

    Config = CubeConfig
    modality = "video"
    description = "ParamCrop: two learned, adversarial 3-D crop cubes (a module the optimizer trains)"
    epoch_curves = (
        EpochCurve(
            "paramcrop_views.png",
            "ParamCrop: disparity between the two views",
            (("view_iou", "3-D IoU"), ("view_centre_distance", "centre distance")),
        ),
    )

    def __init__(self, cfg: CubeConfig):
        super().__init__()
        if len(cfg.blur_p) != len(cfg.solarize_p) or len(cfg.blur_p) not in (0, 2):
            raise ConfigError(
                f"views.blur_p / views.solarize_p: none or one value per cube (2), got {cfg.blur_p} / {cfg.solarize_p}"
            )
        self.cfg = cfg
        image = cfg.clip.image
        pairs = zip(cfg.blur_p, cfg.solarize_p, strict=True)
        self.images = [replace(image, blur_p=b, solarize_p=s) for b, s in pairs] or [image, image]
        self.cube_generator = CubeGenerator(cfg.noise_dim, cfg.crop_hidden)
        self._stats: dict[str, Tensor] = {}

    @property
    def span(self) -> int:
        return self.cfg.clip.span

    @property
    def frames(self) -> int:
        return self.cfg.clip.frames

    def reset_parameters(self) -> None:
        for layer in self.cube_generator.net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def forward(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        video, cfg = batch.video, self.cfg
        n, _, window, h, w = video.shape
        dev, size = video.device, cfg.clip.image.size
        noise = torch.randn(n, cfg.noise_dim, generator=generator, device=generator.device).to(dev)
        params = grad_reverse(self.cube_generator(noise), cfg.grl_weight)  # B×2×6
        source = video.float() / 255
        views = []
        for v, image in enumerate(self.images):
            boxes, times = params_to_cubes(params[:, v], cfg.spatial_scale, cfg.temporal_scale, window, (h, w))
            x = cube_sample(source, boxes, times, (cfg.clip.frames, size, size))
            flipped = torch.rand(n, generator=generator, device=generator.device).to(dev) < image.flip_p
            x = normalize_video(photometric(hflip(x, flipped), image, generator))
            extra = {"time": times.detach(), "window": torch.full((n,), float(window), device=dev)}
            if batch.looped is not None:
                extra["looped"] = batch.looped
            views.append(View(x, ViewProvenance(boxes.detach(), flipped, (h, w), (size, size), extra)))
        self._accumulate(views)
        return views

    def _accumulate(self, views: list[View]) -> None:
        """Sum this step's IoU / centre distance on the device (no host sync inside the step)."""
        iou = cube_iou(views[0].prov, views[1].prov).sum()
        dist = cube_centre_distance(views[0].prov, views[1].prov).sum()
        count = torch.tensor(float(len(views[0].tensor)), device=iou.device)
        for k, v in (("iou", iou), ("dist", dist), ("n", count)):
            self._stats[k] = self._stats.get(k, torch.zeros_like(v)) + v

    def epoch_logs(self, dist: DistContext) -> dict[str, float]:
        """Mean cube IoU and centre distance of this epoch's views (plotted from the epoch log)."""
        if not self._stats:
            return {}
        s = {k: all_reduce_mean(v, dist) for k, v in self._stats.items()}
        self._stats = {}
        return {"view_iou": float(s["iou"] / s["n"]), "view_centre_distance": float(s["dist"] / s["n"])}
