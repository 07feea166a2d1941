"""DenseCL [Wang, Zhang, Shen, Kong, Li; CVPR 2021, arXiv 2011.09157]: MoCo v2 + a dense head.

Per step (REPO WXinlong/DenseCL ``openselfsup/models/densecl.py``):

    q, q_grid, C5_q = query encoder(view 1)          # B×D, B×D×S², B×C×S×S
    k, k_grid, k_pool, C5_k = key encoder(view 2)    # no gradient
    match = argmax_j cos(C5_q[i], C5_k[j])           # winner-takes-all on *backbone* cells
    loss = (1 - λ)·InfoNCE(q, k, queue) + λ·InfoNCE(q_grid[i], k_grid[match(i)], dense queue)
    enqueue k; enqueue normalise(k_pool) in the dense queue

HoughCL (``methods.houghcl``) and RegionCL-D (``methods.regioncl``) subclass this class; HoughCL
only replaces ``match``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.methods.base import ImageBatch, MethodContext, StepOutput, View
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


@dataclass(frozen=True)
class DenseOutput:
    """One encoder pass: global embedding, dense grid, pooled dense vector and backbone C5."""

    emb: Tensor  # B×D unit global embedding
    grid: Tensor  # B×D×S² unit dense projections
    pooled: Tensor  # B×D unit mean of the dense projections (what the dense queue stores)
    c5: Tensor  # B×C×S×S backbone features (what the correspondence is computed on)


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

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self.dense_head = DenseHead(backbone.feat_dim, cfg.dense_hidden_dim, cfg.out_dim, bn=cfg.dense_bn)
        self.key_dense_head = momentum_copy(self.dense_head)
        self.dense_queue = Queue(cfg.queue_size, cfg.out_dim)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.dense_head, self.key_dense_head)]

    def _heads(self, c5: Tensor, projector: nn.Module, dense_head: nn.Module) -> DenseOutput:
        emb = F.normalize(projector(c5.mean(dim=(2, 3))), dim=1)
        grid, pooled = dense_head(c5)
        return DenseOutput(emb, F.normalize(grid.flatten(2), dim=1), F.normalize(pooled, dim=1), c5)

    def encode_query_dense(self, x: Tensor) -> DenseOutput:
        """B×3×h×w -> query outputs with gradient."""
        return self._heads(self.backbone.forward_stages(x)[-1], self.projector, self.dense_head)

    @torch.no_grad()
    def encode_key_dense(self, x: Tensor, generator: torch.Generator) -> DenseOutput:
        """B×3×h×w -> momentum-encoder outputs, all four from one key forward under shuffle-BN
        (official: backbone + neck on the shuffled batch, ``_batch_shuffle_ddp``)."""

        def net(t: Tensor) -> tuple[Tensor, ...]:
            c5 = self.key_backbone.forward_stages(t)[-1]
            out = self._heads(c5, self.key_projector, self.key_dense_head)
            return out.emb, out.grid, out.pooled, out.c5

        return DenseOutput(*self.key_forward(net, x, generator))

    def match(self, c5_q: Tensor, c5_k: Tensor) -> Tensor:
        """Positive key cell of every query cell (DenseCL: winner-takes-all). -> B×S² long."""
        return wta_match(c5_q, c5_k)

    def dense_loss(self, q: DenseOutput, k: DenseOutput, index: Tensor) -> Tensor:
        queue = self.dense_queue.keys.clone()
        return dense_infonce(q.grid, k.grid, index, queue, self.cfg.temperature)

    def enqueue_dense(self, k: DenseOutput) -> None:
        self.enqueue(k.emb)
        self.dense_queue.enqueue(k.pooled, self.ctx.dist)

    def dense_step(self, v_q: View, v_k: View, generator: torch.Generator) -> tuple[Tensor, dict, DenseOutput]:
        """DenseCL's two terms on a view pair -> (weighted loss, logs, key outputs)."""
        q = self.encode_query_dense(v_q.tensor)
        k = self.encode_key_dense(v_k.tensor, generator)
        index = self.match(q.c5, k.c5)
        lam = self.cfg.dense_weight
        loss_g, loss_d = self.instance_loss(q.emb, k.emb), self.dense_loss(q, k, index)
        truth = geometric_truth(v_q.prov, v_k.prov, tuple(q.c5.shape[2:]))
        logs = {
            "loss_global": loss_g.detach(),
            "loss_dense": loss_d.detach(),
            "match_acc": match_accuracy(index, truth),
            "match_same": same_cell_rate(index),  # share matched to the same grid cell
        }  # tensors: no host sync in the step
        return (1 - lam) * loss_g + lam * loss_d, logs, k

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        loss, logs, k = self.dense_step(v_q, v_k, generator)
        self.enqueue_dense(k)
        return StepOutput(loss, logs)
