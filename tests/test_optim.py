"""LARS (+ Nesterov) against a naive per-element loop of the formula, and build_optimizer's wiring.

Reference: optax.lars (google-deepmind/optax@2edbcbe:optax/_src/alias.py, ``lars``) chains
add_decayed_weights -> scale_by_trust_ratio (optax/_src/transform.py) -> scale_by_learning_rate
-> trace(decay=momentum, nesterov) (optax/transforms/_accumulation.py: ``new_trace = g + decay *
trace``; with nesterov the update is ``g + decay * new_trace``). BraVe uses it with
nesterov=True, momentum 0.9, trust 0.001, wd 1e-2 (deepmind/brave@0ae20d9:brave/models/brave/
config.py), biases and norm parameters masked out of decay and trust ratio
(brave/training/optimizers.py ``exclude_bias_and_normalizers``).
"""

from __future__ import annotations

import math

import pytest
import torch

from cropbench.errors import ConfigError
from cropbench.optim import LARS, build_optimizer, named_params
from cropbench.recipe import OptimConfig


def naive_lars(
    weights: list[list[float]],
    grads_per_step: list[list[list[float]]],
    lrs: list[float],
    lars: list[bool],
    momentum: float,
    wd: float,
    trust: float,
    nesterov: bool,
) -> list[list[float]]:
    """Plain-Python LARS: per parameter, per element, step by step."""
    w = [list(p) for p in weights]
    bufs: list[list[float] | None] = [None] * len(w)
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for i, g in enumerate(grads):
            d = [g[j] + (wd * w[i][j] if lars[i] else 0.0) for j in range(len(g))]
            if lars[i]:
                wn = math.sqrt(sum(v * v for v in w[i]))
                dn = math.sqrt(sum(v * v for v in d))
                ratio = trust * wn / dn if wn > 0 and dn > 0 else 1.0
                d = [v * ratio for v in d]
            buf = bufs[i]
            buf = list(d) if buf is None else [momentum * b + v for b, v in zip(buf, d, strict=True)]
            bufs[i] = buf
            for j in range(len(d)):
                step = d[j] + momentum * buf[j] if nesterov else buf[j]
                w[i][j] -= lr * step
    return w


def _run_lars(nesterov: bool, steps: int = 4) -> tuple[list[torch.Tensor], list[list[float]]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2)]
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    with torch.no_grad():
        params[2].zero_()  # ||w|| = 0: trust ratio falls back to 1
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    lrs = [0.5, 0.4, 0.3, 0.2][:steps]  # a changing lr, as under a schedule
    lars_flags = [True, False, True]  # the bias-like vector skips decay and adaptation
    opt = LARS(
        [{"params": [params[0], params[2]]}, {"params": [params[1]], "lars": False, "weight_decay": 0.0}],
        lr=lrs[0],
        momentum=0.9,
        weight_decay=0.1,
        trust_coefficient=0.01,
        nesterov=nesterov,
    )
    w0 = [p.detach().flatten().tolist() for p in params]
    for gs, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, gr in zip(params, gs, strict=True):
            p.grad = gr.clone()
        opt.step()
    ref = naive_lars(
        w0,
        [[gr.flatten().tolist() for gr in gs] for gs in grads],
        lrs,
        lars_flags,
        momentum=0.9,
        wd=0.1,
        trust=0.01,
        nesterov=nesterov,
    )
    return params, ref


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_a_naive_loop_of_the_formula(nesterov: bool) -> None:
    params, ref = _run_lars(nesterov)
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p.detach().flatten(), torch.tensor(r, dtype=torch.float64), atol=1e-12)


def test_nesterov_changes_the_trajectory() -> None:
    """The test above can fail: the heavy-ball reference does not match the Nesterov run."""
    params, _ = _run_lars(nesterov=True)
    _, heavy_ball = _run_lars(nesterov=False)
    diff = max(
        (p.detach().flatten() - torch.tensor(r, dtype=torch.float64)).abs().max().item()
        for p, r in zip(params, heavy_ball, strict=True)
    )
    assert diff > 1e-3


def test_lars_first_nesterov_step_by_hand() -> None:
    """One step, hand-computed: w = (3, 4), g = (0, 5), wd 0, trust 0.1 -> ratio 0.1·5/5 = 0.1,
    u = (0, 0.5), buf = u, Nesterov update u + 0.9·buf = (0, 0.95), lr 1 -> w = (3, 3.05)."""
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.1, nesterov=True)
    w.grad = torch.tensor([0.0, 5.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 3.05]))


def test_build_optimizer_passes_nesterov() -> None:
    net = torch.nn.Linear(3, 2)
    named = named_params(net)
    groups = [{"params": list(net.parameters())}]
    lars = build_optimizer(groups, named, OptimConfig(name="lars", nesterov=True, exclude_bias_norm=True), 0.1)
    assert isinstance(lars, LARS) and all(g["nesterov"] for g in lars.param_groups)
    assert [g["lars"] for g in lars.param_groups] == [True, False]  # bias: no adaptation, no decay
    sgd = build_optimizer(groups, named, OptimConfig(name="sgd", nesterov=True), 0.1)
    assert all(g["nesterov"] for g in sgd.param_groups)
    assert not build_optimizer(groups, named, OptimConfig(name="lars"), 0.1).param_groups[0]["nesterov"]
    with pytest.raises(ConfigError, match="optim.nesterov"):
        build_optimizer(groups, named, OptimConfig(name="adamw", nesterov=True), 0.1)


def test_grad_scale_multiplies_the_gradient_before_decay_and_trust_ratio() -> None:
    """BraVe's x10 on the predictor heads the optax chain: d = 10·g + wd·w enters the trust ratio,
    so with LARS the step barely grows (here: hand-computed), unlike an lr x10."""
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 4.0]]))
    cfg = OptimConfig(name="lars", momentum=0.0, weight_decay=0.5, trust_coefficient=0.1)
    opt = build_optimizer([{"params": list(net.parameters()), "grad_scale": 10.0}], named_params(net), cfg, 1.0)
    net.weight.grad = torch.tensor([[0.0, 1.0]])
    opt.step()
    d = torch.tensor([0.0, 10.0]) + 0.5 * torch.tensor([3.0, 4.0])  # (1.5, 12), ||d|| = 12.093
    expected = torch.tensor([3.0, 4.0]) - 0.1 * 5.0 / d.norm() * d
    assert torch.allclose(net.weight.detach()[0], expected, atol=1e-6)
    # the broken reading (lr x10 on the unscaled gradient) moves ~10x further
    d1 = torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor([3.0, 4.0])
    lr10 = torch.tensor([3.0, 4.0]) - 10 * 0.1 * 5.0 / d1.norm() * d1
    assert (lr10 - torch.tensor([3.0, 4.0])).norm() > 5 * (expected - torch.tensor([3.0, 4.0])).norm()
