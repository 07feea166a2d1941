"""Batched video views with provenance: a temporal crop + one spatial crop per clip + per-clip
photometric augmentation, the same for every frame (as video SSL does: Qian et al. CVPR'21,
Feichtenhofer et al. CVPR'21).

Input: the uint8 window B×3×T×S×S a ``VideoBatch`` carries. Each view picks ``frames`` frames
every ``stride`` frames from a random start in the window, a RandomResizedCrop box (the image
views' ``sample_boxes``), a flip, then colour jitter / grayscale / blur / solarize with per-clip
factors (``cropbench.views.image`` ops on 5-D tensors: contrast blends with the clip's mean grey level)
and Kinetics normalisation. The cube is cut by ``cube_sample`` (trilinear, differentiable).
Provenance: ``boxes`` in canvas pixels, ``flipped``, and ``extra["time"]`` (B×2 frame interval
in window frames, convention of ``cropbench.views.video_transforms``), ``extra["looped"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from cropbench.errors import ConfigError
from cropbench.types import View, ViewProvenance
from cropbench.views.image import (
    ViewConfig,
    apply_where,
    color_jitter,
    gaussian_blur,
    hflip,
    sample_boxes,
    sample_jitter,
    solarize,
    to_gray,
)
from cropbench.views.video_transforms import cube_sample, frame_interval, normalize_video


def video_image_views() -> ViewConfig:
    """Spatial/photometric part for micro clips: 24 px, crop scale 0.2-1, MoCo v2 jitter (in a
    fixed order, chosen when a random order cost four hue passes; kept, the micro goldens use it)
    and grayscale, no blur."""
    return ViewConfig(size=24, scale=(0.2, 1.0), jitter_order="fixed", blur_p=0.0)


@dataclass(frozen=True)
class VideoViewConfig:
    frames: int = 8  # output frames T'
    stride: int = 2  # source frames between output frames
    image: ViewConfig = field(default_factory=video_image_views)  # per-clip spatial + colour part
    temporal: Literal["random", "start"] = "random"  # clip start: anywhere in the window, or frame 0
    random_conv_p: float = 0.0  # BraVe broad-video augmentation: random 2D convolution

    def __post_init__(self) -> None:
        if self.frames < 1 or self.stride < 1:
            raise ConfigError(f"VideoViewConfig: frames and stride must be >= 1, got {self.frames}, {self.stride}")

    @property
    def span(self) -> int:
        """Window frames this view needs: (frames − 1)·stride + 1."""
        return (self.frames - 1) * self.stride + 1


def _rand(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def sample_starts(
    n: int, window: int, cfg: VideoViewConfig, generator: torch.Generator, device: torch.device
) -> Tensor:
    """B integer clip starts in a window of ``window`` frames (uniform, or 0 for "start")."""
    if cfg.span > window:
        raise ConfigError(
            f"a view of {cfg.frames} frames every {cfg.stride} needs {cfg.span} window frames, "
            f"the batch has {window}: raise the method's window or shorten the view"
        )
    if cfg.temporal == "start":
        return torch.zeros(n, device=device)
    return torch.floor(_rand(n, generator, device) * (window - cfg.span + 1)).clamp(max=window - cfg.span)


def photometric(x: Tensor, cfg: ViewConfig, generator: torch.Generator) -> Tensor:
    """Per-clip colour jitter, grayscale, blur and solarize on B×3×T×h×w floats in [0, 1]."""
    n, dev = x.shape[0], x.device
    x = color_jitter(x, *sample_jitter(n, cfg, generator, dev))
    gray = _rand(n, generator, dev) < cfg.gray_p
    x = apply_where(x, gray, lambda xs, _: to_gray(xs).expand_as(xs))
    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * _rand(n, generator, dev)
    blur = _rand(n, generator, dev) < cfg.blur_p
    if cfg.blur_p > 0 and cfg.kernel_size > 1:
        x = apply_where(x, blur, lambda xs, sel: _blur_frames(xs, sigma[sel], cfg.kernel_size))
    return solarize(x, _rand(n, generator, dev) < cfg.solarize_p)


def _blur_frames(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Each clip's Gaussian blur (its own sigma) on every frame: B×3×T×h×w -> same shape."""
    b, c, t, h, w = x.shape
    return gaussian_blur(x.reshape(b, c * t, h, w), sigma, kernel_size).view_as(x)


