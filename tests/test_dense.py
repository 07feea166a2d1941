"""DenseCL blocks against naive references written from the paper's formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cropbench.backbones import resnet_micro
from cropbench.methods.base import MethodContext
from cropbench.methods.dense import (
    DenseHead,
    dense_infonce,
    geometric_truth,
    match_accuracy,
    offset_bins,
    wta_match,
)
from cropbench.recipe import load_entry
from cropbench.registry import METHODS
from cropbench.runner import method_from_params
from cropbench.types import ImageBatch, ViewProvenance


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


def tiny_method(name: str, cells: list[int] | None = None, **params) -> torch.nn.Module:
    """A small ``name`` on 32-px views (RegionCL: region boxes of ``cells`` C5 cells)."""
    cls = METHODS.get(name)
    base = {"hidden_dim": 32, "out_dim": 8, "queue_size": 16}
    base["shuffle_bn_splits"] = 1  # key BN over the whole batch, as the references (test_shuffle_bn)
    if name != "regioncl_s":
        base["dense_hidden_dim"] = 16
    view = {"size": 32, "blur_p": 0.0}
    views = {"views": view, **({"cells": cells} if cells else {})} if name.startswith("regioncl") else view
    params = {k: v for k, v in {**base, **params}.items() if k in _fields(cls)}
    torch.manual_seed(0)
    return method_from_params(name, {**params, "views": views}, resnet_micro(widths=(8, 8, 8, 16)), MethodContext())


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


def _logsumexp(xs: list[torch.Tensor]) -> torch.Tensor:
    top = max(float(x.detach()) for x in xs)
    return top + torch.log(sum(torch.exp(x - top) for x in xs))


def _contrastive_head(pos: torch.Tensor, negs: list[torch.Tensor], tau: float) -> torch.Tensor:
    """ContrastiveHead: cross-entropy of logits [pos, negs...]/τ with label 0, for one row."""
    return -pos / tau + _logsumexp([pos / tau, *[n / tau for n in negs]])


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def official_densecl_loss(m, batch: ImageBatch, seed: int, matcher=None):
    """DenseCL's loss written loop by loop from the official ``forward_train``.

    Source: WXinlong/DenseCL@b64bbb6e267f729d16ca558233b0ef3028857381:openselfsup/models/densecl.py
    (``forward_train``), ``models/necks.py`` (``DenseCLNeck``: avgpool-mlp, mlp2 on the grid,
    avgpool2 of the mlp2 output) and ``models/heads/contrastive_head.py`` (cross-entropy over
    [l_pos, l_neg] / τ, label 0):

        q, q_grid, q_b = normalize(mlp(avgpool(C5_q))), normalize(mlp2(C5_q)), normalize(C5_q)
        ind[n, s] = argmax_t q_b[n, :, s] · k_b[n, :, t]               # backbone_sim_matrix
        loss_single = CE([q·k, q·queue] / τ); loss_dense = CE([q_grid·k_grid[ind], q_grid·queue2] / τ)
        loss = (1 - λ)·loss_single + λ·loss_dense;  enqueue k, normalize(avgpool2(mlp2(C5_k)))

    Keys come from the method's own momentum-encoder pass (``dense.encode_key``: shuffle-BN is
    the key encoder's business, pinned elsewhere); ``matcher(c5_q, c5_k) -> [[key cell per query
    cell]]`` replaces the arg-max (HoughCL). Returns (loss with gradient, matches, key outputs).
    """
    g = torch.Generator().manual_seed(seed)
    v_q, v_k = m.make_views(batch, g)
    c5q = m.backbone.forward_stages(v_q.tensor)[-1]  # B×C×S×S, with gradient
    q = m.projector(c5q.mean(dim=(2, 3)))
    q_grid = m.dense.head.net(c5q).flatten(2)  # B×D×S² (mlp2 output before normalisation)
    with torch.no_grad():
        k_out = m.dense.encode_key(m, v_k.tensor, g)
    b, _, n_cells = q_grid.shape
    tau, lam = m.cfg.temperature, m.cfg.dense_weight
    queue, queue2 = m.queue.keys.clone(), m.dense.queue.keys.clone()  # K×D (official: D×K)
    single = [
        _contrastive_head(_unit(q[n]) @ k_out.emb[n], [_unit(q[n]) @ key for key in queue], tau) for n in range(b)
    ]
    q_b, k_b = c5q.detach().flatten(2), k_out.c5.flatten(2)
    matches, dense = [], []
    for n in range(b):
        if matcher is None:
            ind = [
                max(range(n_cells), key=lambda t: float(_unit(q_b[n, :, s]) @ _unit(k_b[n, :, t])))
                for s in range(n_cells)
            ]
        else:
            ind = matcher(c5q.detach()[n : n + 1], k_out.c5[n : n + 1])[0]
        matches.append(ind)
        for s in range(n_cells):
            qs = _unit(q_grid[n, :, s])
            pos = qs @ k_out.grid[n, :, ind[s]]
            dense.append(_contrastive_head(pos, [qs @ key for key in queue2], tau))
    loss = (1 - lam) * sum(single) / b + lam * sum(dense) / (b * n_cells)
    return loss, matches, k_out


def _grads(m) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


def assert_step_equals_official(m, batch: ImageBatch, seed: int, matcher=None) -> list:
    """One ``training_step`` against ``official_densecl_loss``: loss, every parameter's gradient,
    the logged components and both queues. Returns the reference's matches."""
    ref, matches, k_out = official_densecl_loss(m, batch, seed, matcher)
    ref.backward()
    ref_grads = _grads(m)
    m.zero_grad(set_to_none=True)
    queue_before, ptr = m.queue.keys.clone(), int(m.queue.ptr)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(seed))
    assert abs(out.loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    out.loss.backward()
    grads = _grads(m)
    assert set(grads) == set(ref_grads) and any("dense.head" in k for k in grads)
    for name, gr in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-8)
        assert (gr - ref_grads[name]).abs().max() <= 1e-4 * scale, name
    lam = m.cfg.dense_weight  # components are logged: the trainer summarises every loss_* key
    logged = (1 - lam) * out.logs["loss_global"] + lam * out.logs["loss_dense"]
    assert abs(float(logged) - out.loss.item()) < 1e-5
    n = batch.images.shape[0]  # enqueue: global keys into queue 1, pooled dense keys into queue 2
    assert int(m.queue.ptr) == int(m.dense.queue.ptr) == ptr + n
    assert torch.allclose(m.queue.keys[ptr : ptr + n], k_out.emb, atol=1e-6)
    assert torch.allclose(m.dense.queue.keys[ptr : ptr + n], k_out.pooled, atol=1e-6)
    assert torch.equal(m.queue.keys[ptr + n :], queue_before[ptr + n :])
    return matches


