"""HoughCL [Lee, Hong, Cho, Cha, Kim; arXiv 2111.10794]: DenseCL with Hough-voted dense positives.

The method is DenseCL (``methods.densecl``) with one change: the positive key cell of each query
cell is chosen by ``methods.dense.hough_match`` (similarity × vote mass of the match's offset bin,
the mass being the mean vote of the matches in that bin) instead of winner-takes-all. No learnable
parameters are added.

This module also holds the controlled experiments that show the paper's point, with background
clutter (repeated features) and outlier cells (distractors that copy another cell's feature):
``synthetic_shift_pairs`` (two windows of one feature scene, related by a known shift) and
``synthetic_crop_pairs`` (two RandomResizedCrop views of one feature canvas drawn by the project's
view generator, truth from their provenance); ``match_accuracy`` scores a matcher by the fraction
of cells whose chosen match is the true one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from cropbench.methods.base import MethodContext, StepOutput
from cropbench.methods.dense import (
    geometric_truth,
    hough_match,
    match_accuracy,
    same_cell_rate,
    wta_match,
)
from cropbench.methods.densecl import DenseBranch, DenseCL
from cropbench.methods.mocov2 import MoCoV2
from cropbench.registry import METHODS
from cropbench.types import ImageBatch, ViewProvenance
from cropbench.views.generators import ViewGenerator
from cropbench.views.image import ViewConfig, grid_centres, make_view


@METHODS.register("houghcl")
class HoughCL(MoCoV2):
    """DenseCL whose dense positives come from Hough voting over match offsets (no new parameters).

    MoCo v2 with DenseCL's dense branch (``DenseBranch``), whose ``match`` rule is the Hough vote.

    The paper's Hough-space details (bin size, scale bins, features, smoothing) could not be read
    (papers.md §5.2, [UNVERIFIED]); we vote over translation offsets of backbone C5 cells, the
    features DenseCL matches on, with the bin size and per-cell top-k as config fields.
    """

    @dataclass(frozen=True)
    class Config(DenseCL.Config):
        hough_bin_size: int = 1  # offset bin side in C5 cells ([UNVERIFIED]: not in our sources)
        hough_topk: int = 0  # votes per query cell (0 = all candidates, similarity-weighted)
        # bin mass = mean vote of its matches (True) or their sum (False: the zero-offset bin
        # holds S² matches, a corner bin 1, so the sum favours "same grid cell"); [UNVERIFIED]
        hough_normalise: bool = True

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)
        vote = {"bin_size": cfg.hough_bin_size, "topk": cfg.hough_topk, "normalise": cfg.hough_normalise}
        self.dense = DenseBranch(cfg, backbone.feat_dim, partial(hough_positives, **vote))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.dense.head, self.dense.key_head)]

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        loss, logs, k = self.dense.step(self, v_q, v_k, generator)
        self.dense.enqueue(self, k)
        return StepOutput(loss, logs)


def hough_positives(c5_q: Tensor, c5_k: Tensor, bin_size: int, topk: int, normalise: bool) -> Tensor:
    """argmax_j sim(i, j) · H[bin(pos_j - pos_i)] over the key cells. -> B×S² long."""
    return hough_match(c5_q, c5_k, bin_size, topk, normalise)[0]


@dataclass(frozen=True)
class ShiftPairs:
    feat_q: Tensor  # B×D×S×S
    feat_k: Tensor  # B×D×S×S
    truth: Tensor  # B×S² long: the true key cell of each query cell, -1 where it left the view
    shift: Tensor  # B×2 long (dy, dx): key cell = query cell - shift


def synthetic_shift_pairs(
    n: int,
    size: int = 7,
    dim: int = 32,
    clutter: float = 0.5,
    outliers: float = 0.2,
    noise: float = 0.3,
    n_background: int = 3,
    generator: torch.Generator | None = None,
) -> ShiftPairs:
    """Feature-map pairs with a known integer shift, background clutter and outlier cells.

    A scene of (S + 2m)² cells (m = S // 2) is cut twice: the query window at (m, m) and the key
    window at (m + dy, m + dx), so query cell (y, x) truly matches key cell (y - dy, x - dx).
    ``clutter``: fraction of scene cells drawn from ``n_background`` shared prototypes (repeated
    texture: many equally similar candidates). ``outliers``: fraction of key cells overwritten by a
    copy of a random query cell (a distractor as similar as that cell's true match); query cells
    whose true key cell was overwritten have no correspondence (truth -1). Gaussian ``noise`` is
    added to both views independently.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    m, side = size // 2, size + 2 * (size // 2)
    protos = torch.randn(n_background, dim, generator=g)
    scene = torch.randn(n, side, side, dim, generator=g)
    is_bg = torch.rand(n, side, side, generator=g) < clutter
    scene[is_bg] = protos[torch.randint(n_background, (int(is_bg.sum()),), generator=g)]
    shift = torch.randint(-m, m + 1, (n, 2), generator=g)
    q = scene[:, m : m + size, m : m + size]
    k = torch.stack(
        [scene[b, m + dy : m + dy + size, m + dx : m + dx + size] for b, (dy, dx) in enumerate(shift.tolist())]
    )
    q = q.reshape(n, size * size, dim).clone()
    k = k.reshape(n, size * size, dim).clone()
    is_out = torch.rand(n, size * size, generator=g) < outliers
    src = torch.randint(size * size, (n, size * size), generator=g)
    k[is_out] = torch.gather(q, 1, src.unsqueeze(-1).expand(-1, -1, dim))[is_out]
    q = q + noise * torch.randn(q.shape, generator=g)
    k = k + noise * torch.randn(k.shape, generator=g)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ty, tx = y.reshape(1, -1) - shift[:, :1], x.reshape(1, -1) - shift[:, 1:]
    inside = (ty >= 0) & (ty < size) & (tx >= 0) & (tx < size)
    truth = torch.where(inside, ty * size + tx, torch.full_like(ty, -1))
    overwritten = torch.gather(is_out, 1, truth.clamp_min(0))  # the true key cell became an outlier
    truth = torch.where(overwritten, torch.full_like(truth, -1), truth)
    to_map = lambda t: t.reshape(n, size, size, dim).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return ShiftPairs(to_map(q), to_map(k), truth, shift)


@dataclass(frozen=True)
class CropPairs:
    feat_q: Tensor  # B×D×S×S
    feat_k: Tensor  # B×D×S×S
    truth: Tensor  # B×S² long: ``dense.geometric_truth`` of the two views, -1 where none
    prov_q: ViewProvenance
    prov_k: ViewProvenance


def _tile_features(field: Tensor, centres: Tensor, canvas: int) -> Tensor:
    """field B×T×T×D, centres B×N×2 canvas (x, y) -> B×D×N: the feature of the tile under each."""
    t = field.shape[1]
    tx = (centres[..., 0] * t / canvas).floor().long().clamp(0, t - 1)
    ty = (centres[..., 1] * t / canvas).floor().long().clamp(0, t - 1)
    rows = torch.arange(field.shape[0]).unsqueeze(1)
    return field[rows, ty, tx].transpose(1, 2)


def synthetic_crop_pairs(
    n: int,
    grid: int = 4,
    dim: int = 32,
    tiles: int = 8,
    canvas: int = 64,
    clutter: float = 0.5,
    outliers: float = 0.2,
    noise: float = 0.3,
    n_background: int = 3,
    views: ViewConfig | None = None,
    generator: torch.Generator | None = None,
) -> CropPairs:
    """Dense feature maps of two RandomResizedCrop views of one feature canvas, with the truth.

    The canvas is a ``tiles``×``tiles`` field of ``dim``-d features; ``clutter`` of the tiles are
    copies of ``n_background`` shared prototypes (repeated texture). Two views are drawn
    independently by the project's view generator (``views.make_view``: crop box, scale, aspect,
    flip); cell (r, c) of a view's S×S map takes the feature of the tile under its centre (the
    ``grid_centres`` of its provenance). ``outliers`` of the key cells are overwritten by a copy of
    a random query cell (distractors); query cells whose true key cell was overwritten get truth
    -1, as do cells whose centre is outside the other view. Gaussian ``noise`` per view.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    cfg = views or ViewConfig(size=32, blur_p=0.0, jitter_p=0.0, gray_p=0.0)
    field = torch.randn(n, tiles, tiles, dim, generator=g)
    is_bg = torch.rand(n, tiles, tiles, generator=g) < clutter
    protos = torch.randn(n_background, dim, generator=g)
    field[is_bg] = protos[torch.randint(n_background, (int(is_bg.sum()),), generator=g)]
    blank = torch.zeros(n, 3, canvas, canvas, dtype=torch.uint8)
    prov_q, prov_k = (make_view(blank, cfg, g).prov for _ in range(2))
    q = _tile_features(field, grid_centres(prov_q, (grid, grid)), canvas)
    k = _tile_features(field, grid_centres(prov_k, (grid, grid)), canvas)
    is_out = torch.rand(n, grid * grid, generator=g) < outliers
    src = torch.gather(q, 2, torch.randint(grid * grid, (n, 1, grid * grid), generator=g).expand(-1, dim, -1))
    k = torch.where(is_out.unsqueeze(1), src, k)
    truth = geometric_truth(prov_q, prov_k, (grid, grid))
    overwritten = torch.gather(is_out, 1, truth.clamp_min(0))
    truth = torch.where(overwritten, torch.full_like(truth, -1), truth)
    q = q + noise * torch.randn(q.shape, generator=g)
    k = k + noise * torch.randn(k.shape, generator=g)
    shape = (n, dim, grid, grid)
    return CropPairs(q.reshape(shape), k.reshape(shape), truth, prov_q, prov_k)


def identity_match(feat_q: Tensor, feat_k: Tensor) -> Tensor:
    """The trivial matcher: every query cell to the key cell at the same grid position."""
    n = feat_q.shape[2] * feat_q.shape[3]
    return torch.arange(n, device=feat_q.device).expand(feat_q.shape[0], -1)


MATCHERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": identity_match,
    "wta": wta_match,
    "hough": lambda a, b: hough_match(a, b)[0],
    "hough_sum": lambda a, b: hough_match(a, b, normalise=False)[0],
}


def compare_matchers(pairs: ShiftPairs | CropPairs) -> dict[str, float]:
    """Accuracy of each of ``MATCHERS`` (identity, DenseCL's WTA, HoughCL's normalised Hough
    voting and the unnormalised sum) on the same pairs, and of each its same-cell rate
    (``<name>_same``: share of query cells matched to the key cell at the same grid position)."""
    out = {}
    for name, fn in MATCHERS.items():
        index = fn(pairs.feat_q, pairs.feat_k)
        out[name] = float(match_accuracy(index, pairs.truth))
        out[f"{name}_same"] = float(same_cell_rate(index))
    return out
