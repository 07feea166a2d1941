"""Batched image view generator with provenance (SimCLR / MoCo v2 / BYOL augmentation).

Input: uint8 canvases B×3×S×S already on the training device. Every random draw comes from an
explicit ``torch.Generator`` and every op runs batched, so the pipeline runs on the GPU when there
is one: on CPU an op runs only on the samples it applies to (``apply_where``, colour jitter grouped
by position), on an accelerator on the whole batch with per-sample selection (no host syncs).
Output: ``View(tensor, prov)`` where ``prov.boxes`` are the crop boxes in canvas pixels and
``prov.flipped`` the horizontal flips.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import roi_align

from cropbench.data.images import normalize
from cropbench.errors import ConfigError
from cropbench.types import View, ViewProvenance


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
    return apply_where(x, flipped, lambda xs, _: xs.flip(-1))


def apply_where(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor | slice], Tensor]) -> Tensor:
    """``x`` with ``fn`` applied to the samples where ``mask`` (B bool) is set.

    ``fn(xs, sel)`` gets those samples and their index (to pick per-sample parameters). On CPU
    only the selected samples are computed (index_select / index_copy); on an accelerator ``fn``
    runs on the whole batch and ``torch.where`` picks, which needs no host sync.
    """
    if x.device.type != "cpu":
        return torch.where(_per_sample(mask, x), fn(x, slice(None)), x)
    idx = mask.nonzero()[:, 0]
    if len(idx) == len(x):
        return fn(x, slice(None))
    if len(idx) == 0:
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx))


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
    """Rotate hue by ``shift`` (B, in turns, |shift| <= 0.5) through HSV; ``x`` in [0, 1].

    torchvision's arithmetic, bit for bit, with the selections written as products with 0/1
    masks (``torch.where`` with a per-pixel condition, and a max over dim 1, are several times
    slower on CPU): the channel holding the max decides the hue formula (ties: r, then g, then b);
    grey pixels (span 0) get hue 0 and black ones saturation 0.
    """
    r, g, b = x.unbind(1)
    maxc, (is_r, is_g, is_b) = _channel_extreme(r, g, b, torch.maximum)
    minc, _ = _channel_extreme(r, g, b, torch.minimum)
    span = maxc - minc
    num = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b  # exactly one term is non-zero
    hue = (2 * is_g + 4 * is_b + num / (span + (span == 0))) / 6  # num = 0 where span = 0
    sat = span / (maxc + (maxc == 0))  # span = 0 where maxc = 0
    return _hsv_to_rgb(torch.remainder(hue + _per_sample(shift, hue), 1.0) * 6, sat, maxc)


def _channel_extreme(
    r: Tensor, g: Tensor, b: Tensor, pick: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Per-pixel max (``pick=torch.maximum``) or min of the planes, and 0/1 masks of the first
    plane holding it (r, then g, then b: the index ``x.max(dim=1)`` returns).

    Under autograd the value is rebuilt from the masks (exactly: v·1 + w·0), so its gradient
    reaches that one plane as through ``max(dim=1)``; ``torch.maximum`` would split it at ties.
    """
    value = pick(pick(r, g), b)
    first_r = (value == r).to(r.dtype)
    first_g = (value == g).to(r.dtype) * (1 - first_r)
    first_b = 1 - first_r - first_g
    if torch.is_grad_enabled() and r.requires_grad:
        value = r * first_r + g * first_g + b * first_b
    return value, (first_r, first_g, first_b)


def _hsv_to_rgb(hue6: Tensor, sat: Tensor, val: Tensor) -> Tensor:
    """Closed form: channel n in (5, 3, 1) is V − V·S·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6.

    hue6, sat, val: B×... (no channel axis) -> B×3×..., the three channels in one pass each.
    """
    n = 5 - 2 * torch.arange(3, device=hue6.device, dtype=hue6.dtype)  # (5, 3, 1), made on the device: no copy
    n = n.view(1, 3, *([1] * (hue6.dim() - 1)))
    k = torch.remainder(hue6.unsqueeze(1) + n, 6.0)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    vs = (val * sat).unsqueeze(1)
    return val.unsqueeze(1) - vs * ramp


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor | None) -> Tensor:
    """Brightness, contrast, saturation, hue with per-sample ``factors`` (B×4).

    ``order`` (B×4 long, a permutation of 0..3 per sample) applies the ops in that order per
    sample (torchvision ColorJitter); ``None`` applies them in the fixed order b, c, s, h.
    Identity factors (1, 1, 1, 0) leave a sample unchanged. Each sample goes through each op
    exactly once: on CPU grouped by position (``_jitter_grouped``), elsewhere without host syncs
    (``_jitter_around_hue``); both equal torchvision's per-image ColorJitter.
    """
    if order is None:
        for k, op in enumerate(_JITTER_OPS):
            x = op(x, factors[:, k])
        return x
    if x.device.type == "cpu":
        return _jitter_grouped(x, factors, order)
    return _jitter_around_hue(x, factors, order)


def _jitter_grouped(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """At each position k, each op runs on the group of samples whose k-th op it is.

    Groups are read on the host (``nonzero``), which is free on CPU; a group that is the whole
    batch runs in place of the copies.
    """
    out, owned = x, False  # ``owned``: ``out`` is ours to write into (never the caller's x)
    for pos in range(4):
        for k, op in enumerate(_JITTER_OPS):
            idx = (order[:, pos] == k).nonzero()[:, 0]
            if len(idx) == len(out):
                out, owned = op(out, factors[:, k]), True
            elif len(idx):
                out, owned = out if owned else out.clone(), True
                out.index_copy_(0, idx, op(out.index_select(0, idx), factors[idx, k]))
    return out


def _jitter_around_hue(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Static shapes, no host sync: the ops before each sample's hue, one hue pass, the ops after.

    The up to three blend ops before hue run as three whole-batch passes (op 3 = identity in the
    slots a sample does not use), then hue once for every sample, then the ops after it.
    """
    slot = torch.arange(3, device=order.device)[None]  # 1×3
    at = (order == 3).long().argmax(dim=1, keepdim=True)  # B×1: position of hue
    before = torch.where(slot < at, order[:, :3], 3)
    after = torch.where(slot + at + 1 <= 3, order.gather(1, (slot + at + 1).clamp(max=3)), 3)
    for j in range(3):
        x = _blend_op(x, before[:, j], factors)
    x = adjust_hue(x, factors[:, 3])
    for j in range(3):
        x = _blend_op(x, after[:, j], factors)
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
    return apply_where(x, apply, lambda xs, _: torch.where(xs >= threshold, 1 - xs, xs))


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
    identity = (torch.arange(4, device=device) < 3).float()  # (1, 1, 1, 0) without a host-to-device copy
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
        x = apply_where(x, _coin(n, cfg.gray_p, generator, dev), lambda xs, _: to_gray(xs).expand_as(xs))
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
        blur = _coin(n, cfg.blur_p, generator, dev)
        if cfg.blur_p > 0 and cfg.kernel_size > 1:
            x = apply_where(x, blur, lambda xs, sel: gaussian_blur(xs, sigma[sel], cfg.kernel_size))
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
