"""Optimizers (SGD, LARS, AdamW) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cropbench.errors import ConfigError
from cropbench.recipe import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) around SGD with (optionally Nesterov) momentum, as BYOL / SimCLR /
    CYBORGS / BraVe use it.

    Per parameter, in optax's order (``optax.lars``: weight decay, trust ratio, lr, momentum)::

        d = g + wd * w
        u = trust * ||w|| / ||d|| * d          (u = d where ||w|| or ||d|| is 0)
        buf = momentum * buf + u                (buf = u at the first step)
        w -= lr * (u + momentum * buf)          with nesterov, else w -= lr * buf

    Groups with ``lars=False`` (biases and norm parameters when ``exclude_bias_norm``) skip both
    adaptation and weight decay. The lr multiplies the buffer (PyTorch's convention); optax scales
    before the trace, which differs only while the lr changes within the momentum horizon.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        nesterov: bool = False,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            lars=True,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - closure unused, as in SGD without it
        """One update of every group, with ``torch._foreach_*`` ops over the group's parameters
        (one call per operation instead of a Python loop over parameters)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                u = self._adapted(params, group)
                bufs = self._momentum(params, u, group["momentum"])
                updates = torch._foreach_add(u, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
                torch._foreach_add_(params, updates, alpha=-group["lr"])

    @staticmethod
    def _adapted(params: list[Tensor], group: dict[str, Any]) -> list[Tensor]:
        """u = trust * ||w|| / ||d|| * d with d = g + wd * w, per parameter (u = g for lars=False).

        The trust ratio falls back to 1 where ||w|| or ||d|| is 0 (a zero-initialised parameter)."""
        grads = [p.grad for p in params]
        if not group["lars"]:
            return grads
        d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))
        ratio = torch.where(
            (w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm)
        )
        torch._foreach_mul_(d, ratio.unbind())  # on the device: no host sync
        return d

    def _momentum(self, params: list[Tensor], u: list[Tensor], momentum: float) -> list[Tensor]:
        """buf = momentum * buf + u (buf = u at a parameter's first step); the buffers, in order."""
        old = [self.state[p].get("momentum_buffer") for p in params]
        live = [i for i, b in enumerate(old) if b is not None]
        if live:
            torch._foreach_mul_([old[i] for i in live], momentum)
            torch._foreach_add_([old[i] for i in live], [u[i] for i in live])
        for i, p in enumerate(params):
            if old[i] is None:
                old[i] = self.state[p]["momentum_buffer"] = torch.clone(u[i]).detach()
        return old


def scale_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Step pre-hook: multiply each group's gradients by its ``grad_scale`` (default 1), before
    weight decay, LARS adaptation and momentum, as BraVe's ``_scale_by_module_name`` heads its
    optax chain (deepmind/brave@0ae20d9 brave/training/optimizers.py)."""
    for group in optimizer.param_groups:
        scale = group.get("grad_scale", 1.0)
        if scale != 1.0:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale)


def _is_bias_or_norm(name: str, p: Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    groups: list[dict[str, Any]], named: dict[Tensor, str], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Build the optimizer over the method's parameter groups (each may carry ``fixed_lr``,
    ``lr_scale`` and ``grad_scale``; ``scale_gradients`` applies the last before every step).

    With ``exclude_bias_norm`` every group is split so biases and norm parameters get no weight
    decay (and no LARS adaptation), as BYOL/SimCLR's LARS setups do.
    """
    final: list[dict[str, Any]] = []
    for g in groups:
        extra = {k: v for k, v in g.items() if k != "params"}
        params = list(g["params"])
        if cfg.exclude_bias_norm:
            plain = [p for p in params if not _is_bias_or_norm(named.get(p, ""), p)]
            excl = [p for p in params if _is_bias_or_norm(named.get(p, ""), p)]
            final += [{**extra, "params": plain}, {**extra, "params": excl, "weight_decay": 0.0, "lars": False}]
        else:
            final.append({**extra, "params": params})
    final = [g for g in final if g["params"]]
    for g in final:
        g.setdefault("fixed_lr", False)
    optimizer = _make(final, cfg, lr)
    optimizer.register_step_pre_hook(scale_gradients)
    return optimizer


def _make(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    if cfg.name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.trust_coefficient,
            nesterov=cfg.nesterov,
        )
    if cfg.nesterov:
        raise ConfigError("optim.nesterov: Nesterov momentum needs optim.name sgd or lars, got adamw")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, steps_per_epoch: int, epochs: int, base_lr: float, cfg: OptimConfig) -> float:
    """Learning rate for a global step: linear warmup, then cosine / step / constant (to 0 for cosine)."""
    total = steps_per_epoch * epochs
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return base_lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)
    return base_lr


def check_lr_scale(key: str, value: float) -> None:
    """A parameter group's ``lr_scale`` comes from a recipe key: refuse 0, negatives and non-numbers."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key}: a learning-rate multiplier must be a finite number > 0, got {value!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """A group's optional ``lr_scale`` multiplies its lr (BraVe: predictor x10)."""
    for g in optimizer.param_groups:
        g["lr"] = (base_lr if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)


def named_params(module: nn.Module) -> dict[Tensor, str]:
    return {p: n for n, p in module.named_parameters()}
