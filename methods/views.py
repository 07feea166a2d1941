"""Batched image view generator with provenance (SimCLR / MoCo v2 / BYOL augmentation).

Input: uint8 canvases B×3×S×S already on the training device. Every random draw comes from an
explicit ``torch.Generator`` and every op runs on the whole batch at once, so the pipeline runs
on the GPU when there is one. Output: ``View(tensor, prov)`` where ``prov.boxes`` are the crop
boxes in canvas pixels and ``prov.flipped`` the horizontal flips.

Pixel convention: canvas pixel (row i, col j) covers the continuous square [j, j+1) × [i, i+1).
A box (x0, y0, x1, y1) covers [x0, x1) × [y0, y1); output pixel (r, c) of an h×w view is the
average of bilinear samples over its bin, whose centre is at canvas point
(x0 + (c + 0.5)·(x1 − x0)/w, y0 + (r + 0.5)·(y1 − y0)/h) (``roi_align(aligned=True)``, adaptive
sampling grid, so downscaling averages like an antialiased resize). A flip mirrors the view
after cropping: view column c then shows box column w − 1 − c.

Op order (BYOL / MoCo v2 pipeline order): crop+resize, flip, colour jitter, grayscale, blur,
solarize, ImageNet normalisation. Flip commutes with every later op (all are pointwise or
mirror-symmetric), so this order also equals SimCLR's (crop, flip, colour, blur). Photometric
ops work on float [0, 1] images without intermediate uint8 rounding (torchvision's PIL path rounds
after each op) and match ``torchvision.transforms.v2.functional`` on float tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import roi_align

from cropbench.data.images import normalize
from cropbench.errors import ConfigError
from cropbench.methods.base import View, ViewProvenance


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation; defaults are MoCo v2's (= SimSiam's) ImageNet recipe.

    A recipe that gives only some keys of a ``ViewConfig`` starts from *these* defaults, so
    entries spell out their full view recipe in the ``base`` recipe.
    """

    size: int = 224  # output side (ImageNet protocol of all four papers)
    scale: tuple[float, float] = (0.2, 1.0)  # MoCo v2 main_moco.py aug_plus; SimCLR/BYOL use 0.08
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop default, all papers
    flip_p: float = 0.5  # all papers
    jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.4,
        0.1,
    )  # MoCo v2 (b, c, s, h); SimCLR 0.8·(1,1,1,.25)
    jitter_p: float = 0.8  # all four papers
    jitter_order: Literal["random", "fixed"] = "random"  # torchvision ColorJitter permutes per image
    gray_p: float = 0.2  # all four papers
    blur_p: float = 0.5  # MoCo v2 / SimCLR; BYOL 1.0 and 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # SimCLR / MoCo v2 / BYOL
    blur_kernel: float = 0.1  # kernel side / view side, made odd (SimCLR: 10%; BYOL: 23 px at 224)
    solarize_p: float = 0.0  # BYOL: 0.0 and 0.2

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"ViewConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        check(self.size >= 1, "size", "a positive integer")
        check(0 < self.scale[0] <= self.scale[1] <= 1, "scale", "0 < min <= max <= 1")
        check(0 < self.ratio[0] <= self.ratio[1], "ratio", "0 < min <= max")
        check(min(self.jitter) >= 0 and self.jitter[3] <= 0.5, "jitter", "non-negative, hue <= 0.5")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur_sigma", "0 < min <= max")
        check(0 <= self.blur_kernel < 1, "blur_kernel", "a fraction of the view side in [0, 1)")
        for p in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            check(0 <= getattr(self, p) <= 1, p, "a probability in [0, 1]")

    @property
    def kernel_size(self) -> int:
        """Odd blur kernel side: 2·floor(frac·size/2) + 1 (23 for 224 px, 3 for 32 px)."""
        return 2 * int(self.blur_kernel * self.size / 2) + 1


# ---------------------------------------------------------------- random draws


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator, device)


