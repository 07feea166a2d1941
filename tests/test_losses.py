"""Losses against naive loops written from the papers' formulas; EMA, momentum schedule, queue."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cropbench.dist import DistContext
from cropbench.methods.heads import Block, MLPHead, mlp, simsiam_projector
from cropbench.methods.losses import info_nce, negative_cosine, normalized_mse, nt_xent, symmetric
from cropbench.methods.momentum import (
    Queue,
    batch_shuffle,
    batch_unshuffle,
    cosine_momentum,
    ema_update,
    momentum_copy,
)

ONE = DistContext()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1: −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), averaged over all 2N anchors."""
    z = list(z1.double()) + list(z2.double())
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2  # the other view of the same image
        den = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(_cos(z[i], z[j]) / tau) / den)
    return total / n2


def naive_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    """MoCo eq. 1: −log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_queue exp(q·k−/τ)), averaged over queries."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(_cos(q[i].double(), k[i].double()) / tau)
        neg = sum(math.exp(_cos(q[i].double(), n.double()) / tau) for n in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def test_nt_xent_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for tau in (0.1, 0.5):
        assert float(nt_xent(z1, z2, tau, ONE)) == pytest.approx(naive_nt_xent(z1, z2, tau), rel=1e-5)


def test_nt_xent_gradient_matches_autograd_of_the_formula() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = (
        torch.randn(4, 6, generator=g, requires_grad=True),
        torch.randn(4, 6, generator=g, requires_grad=True),
    )
    nt_xent(z1, z2, 0.2, ONE).backward()
    ours = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    zs = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    loss = 0
    for i in range(8):  # the same formula, one anchor at a time
        sims = torch.stack([zs[i] @ zs[k] / 0.2 for k in range(8) if k != i])
        loss = loss - (zs[i] @ zs[(i + 4) % 8] / 0.2 - torch.logsumexp(sims, 0))
    (loss / 8).backward()
    torch.testing.assert_close(ours, (z1.grad, z2.grad))


def test_info_nce_with_queue_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, queue = (
        torch.randn(4, 8, generator=g),
        torch.randn(4, 8, generator=g),
        torch.randn(11, 8, generator=g),
    )
    assert float(info_nce(q, k, queue, 0.2)) == pytest.approx(naive_info_nce(q, k, queue, 0.2), rel=1e-5)


def test_regression_losses_match_formulas_and_stop_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    p1, p2 = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g)
    z1, z2 = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g)
    a, b = p1.detach(), z1.detach()
    byol = sum(float(((a[i] / a[i].norm() - b[i] / b[i].norm()) ** 2).sum()) for i in range(6)) / 6
    assert normalized_mse(p1, z1).item() == pytest.approx(byol, rel=1e-5)
    simsiam = -sum(_cos(a[i], b[i]) for i in range(6)) / 6
    assert negative_cosine(p1, z1).item() == pytest.approx(simsiam, rel=1e-5)
    sym = 0.5 * (negative_cosine(p1, z2).item() + negative_cosine(p2, z1).item())
    assert symmetric(negative_cosine, p1, p2, z1, z2).item() == pytest.approx(sym, rel=1e-6)
    negative_cosine(p1, z1).backward()
    assert p1.grad is not None and z1.grad is None  # stop-gradient on the target branch


def test_ema_update_by_hand() -> None:
    online, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        online.bias.fill_(3.0)
        target.weight.copy_(torch.tensor([[5.0, -1.0]]))
        target.bias.fill_(0.0)
    ema_update(target, online, 0.9)  # 0.9·t + 0.1·o
    torch.testing.assert_close(target.weight, torch.tensor([[4.6, -0.7]]))
    torch.testing.assert_close(target.bias, torch.tensor([0.3]))
    assert online.weight.tolist() == [[1.0, 2.0]]


def test_momentum_copy_is_equal_and_frozen() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    copy = momentum_copy(net)
    assert all(not p.requires_grad for p in copy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), copy.state_dict().values(), strict=True))


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(25, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_queue_fifo_wraps_around() -> None:
    q = Queue(5, 2)
    keys = torch.arange(16, dtype=torch.float).view(8, 2)
    q.enqueue(keys[:3], ONE)
    assert int(q.ptr) == 3 and torch.equal(q.keys[:3], keys[:3])
    q.enqueue(keys[3:6], ONE)  # slots 3, 4, then wraps to 0
    assert int(q.ptr) == 1
    assert torch.equal(q.keys, torch.stack([keys[5], keys[1], keys[2], keys[3], keys[4]]))
    assert q.age().tolist() == [0, 4, 3, 2, 1]
    q.enqueue(keys, ONE)  # 8 > 5 keys at once: the last 5 survive, oldest first from the pointer
    assert int(q.ptr) == (1 + 8) % 5
    assert sorted(q.keys[:, 0].tolist()) == keys[3:, 0].tolist()
    assert torch.equal(q.keys[(int(q.ptr) - 1) % 5], keys[7])
    assert set(dict(q.named_buffers())) == {"keys", "ptr"}


def test_batch_shuffle_is_identity_on_one_process() -> None:
    x = torch.randn(4, 3)
    shuffled, inv = batch_shuffle(x, ONE, torch.Generator())
    assert shuffled is x and inv is None and batch_unshuffle(x, inv, ONE) is x


def test_heads_from_blocks() -> None:
    head = MLPHead([Block(8, 16, "bn", True, False), Block(16, 4)])
    assert [type(m).__name__ for m in head.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.layers[0].bias is None and head(torch.randn(3, 8)).shape == (3, 4)
    proj = simsiam_projector(8, 16)
    assert not proj.layers[-1].affine and proj.out_dim == 16
    assert len(mlp([8, 4], hidden_norm="none").layers) == 1
    with pytest.raises(ValueError, match="block 1 takes 5 features, block 0 gives 16"):
        MLPHead([Block(8, 16), Block(5, 4)])
