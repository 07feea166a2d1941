"""Video tensor transforms written in cropbench (pytorchvideo 0.1.5's transforms do not import with
torchvision >= 0.17, protocols.md §2a): cube crop-and-resize, normalisation, evaluation crops.

Coordinate convention (the image views' one, with time added): source pixel column j covers
[j, j+1) and frame k covers [k, k+1). A *cube* is a box (x0, y0, x1, y1) in pixels plus a time
interval (t0, t1) in frames; output voxel (k, r, c) of a T'×h×w cube sample is the trilinear
sample at the centre of its bin, i.e. source point
(t0 + (k + .5)(t1 − t0)/T', y0 + (r + .5)(y1 − y0)/h, x0 + (c + .5)(x1 − x0)/w).
Sampling is differentiable in the cube (ParamCrop learns it). A clip of T' frames taken every
``s`` frames from frame ``k0`` is the interval (k0 + .5 − s/2, k0 + .5 − s/2 + T'·s): each output
frame lands exactly on a source frame.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F

KINETICS_MEAN = (0.45, 0.45, 0.45)  # pytorchvideo / pySlowFast video normalisation
KINETICS_STD = (0.225, 0.225, 0.225)


def frame_interval(start: Tensor, frames: int, stride: int) -> Tensor:
    """B start frames -> B×2 (t0, t1) whose ``frames`` samples land on frames start + i·stride."""
    t0 = start.float() + 0.5 - stride / 2
    return torch.stack([t0, t0 + frames * stride], dim=1)


def cube_theta(boxes: Tensor, times: Tensor, size: tuple[int, int, int], flipped: Tensor | None = None) -> Tensor:
    """B×3×4 ``affine_grid`` matrices (align_corners=False) for cubes in a T×H×W source.

    Per axis of length L a source interval (a, b) is u -> (b − a)/L · u + (a + b)/L − 1 in
    normalised coordinates; a flip negates the x slope (mirrors inside the box).
    """
    t, h, w = size
    x0, y0, x1, y1 = (boxes if boxes.is_floating_point() else boxes.float()).unbind(1)
    t0, t1 = (times if times.is_floating_point() else times.float()).to(x0.dtype).unbind(1)
    zero = torch.zeros_like(x0)
    sx = (x1 - x0) / w
    if flipped is not None:
        sx = torch.where(flipped.to(sx.device), -sx, sx)
    rows = [
        torch.stack([sx, zero, zero, (x0 + x1) / w - 1], dim=1),
        torch.stack([zero, (y1 - y0) / h, zero, (y0 + y1) / h - 1], dim=1),
        torch.stack([zero, zero, (t1 - t0) / t, (t0 + t1) / t - 1], dim=1),
    ]
    return torch.stack(rows, dim=1)


def cube_sample(
    video: Tensor,
    boxes: Tensor,
    times: Tensor,
    out: tuple[int, int, int],
    flipped: Tensor | None = None,
) -> Tensor:
    """B×C×T×H×W float, cubes (boxes B×4, times B×2) -> B×C×T'×h×w by trilinear sampling.

    Points outside the source take the nearest border value (``padding_mode="border"``).
    """
    b, c, t, h, w = video.shape
    theta = cube_theta(boxes, times, (t, h, w), flipped).to(video.dtype)
    grid = F.affine_grid(theta, [b, c, *out], align_corners=False)
    return F.grid_sample(video, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize_video(
    x: Tensor, mean: tuple[float, ...] = KINETICS_MEAN, std: tuple[float, ...] = KINETICS_STD
) -> Tensor:
    """B×3×T×H×W in [0, 1] -> (x − mean) / std per channel."""
    m, s = _channel_constants(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - m) / s


@functools.cache
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Mean/std as 1×3×1×1×1 tensors on ``device``, made once (no host-to-device copy per call)."""
    m = torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, 3, 1, 1, 1)
    return m.to(device), s.to(device)


def spatial_crops(size: int, crop: int, n: int) -> list[tuple[int, int, int, int]]:
    """``n`` (1 or 3) square crops (x0, y0, x1, y1) of side ``crop`` from a size×size canvas: the
    centre, or left / centre / right at mid height (pySlowFast's 3-crop test)."""
    if crop > size:
        raise ValueError(f"test crop {crop} is larger than the {size}-px canvas")
    if n == 1:
        offsets = [(size - crop) // 2]
    elif n == 3:
        offsets = [0, (size - crop) // 2, size - crop]
    else:
        raise ValueError(f"spatial crops: expected 1 or 3, got {n}")
    y = (size - crop) // 2
    return [(o, y, o + crop, y + crop) for o in offsets]


def eval_views(clips: Tensor, crops: list[tuple[int, int, int, int]], size: int) -> Tensor:
    """K×3×T×S×S uint8 clips -> (K·len(crops))×3×T×size×size normalised views, clip-major."""
    k, _, t = clips.shape[:3]
    x = clips.float() / 255
    views = []
    for box in crops:
        boxes = torch.tensor([box], dtype=torch.float32).expand(k, 4)
        times = torch.tensor([[0.0, float(t)]]).expand(k, 2)
        views.append(cube_sample(x, boxes, times, (t, size, size)))
    return normalize_video(torch.stack(views, dim=1).flatten(0, 1))