def _coin(n: int, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return _rand((n,), generator, device) < p


def sample_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | None = None,
    tries: int = 10,
) -> Tensor:
    """RandomResizedCrop boxes, torchvision's rule, batched -> n×4 (x0, y0, x1, y1) integer pixels.

    Per sample: up to ``tries`` draws of area ∈ scale·H·W and log-uniform aspect ratio; the first
    (w, h) that fits wins; if none fits, the largest centred crop with ratio clamped to the range.
    """
    device = device or generator.device
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand((n, tries), generator, device))
    log_r = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand((n, tries), generator, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
    fw, fh = _fallback_size(height, width, ratio)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    y0 = torch.floor(_rand((n,), generator, device) * (height - h + 1)).clamp(max=height - h)
    x0 = torch.floor(_rand((n,), generator, device) * (width - w + 1)).clamp(max=width - w)
    y0 = torch.where(found, y0, torch.div(height - h, 2, rounding_mode="floor"))
    x0 = torch.where(found, x0, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's centre-crop fallback: whole canvas, aspect ratio clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return float(width), float(round(width / ratio[0]))
    if in_ratio > ratio[1]:
        return float(round(height * ratio[1])), float(height)
    return float(width), float(height)


# ---------------------------------------------------------------- geometric ops


def crop_resize(images: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """B×C×H×W float, B×4 boxes (x0, y0, x1, y1) -> B×C×h×w, pixel convention of the module doc."""
    idx = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(images.device)], dim=1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def hflip(x: Tensor, flipped: Tensor) -> Tensor:
    """Mirror the samples where ``flipped`` (B bool) is set, along the last axis."""
    return torch.where(_per_sample(flipped, x), x.flip(-1), x)


# ---------------------------------------------------------------- photometric ops (float, [0, 1])


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a length-B vector to broadcast against B×C×... ``x``."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def to_gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (torchvision's weights), B×3×... -> B×1×..."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor, x)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the per-sample mean grey level."""
    mean = to_gray(x).mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, to_gray(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (B, in turns, |shift| <= 0.5) through HSV."""
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    r, g, b = x.unbind(1)
    span = maxc - minc
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(span > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, span / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue6 = torch.remainder(hue + _per_sample(shift, hue), 1.0) * 6
    # HSV -> RGB in closed form: channel n in (5, 3, 1) is V − V·S·clamp(min(k, 4 − k), 0, 1)
    # with k = (n + 6H) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue6, 6.0)
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor | None) -> Tensor:
    """Brightness, contrast, saturation, hue with per-sample ``factors`` (B×4).

    ``order`` (B×4 long, a permutation of 0..3 per sample) applies the ops in that order per
    sample (torchvision ColorJitter); ``None`` applies them in the fixed order b, c, s, h.
    Identity factors (1, 1, 1, 0) leave a sample unchanged.
    """
    if order is None:
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for k, op in enumerate(ops):
            x = op(x, factors[:, k])
        return x
    for pos in range(4):
        op = order[:, pos]
        x = _blend_op(x, op, factors)
        x = torch.where(_per_sample(op == 3, x), adjust_hue(x, factors[:, 3]), x)
    return x


def _blend_op(x: Tensor, op: Tensor, factors: Tensor) -> Tensor:
    """Per sample, brightness (op 0), contrast (1) or saturation (2); identity for op 3.

    All three are clamp(f·x + (1 − f)·ref) with ref = 0, the mean grey level, or the grey image.
    """
    f = factors[:, :3].gather(1, op.clamp(max=2)[:, None])[:, 0]
    f = torch.where(op == 3, torch.ones_like(f), f)
    gray = to_gray(x)
    mean = gray.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    ref = torch.where(_per_sample(op == 0, x), 0.0, torch.where(_per_sample(op == 1, x), mean, gray))
    return _blend(x, ref, f)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (B), reflect padding (torchvision's)."""
    B, C, H, W = x.shape
    d = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - kernel_size // 2
    k1 = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B·C)×k
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k1[:, None, :, None], groups=B * C)
    return y.view(B, C, H, W)