def random_convolution(x: Tensor, apply: Tensor, generator: torch.Generator) -> Tensor:
    """BraVe's broad-video augmentation: per clip a random 2D conv (He-normal weights, odd kernel
    side uniform in 1..11), the same for every frame; B×3×T×H×W -> same shape."""
    b, c, t, h, w = x.shape
    dev = x.device
    k = 2 * torch.randint(0, 6, (b,), generator=generator, device=generator.device).to(dev) + 1
    weight = torch.randn(b, c, c, 11, 11, generator=generator, device=generator.device).to(dev)
    weight = weight * torch.sqrt(2.0 / (c * k.float() ** 2)).view(b, 1, 1, 1, 1)  # He init, fan_in c·k²
    d = torch.arange(11, device=dev) - 5
    inside = d.abs()[None] <= (k[:, None] // 2)  # B×11: taps within the drawn kernel
    weight = weight * (inside[:, None, None, :, None] & inside[:, None, None, None, :])
    y = x.permute(2, 0, 1, 3, 4).reshape(t, b * c, h, w)
    y = F.conv2d(y, weight.reshape(b * c, c, 11, 11), padding=5, groups=b)
    y = y.view(t, b, c, h, w).permute(1, 2, 0, 3, 4)
    return torch.where(_per_sample(apply, x), y, x)


def make_video_view(
    video: Tensor,
    cfg: VideoViewConfig,
    generator: torch.Generator,
    starts: Tensor | None = None,
    looped: Tensor | None = None,
) -> View:
    """uint8 B×3×T×S×S windows -> a normalised B×3×frames×size×size view with its provenance."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"make_video_view: expected B×3×T×H×W clips, got shape {tuple(video.shape)}")
    n, _, window, height, width = video.shape
    dev, size = video.device, cfg.image.size
    with torch.autocast(device_type=dev.type, enabled=False):
        boxes = sample_boxes(n, height, width, cfg.image.scale, cfg.image.ratio, generator, dev)
        if starts is None:
            starts = sample_starts(n, window, cfg, generator, dev)
        times = frame_interval(starts, cfg.frames, cfg.stride)
        x = cube_sample(video.float() / 255, boxes, times, (cfg.frames, size, size))
        flipped = _rand(n, generator, dev) < cfg.image.flip_p
        x = photometric(hflip(x, flipped), cfg.image, generator)
        x = normalize_video(x)
        if cfg.random_conv_p > 0:
            x = random_convolution(x, _rand(n, generator, dev) < cfg.random_conv_p, generator)
    extra = {"time": times, "window": torch.full((n,), float(window), device=dev)}
    if looped is not None:
        extra["looped"] = looped
    return View(x, ViewProvenance(boxes, flipped, (height, width), (size, size), extra))


# ---------------------------------------------------------------- statistics between two views


def _cube(p: ViewProvenance) -> tuple[Tensor, Tensor]:
    """(lower corner, upper corner) of each view's cube, B×3 (x, y, t) floats."""
    box, t = p.boxes.float(), p.extra["time"].float().to(p.boxes.device)
    return torch.cat([box[:, :2], t[:, :1]], dim=1), torch.cat([box[:, 2:], t[:, 1:]], dim=1)


def cube_iou(a: ViewProvenance, b: ViewProvenance) -> Tensor:
    """3-D IoU of paired view cubes (box × time interval) -> B; ParamCrop's view statistic."""
    (a0, a1), (b0, b1) = _cube(a), _cube(b)
    inter = (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0).prod(dim=1)
    return inter / ((a1 - a0).prod(dim=1) + (b1 - b0).prod(dim=1) - inter)


def cube_centre_distance(a: ViewProvenance, b: ViewProvenance) -> Tensor:
    """Distance between paired cube centres, x / W, y / H, t / window length -> B."""
    h, w = a.source_size
    extent = torch.stack(
        [
            torch.full_like(a.extra["window"].float(), w),
            torch.full_like(a.extra["window"].float(), h),
            a.extra["window"].float(),
        ],
        dim=1,
    ).to(a.boxes.device)
    (a0, a1), (b0, b1) = _cube(a), _cube(b)
    return (((a0 + a1) - (b0 + b1)) / (2 * extent)).norm(dim=1)