@pytest.mark.parametrize("dense_bn", [False, True])
def test_densecl_loss_and_gradients_equal_the_official_formula(dense_bn: bool):
    """Both queues hold random unit keys (as MoCo initialises them), so every logit counts."""
    m, batch = tiny_method("densecl", dense_bn=dense_bn), tiny_batch()
    assert_step_equals_official(m, batch, seed=3)


def test_official_densecl_reference_catches_a_wrong_weight_or_matcher():
    """The pin can fail: another λ, or identity instead of arg-max matching, moves the loss."""
    m, batch = tiny_method("densecl"), tiny_batch()
    ident = lambda q, k: [list(range(q.shape[2] * q.shape[3]))]  # noqa: E731
    with torch.no_grad():
        ref = official_densecl_loss(m, batch, seed=3)[0].item()
        off = official_densecl_loss(m, batch, seed=3, matcher=ident)[0].item()
        m.dense.weight = 0.3  # λ, as the dense branch holds it (cfg.dense_weight at construction)
        out = m.training_step(batch, 0, torch.Generator().manual_seed(3)).loss.item()
    assert abs(out - ref) > 1e-3 and abs(off - ref) > 1e-3


def test_densecl_momentum_updates_the_key_dense_head():
    m, batch = tiny_method("densecl"), tiny_batch()
    before = m.dense.key_head.net[0].weight.clone()
    m.training_step(batch, 0, torch.Generator().manual_seed(3)).loss.backward()
    assert m.dense.head.net[0].weight.grad is not None and m.dense.key_head.net[0].weight.grad is None
    m.dense.head.net[0].weight.data.add_(1.0)
    m.after_step(0)  # key dense head <- m·key + (1-m)·online
    expected = m.cfg.momentum * before + (1 - m.cfg.momentum) * m.dense.head.net[0].weight
    assert torch.allclose(m.dense.key_head.net[0].weight, expected, atol=1e-6)


def test_dense_head_bn_is_conv_bn_relu_conv_bn_per_cell():
    """``bn=True``: BatchNorm2d statistics over B×H×W of each channel, computed here by hand."""
    torch.manual_seed(0)
    head = DenseHead(6, 5, 4, bn=True).train()
    x = torch.randn(3, 6, 2, 2)
    grid, pooled = head(x)

    def bn(h: torch.Tensor, affine: torch.nn.Module | None = None) -> torch.Tensor:
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        out = (h - mean) / torch.sqrt(var + 1e-5)
        if affine is None:
            return out
        return out * affine.weight.view(1, -1, 1, 1) + affine.bias.view(1, -1, 1, 1)

    w1, w2 = head.net[0].weight.view(5, 6), head.net[3].weight.view(4, 5)
    h = torch.relu(bn(torch.einsum("oc,bchw->bohw", w1, x), head.net[1]))
    expected = bn(torch.einsum("oc,bchw->bohw", w2, h))
    assert torch.allclose(grid, expected, atol=1e-5)
    assert torch.allclose(pooled, grid.mean(dim=(2, 3)))
    assert head.net[0].bias is None and not head.net[4].affine


def test_micro_recipes_turn_the_dense_head_bn_on_as_a_recorded_deviation():
    for name in ("densecl", "houghcl"):
        entry = load_entry(name)
        micro, paper = entry.recipe("default", "micro"), entry.recipe("default", "paper")
        assert micro.params["dense_bn"] is True and not paper.params.get("dense_bn", False)
        assert "ln(1025)" in micro.deviations["params.dense_bn"]


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
