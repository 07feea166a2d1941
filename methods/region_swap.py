"""RegionCL's region swapping, region pooling and region losses.

[Xu, Zhang, Zhang, Tao; ECCV 2022, arXiv 2111.12309]

Following the official RegionCL-M code [REPO Annbless/RegionCL@61bbcab ``RegionCLM.py``,
``necks.py::RegionCLNonLinearNeckV1``]:

* one grid-aligned box per batch, the same place in every image, width and height drawn
  independently as ``stride · randint(lo, hi)`` pixels (``hi`` exclusive), corner drawn uniformly,
  rounded to a multiple of the stride and clipped so the box fits;
* the partner of image i is image ``B-1-i`` (the batch reversed); the *composite* view is image i
  with the box replaced by the same box of its partner (``swap_regions``);
* on the composite's final feature map, **canvas** = mean over the cells outside the box (source i),
  **paste** = mean over the cells inside it (source ``partner[i]``);
* region InfoNCE: every region is positive with the key of its *source* image, negative with the
  queue and with the other region of the same composite (stop-gradient).

Coordinates: boxes are (x0, y0, x1, y1), x1/y1 exclusive, in view pixels unless named ``_cells``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_region_box(
    view_hw: tuple[int, int], stride: int, cells: tuple[int, int], generator: torch.Generator
) -> Tensor:
    """One grid-aligned box (x0, y0, x1, y1) in view pixels, shared by the batch. -> long[4].

    ``cells = (lo, hi)``: box sides are ``stride · randint(lo, hi)`` pixels (hi exclusive, as the
    official ``cutMixLower/Upper``). The official code clips the corner to ``W - 1 - width``, which
    can leave the box off the grid; we clip to ``W - width`` so pixels and cells always agree.
    """
    h, w = view_hw
    lo, hi = cells
    if not 1 <= lo < hi:
        raise ValueError(f"region cells range must satisfy 1 <= lo < hi, got {cells}")
    if h % stride or w % stride:
        raise ValueError(f"view size {view_hw} is not a multiple of the output stride {stride}")
    if (hi - 1) * stride >= min(h, w):
        raise ValueError(
            f"region box of up to {hi - 1} cells × {stride} px cannot fit in a {h}×{w} view "
            f"with room for a canvas; lower cells[1] below {min(h, w) // stride}"
        )
    dev = generator.device
    bw, bh = (stride * torch.randint(lo, hi, (2,), generator=generator, device=dev)).tolist()
    sx, sy = (torch.randint(0, n, (1,), generator=generator, device=dev).item() for n in (w, h))
    x0 = min(round(sx / stride) * stride, w - bw)
    y0 = min(round(sy / stride) * stride, h - bh)
    return torch.tensor([x0, y0, x0 + bw, y0 + bh], dtype=torch.long)


def partner_permutation(batch_size: int) -> Tensor:
    """Partner of each image: the reversed batch (official) when B is even.

    For odd B the reversal maps the middle image onto itself, which would make a region its own
    negative; we then fall back to a cyclic shift (i -> i+1 mod B), which has no fixed point.
    """
    if batch_size < 2:
        raise ValueError(f"RegionCL swaps regions between images of a batch: need a batch of >= 2, got {batch_size}")
    if batch_size % 2 == 0:
        return torch.arange(batch_size - 1, -1, -1)
    return torch.roll(torch.arange(batch_size), -1)


def swap_regions(images: Tensor, box: Tensor, partner: Tensor) -> Tensor:
    """Composite views: image i with ``box`` replaced by the same box of image ``partner[i]``.

    images: B×C×H×W (any dtype); box: (x0, y0, x1, y1) view pixels; partner: B long. -> B×C×H×W.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[partner.to(images.device), :, y0:y1, x0:x1]
    return out


def box_to_cells(box: Tensor, stride: int) -> Tensor:
    """A grid-aligned pixel box -> the same box in feature-map cells (exact division required)."""
    if bool((box % stride).any()):
        raise ValueError(f"region box {box.tolist()} is not aligned to the output stride {stride}")
    return box // stride


