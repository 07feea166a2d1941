"""DenseCL blocks against naive references written from the paper's formulas."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cropbench.methods.dense import DenseHead, dense_infonce, offset_bins, wta_match


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def test_dense_head_is_per_cell_mlp_and_pools_the_grid():
    torch.manual_seed(0)
    head = DenseHead(6, 5, 4)
    x = torch.randn(2, 6, 3, 3)
    grid, pooled = head(x)
    assert grid.shape == (2, 4, 3, 3) and pooled.shape == (2, 4)
    w1, b1 = head.net[0].weight.view(5, 6), head.net[0].bias
    w2, b2 = head.net[2].weight.view(4, 5), head.net[2].bias
    for b in range(2):
        for y in range(3):
            for x_ in range(3):
                cell = w2 @ torch.relu(w1 @ x[b, :, y, x_] + b1) + b2
                assert torch.allclose(grid[b, :, y, x_], cell, atol=1e-5)
    assert torch.allclose(pooled, grid.mean(dim=(2, 3)))


def test_wta_match_is_the_argmax_of_cosine_similarity():
    g = torch.Generator().manual_seed(1)
    fq, fk = torch.randn(2, 8, 3, 4, generator=g), torch.randn(2, 8, 2, 5, generator=g)
    idx = wta_match(fq, fk)
    assert idx.shape == (2, 12)
    for b in range(2):
        for i in range(12):
            qv = fq[b, :, i // 4, i % 4]
            sims = [_cos(qv, fk[b, :, j // 5, j % 5]) for j in range(10)]
            assert idx[b, i].item() == max(range(10), key=sims.__getitem__)


def test_offset_bins_against_hand_computed_offsets():
    bins, n = offset_bins((2, 2), (3, 3), bin_size=1)
    assert n == 4 * 4  # dy in [-1, 2], dx in [-1, 2]
    # query cell (1, 1) = index 3, key cell (0, 0) = index 0: offset (-1, -1) -> bin (0, 0)
    assert bins[3, 0].item() == 0
    # query (0, 0) -> key (2, 2): offset (2, 2) -> shifted (3, 3) -> 3 * 4 + 3
    assert bins[0, 8].item() == 15
    # query (0, 1) -> key (1, 0): offset (1, -1) -> shifted (2, 0) -> 8
    assert bins[1, 3].item() == 8
    coarse, n2 = offset_bins((2, 2), (3, 3), bin_size=2)
    assert n2 == 4 and coarse[0, 8].item() == 3 and coarse[3, 0].item() == 0


def test_dense_infonce_matches_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    b, d, nq, nk, kq = 2, 6, 4, 5, 7
    q = F.normalize(torch.randn(b, d, nq, generator=g), dim=1)
    k = F.normalize(torch.randn(b, d, nk, generator=g), dim=1)
    queue = F.normalize(torch.randn(kq, d, generator=g), dim=1)
    index = torch.randint(nk, (b, nq), generator=g)
    tau = 0.2
    total = 0.0
    for bb in range(b):
        for i in range(nq):
            qi = q[bb, :, i]
            pos = math.exp(float(qi @ k[bb, :, index[bb, i]]) / tau)
            neg = sum(math.exp(float(qi @ queue[n]) / tau) for n in range(kq))
            total += -math.log(pos / (pos + neg))
    assert abs(dense_infonce(q, k, index, queue, tau).item() - total / (b * nq)) < 1e-4
