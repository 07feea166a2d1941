"""DenseCL blocks against naive references written from the paper's formulas."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from cropbench.backbones import resnet_micro
from cropbench.config import from_dict
from cropbench.methods.base import ImageBatch, MethodContext, ViewProvenance
from cropbench.methods.dense import (
    DenseHead,
    dense_infonce,
    geometric_truth,
    match_accuracy,
    offset_bins,
    wta_match,
)
from cropbench.registry import METHODS


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


# ------------------------------------------------------------------ the DenseCL method


def tiny_batch(n: int = 4, size: int = 64, seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageBatch(images, torch.zeros(n, dtype=torch.long), torch.arange(n))


def tiny_method(name: str, **params) -> torch.nn.Module:
    cls = METHODS.get(name)
    base = {"views": {"size": 32, "blur_p": 0.0}, "hidden_dim": 32, "out_dim": 8, "queue_size": 16}
    if name != "regioncl_s":
        base["dense_hidden_dim"] = 16
    cfg = from_dict(cls.Config, {k: v for k, v in {**base, **params}.items() if k in _fields(cls)})
    torch.manual_seed(0)
    return cls(cfg, resnet_micro(widths=(8, 8, 8, 16)), MethodContext())


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


def naive_infonce(q: torch.Tensor, pos: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    """mean_i -log exp(q_i·pos_i/τ) / (exp(q_i·pos_i/τ) + Σ_n exp(q_i·queue_n/τ)), row by row."""
    total = 0.0
    for i in range(q.shape[0]):
        p = math.exp(float(q[i] @ pos[i]) / tau)
        total += -math.log(p / (p + sum(math.exp(float(q[i] @ n) / tau) for n in queue)))
    return total / q.shape[0]


def naive_wta(c5_q: torch.Tensor, c5_k: torch.Tensor) -> list[list[int]]:
    b, _, h, w = c5_q.shape
    cells = [(y, x) for y in range(h) for x in range(w)]
    return [
        [
            max(
                range(len(cells)),
                key=lambda j: _cos(c5_q[bb, :, y, x], c5_k[bb, :, cells[j][0], cells[j][1]]),
            )
            for (y, x) in cells
        ]
        for bb in range(b)
    ]


@torch.no_grad()
def reference_dense_loss(m, batch: ImageBatch, seed: int, matcher) -> tuple[float, torch.Tensor]:
    """DenseCL's loss recomputed from its definition: (1-λ)·global InfoNCE + λ·dense InfoNCE with
    the positive of each query cell given by ``matcher`` on the backbone C5 maps."""
    v_q, v_k = m.make_views(batch, torch.Generator().manual_seed(seed))
    c5q = m.backbone.forward_stages(v_q.tensor)[-1]
    c5k = m.key_backbone.forward_stages(v_k.tensor)[-1]
    q = F.normalize(m.projector(c5q.mean(dim=(2, 3))), dim=1)
    k = F.normalize(m.key_projector(c5k.mean(dim=(2, 3))), dim=1)
    qg = F.normalize(m.dense_head.net(c5q).flatten(2), dim=1)  # B×D×N
    kg_map = m.key_dense_head.net(c5k)
    kg = F.normalize(kg_map.flatten(2), dim=1)
    tau, lam = m.cfg.temperature, m.cfg.dense_weight
    loss_g = naive_infonce(q, k, m.queue.keys, tau)
    match = matcher(c5q, c5k)
    cells_q = torch.cat([qg[b].T for b in range(len(match))])
    cells_k = torch.cat([kg[b][:, match[b]].T for b in range(len(match))])
    loss_d = naive_infonce(cells_q, cells_k, m.dense_queue.keys, tau)
    return (1 - lam) * loss_g + lam * loss_d, F.normalize(kg_map.mean(dim=(2, 3)), dim=1)


def test_densecl_step_equals_the_loss_written_from_the_paper():
    m, batch = tiny_method("densecl"), tiny_batch()
    ref, pooled_keys = reference_dense_loss(m, batch, 3, naive_wta)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(3))
    assert abs(out.loss.item() - ref) < 1e-4
    assert out.loss.requires_grad and set(out.logs) >= {"loss_global", "loss_dense", "match_acc"}
    # the dense queue received the pooled dense keys of this batch
    assert int(m.dense_queue.ptr) == 4 and torch.allclose(
        m.dense_queue.keys[:4], pooled_keys, atol=1e-5
    )
    before = m.key_dense_head.net[0].weight.clone()
    out.loss.backward()
    assert (
        m.dense_head.net[0].weight.grad is not None and m.key_dense_head.net[0].weight.grad is None
    )
    m.dense_head.net[0].weight.data.add_(1.0)
    m.after_step(0)  # key dense head <- m·key + (1-m)·online
    expected = m.cfg.momentum * before + (1 - m.cfg.momentum) * m.dense_head.net[0].weight
    assert torch.allclose(m.key_dense_head.net[0].weight, expected, atol=1e-6)


def test_geometric_truth_against_hand_computed_cells():
    boxes_q = torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 2)
    boxes_k = torch.tensor([[16.0, 0.0, 48.0, 32.0]] * 2)
    prov = lambda b, f: ViewProvenance(b, torch.tensor(f), (64, 64), (32, 32))  # noqa: E731
    truth = geometric_truth(prov(boxes_q, [False, False]), prov(boxes_k, [False, True]), (4, 4))
    # query cell (r, c) has its centre at canvas x = 8c + 4: inside the key box for c >= 2,
    # where it is key column c - 2 (unflipped) or 3 - (c - 2) (flipped key view)
    for r in range(4):
        for c in range(4):
            i = 4 * r + c
            assert truth[0, i] == (4 * r + c - 2 if c >= 2 else -1)
            assert truth[1, i] == (4 * r + 3 - (c - 2) if c >= 2 else -1)
    assert abs(float(match_accuracy(truth[0].unsqueeze(0), truth[:1])) - 1.0) < 1e-6