def region_pool(fmap: Tensor, box_cells: Tensor) -> tuple[Tensor, Tensor]:
    """Canvas (outside the box) and paste (inside) means of a B×C×h×w map. -> (B×C, B×C)."""
    x0, y0, x1, y1 = (int(v) for v in box_cells)
    h, w = fmap.shape[2:]
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"region box {box_cells.tolist()} (cells) is empty or outside the {h}×{w} feature map")
    if (x1 - x0) * (y1 - y0) == h * w:
        raise ValueError(f"region box {box_cells.tolist()} covers the whole {h}×{w} map: the canvas would be empty")
    inside = torch.zeros(h, w, dtype=fmap.dtype, device=fmap.device)
    inside[y0:y1, x0:x1] = 1
    paste = (fmap * inside).sum(dim=(2, 3)) / inside.sum()
    canvas = (fmap * (1 - inside)).sum(dim=(2, 3)) / (1 - inside).sum()
    return canvas, paste


def region_infonce(
    canvas: Tensor, paste: Tensor, keys: Tensor, queue: Tensor, partner: Tensor, temperature: float
) -> Tensor:
    """RegionCL's region loss (official RegionCL-M form), mean over the 2B region queries.

    canvas, paste: B×D normalised, row i from composite i (canvas: source i, paste: source
    partner[i]);
    keys: B×D normalised keys of the clean images; queue: K×D normalised. Each region's logits are
    [positive: its source image's key, intra: the other region of its composite (no gradient),
    inter: the queue], cross-entropy with the positive as target.
    """
    inv = torch.argsort(partner.to(canvas.device))  # inv[j]: the composite holding image j's region
    paste_src = paste[inv]  # row j: the region cut from image j
    pos = torch.cat([(canvas * keys).sum(1), (paste_src * keys).sum(1)]).unsqueeze(1)
    intra = torch.cat([(canvas * paste.detach()).sum(1), (paste_src * canvas[inv].detach()).sum(1)]).unsqueeze(1)
    inter = torch.cat([canvas, paste_src]) @ queue.T
    logits = torch.cat([pos, intra, inter], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def region_regression(p_canvas: Tensor, p_paste: Tensor, targets: Tensor, partner: Tensor) -> Tensor:
    """RegionCL-S region term (SimSiam form): negative cosine of each region's prediction with the
    stop-gradient projection of its source image's other view. p_*: B×D, targets: B×D. -> scalar.

    SimSiam has no negatives, so this term keeps only the positives; see the entry's deviations.
    """
    inv = torch.argsort(partner.to(p_canvas.device))
    t = F.normalize(targets.detach().float(), dim=1)
    cos_c = (F.normalize(p_canvas.float(), dim=1) * t).sum(1)
    cos_p = (F.normalize(p_paste[inv].float(), dim=1) * t).sum(1)
    return -0.5 * (cos_c.mean() + cos_p.mean())


def view_box_to_canvas(box: Tensor, crop: Tensor, flipped: Tensor, view_hw: tuple[int, int]) -> Tensor:
    """Map a box given in view pixels back to each view's source canvas. -> B×4 float.

    box: (x0, y0, x1, y1) view pixels (shared) or B×4; crop: B×4 canvas box the view was resized
    from; flipped: B bool (horizontal flip after the crop).
    """
    h, w = view_hw
    b = box.float().expand(crop.shape[0], 4).clone()
    mirrored = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    b = torch.where(flipped.view(-1, 1).to(b.device), mirrored, b)
    sx, sy = (crop[:, 2] - crop[:, 0]) / w, (crop[:, 3] - crop[:, 1]) / h
    return torch.stack(
        [
            crop[:, 0] + b[:, 0] * sx,
            crop[:, 1] + b[:, 1] * sy,
            crop[:, 0] + b[:, 2] * sx,
            crop[:, 1] + b[:, 3] * sy,
        ],
        dim=1,
    )
