"""Dense building blocks: DenseCL's dense head and loss, and two ways of choosing dense positives.

* ``DenseHead``: DenseCL's dense projection (conv1x1 - ReLU - conv1x1 on the C5 map) plus the
  pooled dense vector that fills the second queue [Wang et al., DenseCL, CVPR 2021; REPO
  WXinlong/DenseCL ``densecl.py``]; optionally with BatchNorm (the micro recipes' ``dense_bn``).
* ``wta_match``: DenseCL's correspondence, winner-takes-all (arg-max) over the cosine similarity
  of the two views' *backbone* feature cells.
* ``hough_match``: HoughCL's correspondence [Lee et al., arXiv 2111.10794]: each candidate match
  (i, j) votes, weighted by its similarity, for the bin of its grid offset ``pos_j - pos_i``; a
  bin's mass is the mean vote of the matches in it (the bins hold different numbers of matches);
  the geometric confidence of a match is its similarity times the mass of its offset bin, and the
  positive of cell i is the arg-max of that confidence. No learnable parameters.
* ``dense_infonce``: InfoNCE per query cell, positive = the matched key cell's dense projection,
  negatives = the dense queue (pooled dense keys of past batches).

Shapes: feature maps are B×C×H×W; flattened cells are indexed row-major, ``i = y * W + x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropbench.methods.losses import info_nce
from cropbench.types import ViewProvenance
from cropbench.views.image import grid_centres


class DenseHead(nn.Module):
    """DenseCL dense projection head: conv1x1(C→hidden) - ReLU - conv1x1(hidden→out).

    ``forward(c5: B×C×H×W) -> (grid B×out×H×W, pooled B×out)``; ``pooled`` is the global average
    of the dense output, the vector DenseCL enqueues in its second (dense) queue.

    ``bn=True`` is the per-cell counterpart of ``heads.simclr_projector``: conv-BN-ReLU-conv-BN
    (hidden convs without bias, the last BN without affine), BatchNorm2d over B×H×W. Not in
    DenseCL (``DenseCLNeck.mlp2`` is conv-ReLU-conv); cropbench's micro recipes turn it on (see
    the densecl entry's deviations).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn: bool = False):
        super().__init__()
        if bn:
            self.net = nn.Sequential(
                nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_dim, out_dim, 1, bias=False),
                nn.BatchNorm2d(out_dim, affine=False),
            )
        else:
            self.net = nn.Sequential(
                nn.Conv2d(in_dim, hidden_dim, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_dim, out_dim, 1),
            )

    def forward(self, c5: Tensor) -> tuple[Tensor, Tensor]:
        grid = self.net(c5)
        return grid, grid.mean(dim=(2, 3))


def flatten_cells(fmap: Tensor) -> Tensor:
    """B×C×H×W -> B×C×(H·W), L2-normalised over channels (one unit vector per cell)."""
    return F.normalize(fmap.flatten(2).float(), dim=1)


def cell_similarity(feat_q: Tensor, feat_k: Tensor) -> Tensor:
    """Cosine similarity of every query cell with every key cell. -> B×Nq×Nk.

    feat_q: B×C×Hq×Wq, feat_k: B×C×Hk×Wk.
    """
    if feat_q.shape[:2] != feat_k.shape[:2]:
        raise ValueError(f"feature maps disagree in batch/channels: {tuple(feat_q.shape)} vs {tuple(feat_k.shape)}")
    return torch.bmm(flatten_cells(feat_q).transpose(1, 2), flatten_cells(feat_k))


@torch.no_grad()
def wta_match(feat_q: Tensor, feat_k: Tensor) -> Tensor:
    """DenseCL's winner-takes-all: for each query cell the most similar key cell. -> B×Nq long."""
    return cell_similarity(feat_q, feat_k).argmax(dim=2)


def offset_bins(q_hw: tuple[int, int], k_hw: tuple[int, int], bin_size: int = 1) -> tuple[Tensor, int]:
    """Offset-bin index of every candidate match (i, j): ``Nq×Nk`` long, and the number of bins.

    The offset of a match is ``(y_j - y_i, x_j - x_i)`` in grid cells; offsets range over
    ``[-(Hq-1), Hk-1] × [-(Wq-1), Wk-1]`` and are grouped into square bins of ``bin_size`` cells.
    """
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1 cell, got {bin_size}")
    (hq, wq), (hk, wk) = q_hw, k_hw
    yq, xq = torch.meshgrid(torch.arange(hq), torch.arange(wq), indexing="ij")
    yk, xk = torch.meshgrid(torch.arange(hk), torch.arange(wk), indexing="ij")
    dy = yk.reshape(1, -1) - yq.reshape(-1, 1) + (hq - 1)  # Nq×Nk, >= 0
    dx = xk.reshape(1, -1) - xq.reshape(-1, 1) + (wq - 1)
    n_x = (wq + wk - 2) // bin_size + 1
    n_y = (hq + hk - 2) // bin_size + 1
    return (dy // bin_size) * n_x + dx // bin_size, n_y * n_x


def bin_counts(bins: Tensor, n_bins: int) -> Tensor:
    """How many candidate matches (i, j) fall in each offset bin. -> n_bins float.

    On an S×S pair of grids the zero-offset bin holds S² matches and a corner bin one; an
    unnormalised vote sum therefore favours small offsets whatever the features say.
    """
    flat = bins.reshape(-1)
    return torch.zeros(n_bins, device=bins.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))