def solarize(x: Tensor, apply: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels >= threshold in the samples where ``apply`` (B bool) is set (BYOL: 0.5)."""
    return torch.where(_per_sample(apply, x) & (x >= threshold), 1 - x, x)


# ---------------------------------------------------------------- the pipeline


def sample_jitter(
    n: int, cfg: ViewConfig, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Per-sample jitter factors (n×4; identity where jitter is not applied) and op order."""
    b, c, s, h = cfg.jitter
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1 - b), 1 + b, generator, device),
            _uniform(n, max(0.0, 1 - c), 1 + c, generator, device),
            _uniform(n, max(0.0, 1 - s), 1 + s, generator, device),
            _uniform(n, -h, h, generator, device),
        ],
        dim=1,
    )
    applied = _coin(n, cfg.jitter_p, generator, device)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    factors = torch.where(applied[:, None], factors, identity)
    order = _rand((n, 4), generator, device).argsort(dim=1) if cfg.jitter_order == "random" else None
    return factors, order


def make_view(images: Tensor, cfg: ViewConfig, generator: torch.Generator) -> View:
    """uint8 B×3×H×W canvases -> one normalised B×3×size×size view with its provenance."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"make_view: expected B×3×H×W canvases, got shape {tuple(images.shape)}")
    n, _, height, width = images.shape
    dev = images.device
    with torch.autocast(device_type=dev.type, enabled=False):
        boxes = sample_boxes(n, height, width, cfg.scale, cfg.ratio, generator, dev)
        x = crop_resize(images.float() / 255, boxes, (cfg.size, cfg.size))
        flipped = _coin(n, cfg.flip_p, generator, dev)
        x = hflip(x, flipped)
        x = color_jitter(x, *sample_jitter(n, cfg, generator, dev))
        x = torch.where(_per_sample(_coin(n, cfg.gray_p, generator, dev), x), to_gray(x).expand_as(x), x)
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
        blur = _per_sample(_coin(n, cfg.blur_p, generator, dev), x)
        if cfg.blur_p > 0 and cfg.kernel_size > 1:
            x = torch.where(blur, gaussian_blur(x, sigma, cfg.kernel_size), x)
        x = solarize(x, _coin(n, cfg.solarize_p, generator, dev))
        x = normalize(x * 255)
    prov = ViewProvenance(boxes=boxes, flipped=flipped, source_size=(height, width), output_size=(cfg.size, cfg.size))
    return View(x, prov)


# ---------------------------------------------------------------- provenance helpers


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of paired boxes a[i], b[i] (B×4 each, x0 y0 x1 y1) -> B (ParamCrop's view statistic)."""
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def centre_distance(a: Tensor, b: Tensor, source_size: tuple[int, int]) -> Tensor:
    """Distance between paired box centres, x divided by canvas W and y by canvas H -> B."""
    height, width = source_size
    dx = ((a[:, 0] + a[:, 2]) - (b[:, 0] + b[:, 2])) / (2 * width)
    dy = ((a[:, 1] + a[:, 3]) - (b[:, 1] + b[:, 3])) / (2 * height)
    return torch.sqrt(dx**2 + dy**2)


def grid_centres(prov: ViewProvenance, grid: tuple[int, int]) -> Tensor:
    """Canvas (x, y) of the centres of a gh×gw grid over each view -> B×(gh·gw)×2, row-major.

    Cell (r, c) of a feature map over the view covers view pixels [c·w/gw, (c+1)·w/gw); its centre
    maps back through the crop box, mirrored when the view was flipped (DenseCL/PixPro matching).
    """
    gh, gw = grid
    boxes = prov.boxes.float()
    u = (torch.arange(gw, device=boxes.device) + 0.5) / gw  # fraction of the view width
    v = (torch.arange(gh, device=boxes.device) + 0.5) / gh
    u = torch.where(prov.flipped.to(boxes.device)[:, None], 1 - u[None], u[None])  # B×gw
    x = boxes[:, 0:1] + u * (boxes[:, 2:3] - boxes[:, 0:1])
    y = boxes[:, 1:2] + v[None] * (boxes[:, 3:4] - boxes[:, 1:2])  # B×gh
    xx, yy = x[:, None, :].expand(-1, gh, gw), y[:, :, None].expand(-1, gh, gw)
    return torch.stack([xx, yy], dim=-1).reshape(boxes.shape[0], gh * gw, 2)
