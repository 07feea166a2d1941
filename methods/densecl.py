"""DenseCL [Wang, Zhang, Shen, Kong, Li; CVPR 2021, arXiv 2011.09157]: MoCo v2 + a dense head.

Per step (REPO WXinlong/DenseCL ``openselfsup/models/densecl.py``):

    q, q_grid, C5_q = query encoder(view 1)          # B×D, B×D×S², B×C×S×S
    k, k_grid, k_pool, C5_k = key encoder(view 2)    # no gradient
    match = argmax_j cos(C5_q[i], C5_k[j])           # winner-takes-all on *backbone* cells
    loss = (1 - λ)·InfoNCE(q, k, queue) + λ·InfoNCE(q_grid[i], k_grid[match(i)], dense queue)
    enqueue k; enqueue normalise(k_pool) in the dense queue

The dense part is a module (``DenseBranch``) that DenseCL, HoughCL (``methods.houghcl``: only the
``match`` rule differs) and RegionCL-D (``methods.regioncl``) each compose into MoCo v2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.methods.base import MethodContext, StepOutput
from cropbench.methods.dense import (
    DenseHead,
    dense_infonce,
    geometric_truth,
    match_accuracy,
    same_cell_rate,
    wta_match,
)
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.momentum import Queue, momentum_copy
from cropbench.registry import METHODS
from cropbench.types import ImageBatch, View
from cropbench.views.generators import ViewGenerator


@dataclass(frozen=True)
class DenseOutput:
    """One encoder pass: global embedding, dense grid, pooled dense vector and backbone C5."""

    emb: Tensor  # B×D unit global embedding
    grid: Tensor  # B×D×S² unit dense projections
    pooled: Tensor  # B×D unit mean of the dense projections (what the dense queue stores)
    c5: Tensor  # B×C×S×S backbone features (what the correspondence is computed on)


Matcher = Callable[[Tensor, Tensor], Tensor]  # (C5 query, C5 key) -> B×S² positive key cell per query cell


class DenseBranch(nn.Module):
    """DenseCL's dense part of a MoCo v2 method: the dense head, its momentum copy, the dense
    queue and the rule that picks each query cell's positive key cell (``match``: DenseCL's
    winner-takes-all, HoughCL's Hough vote). A part, composed into DenseCL, HoughCL and RegionCL-D;
    the MoCo v2 method whose encoders it runs on is passed in explicitly (``m``)."""

    def __init__(self, cfg: DenseCL.Config, feat_dim: int, match: Matcher = wta_match):
        super().__init__()
        self.head = DenseHead(feat_dim, cfg.dense_hidden_dim, cfg.out_dim, bn=cfg.dense_bn)
        self.key_head = momentum_copy(self.head)
        self.queue = Queue(cfg.queue_size, cfg.out_dim)
        self.match, self.weight, self.temperature = match, cfg.dense_weight, cfg.temperature

    @staticmethod
    def heads(c5: Tensor, projector: nn.Module, dense_head: nn.Module) -> DenseOutput:
        emb = F.normalize(projector(c5.mean(dim=(2, 3))), dim=1)
        grid, pooled = dense_head(c5)
        return DenseOutput(emb, F.normalize(grid.flatten(2), dim=1), F.normalize(pooled, dim=1), c5)

    def encode_query(self, m: MoCoV2, x: Tensor) -> DenseOutput:
        """B×3×h×w -> query outputs of ``m``'s online encoder, with gradient."""
        return self.heads(m.backbone.forward_stages(x)[-1], m.projector, self.head)

    @torch.no_grad()
    def encode_key(self, m: MoCoV2, x: Tensor, generator: torch.Generator) -> DenseOutput:
        """B×3×h×w -> momentum-encoder outputs, all four from one key forward under shuffle-BN
        (official: backbone + neck on the shuffled batch, ``_batch_shuffle_ddp``)."""

        def net(t: Tensor) -> tuple[Tensor, ...]:
            out = self.heads(m.key_backbone.forward_stages(t)[-1], m.key_projector, self.key_head)
            return out.emb, out.grid, out.pooled, out.c5

        return DenseOutput(*m.key_forward(net, x, generator))

    def loss(self, q: DenseOutput, k: DenseOutput, index: Tensor) -> Tensor:
        return dense_infonce(q.grid, k.grid, index, self.queue.keys.clone(), self.temperature)

    def enqueue(self, m: MoCoV2, k: DenseOutput) -> None:
        """The global keys into ``m``'s queue, the pooled dense keys into the dense queue."""
        m.enqueue(k.emb)
        self.queue.enqueue(k.pooled, m.ctx.dist)

    def step(self, m: MoCoV2, v_q: View, v_k: View, generator: torch.Generator) -> tuple[Tensor, dict, DenseOutput]:
        """DenseCL's two terms on a view pair -> ((1-λ)·global + λ·dense, logs, key outputs)."""
        q = self.encode_query(m, v_q.tensor)
        k = self.encode_key(m, v_k.tensor, generator)
        index = self.match(q.c5, k.c5)
        loss_g, loss_d = m.instance_loss(q.emb, k.emb), self.loss(q, k, index)
        truth = geometric_truth(v_q.prov, v_k.prov, tuple(q.c5.shape[2:]))
        logs = {
            "loss_global": loss_g.detach(),
            "loss_dense": loss_d.detach(),
            "match_acc": match_accuracy(index, truth),
            "match_same": same_cell_rate(index),  # share matched to the same grid cell
        }  # tensors: no host sync in the step
        return (1 - self.weight) * loss_g + self.weight * loss_d, logs, k


@METHODS.register("densecl")
class DenseCL(MoCoV2):
    @dataclass(frozen=True)
    class Config(MoCoV2.Config):
        dense_hidden_dim: int = 2048  # DenseCLNeck conv1x1 width (= C5 channels of R50)
        dense_weight: float = 0.5  # λ: loss = (1-λ)·global + λ·dense (DenseCL loss_lambda)
        # BatchNorm in the dense head (conv-BN-ReLU-conv-BN, as ``projector_bn`` for the global
        # head), not DenseCL's conv-ReLU-conv: off at paper scale; micro turns it on (see the
        # densecl entry's deviations)
        dense_bn: bool = False

    def __init__(
        self,
        cfg: Config,
        backbone: nn.Module,
        ctx: MethodContext,
        views: ViewGenerator,
        match: Matcher = wta_match,
    ):
        super().__init__(cfg, backbone, ctx, views)
        self.dense = DenseBranch(cfg, backbone.feat_dim, match)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.dense.head, self.dense.key_head)]

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        loss, logs, k = self.dense.step(self, v_q, v_k, generator)
        self.dense.enqueue(self, k)
        return StepOutput(loss, logs)