def hough_votes(sim: Tensor, bins: Tensor, n_bins: int, topk: int = 0, normalise: bool = True) -> Tensor:
    """Vote mass per offset bin. -> B×n_bins.

    ``H[b, o] = Σ_{(i,j) in bin o} relu(sim[b, i, j]) / n(o)`` with ``n(o)`` the number of
    candidate matches in bin o (``bin_counts``): the mean ReLU'd similarity of the matches that
    agree on offset o, so every offset starts equal and only feature agreement raises a bin.
    ``normalise=False`` gives the plain sum (the pre-fix behaviour, kept for the mechanism tests).
    ``topk > 0`` lets each query cell vote only with its ``topk`` most similar candidates.
    Votes are the ReLU'd cosine similarities, as Convolutional Hough Matching's correlation
    [Min & Cho, CVPR 2021]; the PHM vote of a match is its appearance likelihood times the
    offset's geometric kernel [Cho et al., CVPR 2015], here a box kernel of one bin.
    """
    votes = sim.clamp_min(0)
    if 0 < topk < sim.shape[2]:
        kth = votes.topk(topk, dim=2).values[..., -1:]
        votes = votes * (votes >= kth)
    bins = bins.to(sim.device)
    flat_bins = bins.reshape(1, -1).expand(sim.shape[0], -1)
    mass = torch.zeros(sim.shape[0], n_bins, device=sim.device, dtype=votes.dtype).scatter_add_(
        1, flat_bins, votes.reshape(sim.shape[0], -1)
    )
    return mass / bin_counts(bins, n_bins).clamp_min(1) if normalise else mass


@torch.no_grad()
def hough_match(
    feat_q: Tensor, feat_k: Tensor, bin_size: int = 1, topk: int = 0, normalise: bool = True
) -> tuple[Tensor, Tensor]:
    """HoughCL positives: arg-max over key cells of ``sim(i, j) · H[bin(offset(i, j))]``.

    Returns ``(index B×Nq long, confidence B×Nq float)``; the confidence is the winning
    geometric confidence, normalised by the largest bin mass of the pair (in [0, 1] for sim <= 1).
    """
    sim = cell_similarity(feat_q, feat_k)
    bins, n_bins = offset_bins(tuple(feat_q.shape[2:]), tuple(feat_k.shape[2:]), bin_size)
    mass = hough_votes(sim, bins, n_bins, topk, normalise)  # B×n_bins
    bins = bins.to(sim.device)
    geo = sim * mass[:, bins]  # B×Nq×Nk: similarity × vote mass of the match's offset bin
    conf, index = geo.max(dim=2)
    return index, conf / mass.max(dim=1, keepdim=True).values.clamp_min(1e-12)


def gather_cells(grid: Tensor, index: Tensor) -> Tensor:
    """Pick key cells for every query cell: grid B×D×N, index B×Nq -> B×D×Nq."""
    return torch.gather(grid, 2, index.unsqueeze(1).expand(-1, grid.shape[1], -1))


def dense_infonce(q_grid: Tensor, k_grid: Tensor, index: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """DenseCL's dense loss: MoCo's InfoNCE over all B·Nq query cells (``losses.info_nce``).

    q_grid: B×D×Nq and k_grid: B×D×Nk dense projections (k without gradient); index: B×Nq matched
    key cell per query cell; queue: K×D pooled dense keys of past batches.
    loss = mean_i −log exp(q_i·k_m(i)/τ) / (exp(q_i·k_m(i)/τ) + Σ_n exp(q_i·queue_n/τ)).
    """
    cells = lambda g: g.transpose(1, 2).reshape(-1, g.shape[1])  # noqa: E731  B×D×N -> (B·N)×D
    return info_nce(cells(q_grid), cells(gather_cells(k_grid, index)), queue, temperature)


def geometric_truth(prov_q: ViewProvenance, prov_k: ViewProvenance, grid: tuple[int, int]) -> Tensor:
    """The key cell that truly shows each query cell's centre, from the views' provenance.

    -> B×Nq long; -1 where the query cell's centre (mapped to the canvas) is outside the key view.
    Used to score matchers (DenseCL's WTA, HoughCL's voting) during training; never in the loss.
    """
    gh, gw = grid
    centres = grid_centres(prov_q, grid)  # B×Nq×2 canvas (x, y)
    kb = prov_k.boxes.float().to(centres.device)
    u = (centres[..., 0] - kb[:, :1]) / (kb[:, 2:3] - kb[:, :1])  # fraction of the key box width
    v = (centres[..., 1] - kb[:, 1:2]) / (kb[:, 3:4] - kb[:, 1:2])
    u = torch.where(prov_k.flipped.to(u.device).view(-1, 1), 1 - u, u)
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    cell = (v * gh).floor().long().clamp(0, gh - 1) * gw + (u * gw).floor().long().clamp(0, gw - 1)
    return torch.where(inside, cell, torch.full_like(cell, -1))


def same_cell_rate(index: Tensor) -> Tensor:
    """Share of query cells matched to the key cell at their own grid position (index B×N).

    A collapse diagnostic: a matcher that ignores the features picks the same cell everywhere.
    """
    return (index == torch.arange(index.shape[1], device=index.device)).float().mean()


def match_accuracy(index: Tensor, truth: Tensor) -> Tensor:
    """Fraction of query cells with a true correspondence (truth >= 0) matched to exactly it.

    A 0-d tensor on the input's device (no host sync inside a training step); NaN if no cell
    has one.
    """
    valid = truth >= 0
    hits = ((index == truth) & valid).sum().float()
    return torch.where(valid.any(), hits / valid.sum().clamp_min(1), torch.full_like(hits, float("nan")))
