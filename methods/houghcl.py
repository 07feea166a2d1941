"""HoughCL [Lee, Hong, Cho, Cha, Kim; arXiv 2111.10794]: DenseCL with Hough-voted dense positives.

The method is DenseCL (``methods.densecl``) with one change: the positive key cell of each query
cell is chosen by ``methods.dense.hough_match`` (similarity × vote mass of the match's offset bin)
instead of winner-takes-all. No learnable parameters are added.

This module also holds the controlled experiment that shows the paper's point: pairs of dense
feature maps related by a known shift, with background clutter (repeated features) and outlier
cells (distractors that copy another cell's feature); ``match_accuracy`` scores a matcher by the
fraction of cells whose chosen match is the true one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cropbench.methods.dense import hough_match, match_accuracy, wta_match
from cropbench.methods.densecl import DenseCL
from cropbench.registry import METHODS


@METHODS.register("houghcl")
class HoughCL(DenseCL):
    """DenseCL whose dense positives come from Hough voting over match offsets (no new parameters).

    The paper's Hough-space details (bin size, scale bins, features, smoothing) could not be read
    (papers.md §5.2, [UNVERIFIED]); we vote over translation offsets of backbone C5 cells, the
    features DenseCL matches on, with the bin size and per-cell top-k as config fields.
    """

    @dataclass(frozen=True)
    class Config(DenseCL.Config):
        hough_bin_size: int = 1  # offset bin side in C5 cells ([UNVERIFIED]: not in our sources)
        hough_topk: int = 0  # votes per query cell (0 = all candidates, similarity-weighted)

    def match(self, c5_q: Tensor, c5_k: Tensor) -> Tensor:
        """argmax_j sim(i, j) · H[bin(pos_j - pos_i)] over the key cells. -> B×S² long."""
        return hough_match(c5_q, c5_k, self.cfg.hough_bin_size, self.cfg.hough_topk)[0]


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
        [
            scene[b, m + dy : m + dy + size, m + dx : m + dx + size]
            for b, (dy, dx) in enumerate(shift.tolist())
        ]
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


def compare_matchers(pairs: ShiftPairs, bin_size: int = 1, topk: int = 0) -> dict[str, float]:
    """Accuracy of winner-takes-all (DenseCL) vs Hough voting (HoughCL) on the same pairs."""
    matchers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "wta": wta_match,
        "hough": lambda a, b: hough_match(a, b, bin_size=bin_size, topk=topk)[0],
    }
    return {
        name: float(match_accuracy(fn(pairs.feat_q, pairs.feat_k), pairs.truth))
        for name, fn in matchers.items()
    }
