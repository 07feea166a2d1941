"""BYOL (Grill et al. 2020, arXiv 2006.07733): online network + predictor regresses an EMA target
network's projection of the other view; asymmetric views; τ from 0.996 to 1 on a cosine schedule.

Reusable parts (CYBORGS builds on them): ``online`` / ``target`` forward the two branches,
``regression_loss`` is the symmetrised normalised MSE, ``momentum_pairs`` lists what the EMA moves.

``params.predictor: directpred`` swaps BYOL's trained MLP predictor for DirectPred's (Tian et al. 2021,
arXiv 2102.06810 §5): a linear predictor set every ``dp_freq`` steps from the eigendecomposition of an
EMA of the online projections' correlation, never trained (a variant, not the paper's BYOL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cropbench.dist import all_reduce_mean
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import byol_mlp
from cropbench.methods.losses import normalized_mse, symmetric
from cropbench.methods.momentum import cosine_momentum, ema_update, momentum_copy
from cropbench.optim import check_lr_scale
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import ViewGenerator


@METHODS.register("byol")
class BYOL(SSLMethod):
    # global BN: hk.BatchNorm(cross_replica_axis="i") [deepmind-research@3d8692e byol/configs/byol.py]
    batchnorm = "sync"
    default_views = "asymmetric_pair"  # BYOL Table 6: per-view blur / solarize

    @dataclass(frozen=True)
    class Config:
        hidden_dim: int = 4096  # projector and predictor width (BYOL §3.3)
        out_dim: int = 256  # projection size (BYOL §3.3)
        base_momentum: float = 0.996  # τ_base (BYOL §3.3)
        final_momentum: float = 1.0  # τ at the last step (BYOL: 1)
        pred_lr_scale: float = 1.0  # predictor lr multiplier (BYOL: 1; a micro deviation when not 1)
        fix_pred_lr: bool = False  # predictor lr not scheduled, as simsiam --fix-pred-lr (BYOL: False)
        # "mlp": BYOL's trained predictor. "directpred": a linear predictor set, not trained, from the
        # eigendecomposition of the online projections' correlation (Tian et al. 2021, arXiv 2102.06810 §5)
        predictor: Literal["mlp", "directpred"] = "mlp"
        dp_rho: float = 0.3  # DirectPred: F <- rho F + (1 - rho) E[f f^T]
        dp_eps: float = 0.1  # DirectPred: p_j = sqrt(s_j) / max_k sqrt(s_k) + eps
        dp_freq: int = 1  # DirectPred: recompute W_p every dp_freq steps

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        check_lr_scale("params.pred_lr_scale", cfg.pred_lr_scale)
        self.projector = byol_mlp(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        if cfg.predictor == "directpred":
            check_directpred(cfg)
            self.predictor = nn.Linear(cfg.out_dim, cfg.out_dim, bias=False)
            self.predictor.weight.requires_grad_(False)
            with torch.no_grad():
                self.predictor.weight.copy_(torch.eye(cfg.out_dim))
            self.register_buffer("dp_corr", torch.zeros(cfg.out_dim, cfg.out_dim))
        else:
            self.predictor = byol_mlp(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)
        self.views = views

    def online(self, x: Tensor) -> Tensor:
        """B×3×h×w -> B×out_dim predictions q(g(f(x)))."""
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def directpred_update(self, f: Tensor, step: int) -> None:
        """DirectPred (Tian et al. 2021 §5): F <- rho F + (1 - rho) mean_i f_i f_i^T over the online
        projections f (N×d, both views, averaged over processes); every ``dp_freq`` steps
        W_p = U diag(p) U^T with F = U diag(s) U^T and p_j = sqrt(s_j) / max_k sqrt(s_k) + eps."""
        cfg = self.cfg
        f = f.detach().float()
        with torch.autocast(f.device.type, enabled=False):  # the correlation in float32 under bf16 training
            corr = all_reduce_mean(f.T @ f / f.shape[0], self.ctx.dist)
        self.dp_corr.mul_(cfg.dp_rho).add_(corr, alpha=1.0 - cfg.dp_rho)
        if step % cfg.dp_freq:
            return
        s, u = torch.linalg.eigh(self.dp_corr.double())
        root = s.clamp(min=0).sqrt()
        p = root / root.max().clamp(min=1e-12) + cfg.dp_eps
        self.predictor.weight.copy_((u * p) @ u.T)

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        """B×3×h×w -> B×out_dim target projections (no gradient)."""
        return self.target_projector(self.target_backbone(x))

    def regression_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        """BYOL's L + L̃: each prediction regresses the target projection of the *other* view."""
        return symmetric(normalized_mse, p1, p2, z1, z2, weight=1.0)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2 = self.make_views(batch, generator)
        f1, f2 = self.projector(self.backbone(v1.tensor)), self.projector(self.backbone(v2.tensor))
        if self.cfg.predictor == "directpred":
            self.directpred_update(torch.cat([f1, f2]), step)
        p1, p2 = self.predictor(f1), self.predictor(f2)
        z1, z2 = self.target(v1.tensor), self.target(v2.tensor)
        loss = self.regression_loss(p1, p2, z1, z2)
        return StepOutput(loss, {"momentum": self.momentum_at(step)})

    def param_groups(self) -> list[dict[str, Any]]:
        """Everything trainable follows the schedule; the predictor's lr is ``pred_lr_scale`` times it,
        or times the base lr with ``fix_pred_lr`` (one group, as before the options existed, when
        neither is set)."""
        cfg = self.cfg
        if cfg.pred_lr_scale == 1.0 and not cfg.fix_pred_lr:
            return super().param_groups()
        return self.groups_apart(self.predictor, fixed_lr=cfg.fix_pred_lr, lr_scale=cfg.pred_lr_scale)

    def momentum_at(self, step: int) -> float:
        """τ_k of BYOL's cosine schedule over ``ctx.total_steps`` (BYOL §3.3)."""
        cfg = self.cfg
        return cosine_momentum(step, self.ctx.total_steps, cfg.base_momentum, cfg.final_momentum)

    def after_step(self, step: int) -> None:
        """EMA update of the target branch with τ of this step."""
        tau = self.momentum_at(step)
        for online, target in self.momentum_pairs():
            ema_update(target, online, tau)


def check_directpred(cfg: BYOL.Config) -> None:
    """DirectPred's predictor is set, not trained: its lr options would silently do nothing."""
    if not (0.0 <= cfg.dp_rho < 1.0 and cfg.dp_eps >= 0 and cfg.dp_freq >= 1):  # NaN fails too
        raise ConfigError(
            "params.dp_rho must be in [0, 1), params.dp_eps >= 0 and params.dp_freq >= 1, got "
            f"dp_rho={cfg.dp_rho}, dp_eps={cfg.dp_eps}, dp_freq={cfg.dp_freq}"
        )
    if cfg.pred_lr_scale != 1.0 or cfg.fix_pred_lr:
        raise ConfigError(
            "params.pred_lr_scale / params.fix_pred_lr set the lr of a trained predictor; "
            "params.predictor 'directpred' is not trained: leave them at 1.0 / false"
        )
