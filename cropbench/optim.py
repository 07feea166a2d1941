"""Optimizers (SGD, LARS, AdamW) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cropbench.recipe import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) around SGD with momentum, as BYOL/SimCLR/CYBORGS use it.

    Per parameter: ``local_lr = trust * ||w|| / (||g|| + wd * ||w||)``; groups with ``lars=False``
    (biases and norm parameters when ``exclude_bias_norm``) skip both adaptation and weight decay.
    """

    def __init__(
        self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001
    ):
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars=True),
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - closure unused, as in SGD without it
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


def _is_bias_or_norm(name: str, p: Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(
    groups: list[dict[str, Any]], named: dict[Tensor, str], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Build the optimizer over the method's parameter groups (each may carry ``fixed_lr``).

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
    if cfg.name == "sgd":
        return torch.optim.SGD(final, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(
            final, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coefficient=cfg.trust_coefficient
        )
    return torch.optim.AdamW(final, lr=lr, weight_decay=cfg.weight_decay)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """A group's optional ``lr_scale`` multiplies its lr (BraVe: predictor x10)."""
    for g in optimizer.param_groups:
        g["lr"] = (base_lr if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)


def named_params(module: nn.Module) -> dict[Tensor, str]:
    return {p: n for n, p in module.named_parameters()}
