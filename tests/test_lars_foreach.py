"""The foreach LARS (``torch._foreach_*`` over each group's parameters) against a per-parameter
reference written here from the formula: You et al. 2017 (arXiv 1708.03888, Algorithm 1) in
optax's order, as BYOL and BraVe use it (google-deepmind/optax@2edbcbe:optax/_src/alias.py
``lars``: add_decayed_weights -> scale_by_trust_ratio -> trace(momentum, nesterov); biases and
norm parameters masked out of decay and adaptation, deepmind/brave@0ae20d9:
brave/training/optimizers.py ``exclude_bias_and_normalizers``)::

    d = g + wd * w;  u = trust * ||w|| / ||d|| * d  (u = d where ||w|| or ||d|| is 0)
    buf = momentum * buf + u  (buf = u at the first step);  w -= lr * (u + momentum * buf | buf)

On CPU the foreach ops run the same per-tensor kernels as the loop, so the updates are equal bit
for bit (measured: max |diff| = 0 over 5 steps of a resnet_micro); the tests demand exactly that.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from cropbench.backbones import build_backbone
from cropbench.optim import LARS, build_optimizer, named_params
from cropbench.recipe import OptimConfig


class LoopLARS(torch.optim.Optimizer):
    """The reference: one parameter at a time, straight from the formula above."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float, trust: float, nesterov: bool):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust, nesterov=nesterov, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                u = p.grad
                if group["lars"]:
                    d = p.grad.add(p, alpha=group["weight_decay"])
                    wn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ok = (wn > 0) & (dn > 0)
                    u = d.mul(torch.where(ok, group["trust"] * wn / dn, torch.ones_like(wn)))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = u.clone()
                else:
                    buf.mul_(group["momentum"]).add_(u)
                p.add_(u.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf, alpha=-group["lr"])


def _params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (3, 3), (5,), (2, 2, 3)]
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    with torch.no_grad():
        ps[2].zero_()  # ||w|| = 0: trust ratio falls back to 1
    return ps


def _groups(ps: list[Tensor]) -> list[dict[str, Any]]:
    return [{"params": [ps[0], ps[2], ps[4]]}, {"params": [ps[1], ps[3]], "lars": False, "weight_decay": 0.0}]


def _run(opt_cls: type, nesterov: bool, steps: int = 5) -> list[Tensor]:
    ps = _params()
    kw = {"trust_coefficient" if opt_cls is LARS else "trust": 0.01}
    opt = opt_cls(_groups(ps), lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=nesterov, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 / (t + 1)  # a changing lr, as under a schedule
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=g)
            if i == 4 and t < 2:
                p.grad = None  # no gradient in the first steps (its momentum buffer starts later)
            if i == 0 and t == 3:
                p.grad = torch.zeros_like(p)  # ||d|| = wd * ||w|| only
        opt.step()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_foreach_lars_equals_the_per_parameter_loop(nesterov: bool) -> None:
    for got, want in zip(_run(LARS, nesterov), _run(LoopLARS, nesterov), strict=True):
        assert torch.equal(got, want)


def test_the_reference_can_tell_nesterov_from_heavy_ball() -> None:
    """The comparison above could fail: flipping Nesterov moves the weights by far more than 0."""
    diff = max((a - b).abs().max().item() for a, b in zip(_run(LARS, True), _run(LARS, False), strict=True))
    assert diff > 1e-3


def test_first_step_matches_hand_computed_numbers() -> None:
    """w = (3, 4), g = (0, 1), wd = 0.5, trust = 0.1, lr = 1: d = (1.5, 3), ||w|| = 5,
    ||d|| = sqrt(11.25); u = 0.1 * 5 / sqrt(11.25) * d; first step w -= u (heavy ball, buf = u)
    or w -= u + 0.9 u (Nesterov)."""
    for nesterov, factor in ((False, 1.0), (True, 1.9)):
        w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
        opt = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.5, trust_coefficient=0.1, nesterov=nesterov)
        w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
        opt.step()
        scale = 0.1 * 5 / 11.25**0.5
        want = torch.tensor([3 - factor * scale * 1.5, 4 - factor * scale * 3.0], dtype=torch.float64)
        assert torch.allclose(w.detach(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_resnet_micro_with_bias_norm_exclusion_and_resume(nesterov: bool) -> None:
    """build_optimizer's split (weights adapted, biases / BN not) on a real backbone: 5 steps of the
    foreach LARS equal the loop's; the state_dict round-trips (a resumed optimizer continues alike)."""
    cfg = OptimConfig(name="lars", weight_decay=1e-2, exclude_bias_norm=True, trust_coefficient=1e-3, nesterov=nesterov)
    torch.manual_seed(0)
    nets = [build_backbone("resnet_micro", widths=[8, 8, 16, 16]) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = build_optimizer([{"params": list(nets[0].parameters())}], named_params(nets[0]), cfg, 0.8)
    ref_groups = [{k: v for k, v in g.items() if k != "params"} for g in ours.param_groups]
    index = {p: i for i, p in enumerate(nets[0].parameters())}
    ref_params = list(nets[1].parameters())
    for rg, g in zip(ref_groups, ours.param_groups, strict=True):
        rg["params"] = [ref_params[index[p]] for p in g["params"]]
    ref = LoopLARS(ref_groups, lr=0.8, momentum=0.9, weight_decay=1e-2, trust=1e-3, nesterov=nesterov)
    assert {g["lars"] for g in ours.param_groups} == {True, False}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for t in range(5):
        if t == 3:  # resume: a fresh optimizer from the state_dict
            state = ours.state_dict()
            ours = build_optimizer([{"params": list(nets[0].parameters())}], named_params(nets[0]), cfg, 0.8)
            ours.load_state_dict(state)
        for net, opt in ((nets[0], ours), (nets[1], ref)):
            opt.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
