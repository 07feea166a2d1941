"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv 2003.04297): momentum key encoder, a queue of
negative keys, InfoNCE at τ = 0.2, MLP head and blur augmentation.

Shuffle-BN: on several processes the key batch is shuffled across processes before the key
encoder and un-shuffled after (``momentum.batch_shuffle``), as MoCo does; this matters where BN is
per process (the trainer's CPU/gloo runs). On one process it is a no-op, as in MoCo single-GPU
training (BN statistics do not depend on the order within a batch). Under the trainer's SyncBN
(CUDA, several processes) BN statistics are global and the shuffle only costs one all-gather.

The parts are separate so DenseCL / RegionCL / HoughCL subclasses reuse them:
``encode_query`` / ``encode_key`` (shuffle-BN across processes), ``instance_loss`` against the
queue, ``enqueue``, and ``momentum_pairs`` (extend it to momentum-update extra heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.methods.base import ImageBatch, MethodContext, SSLMethod, StepOutput, View
from cropbench.methods.heads import mocov2_projector, simclr_projector
from cropbench.methods.losses import info_nce
from cropbench.methods.momentum import (
    Queue,
    batch_shuffle,
    batch_unshuffle,
    ema_update,
    momentum_copy,
)
from cropbench.methods.views import ViewConfig, make_view
from cropbench.registry import METHODS


@METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    @dataclass(frozen=True)
    class Config:
        views: ViewConfig = field(
            default_factory=ViewConfig
        )  # MoCo v2 aug_plus = ViewConfig defaults
        hidden_dim: int = 2048  # MLP 2048-2048-128 (MoCo v2)
        out_dim: int = 128  # moco --moco-dim default
        temperature: float = 0.2  # --moco-t 0.2 for MoCo v2 (v1 default 0.07)
        queue_size: int = 65536  # --moco-k default
        momentum: float = 0.999  # --moco-m default
        shuffle_bn: bool = (
            True  # shuffle keys across processes before the key encoder (no-op on one)
        )
        # BatchNorm in the projector (Linear-BN-ReLU-Linear-BN, as SimCLR / MoCo v3), not MoCo v2's
        # plain MLP: off at paper scale; micro turns it on (see the mocov2 entry's deviations)
        projector_bn: bool = False

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        head = simclr_projector if cfg.projector_bn else mocov2_projector
        self.projector = head(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        self.queue = Queue(cfg.queue_size, cfg.out_dim)

    def make_views(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        return [make_view(batch.images, self.cfg.views, generator) for _ in range(2)]

    def encode_query(self, x: Tensor) -> Tensor:
        """B×3×h×w -> B×out_dim unit query embeddings (with gradient)."""
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def encode_key(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """B×3×h×w -> B×out_dim unit keys of the momentum encoder (shuffle-BN if multi-process)."""
        x, unshuffle = (
            batch_shuffle(x, self.ctx.dist, generator) if self.cfg.shuffle_bn else (x, None)
        )
        k = F.normalize(self.key_projector(self.key_backbone(x)), dim=1)
        return batch_unshuffle(k, unshuffle, self.ctx.dist)

    def instance_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE of q against its key and the queue (a snapshot, so enqueueing after is safe)."""
        return info_nce(q, k, self.queue.keys.clone(), self.cfg.temperature)

    def enqueue(self, k: Tensor) -> None:
        self.queue.enqueue(k, self.ctx.dist)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs updated in ``after_step``; subclasses append theirs."""
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        q = self.encode_query(v_q.tensor)  # N×D
        k = self.encode_key(v_k.tensor, generator)  # N×D, no gradient
        loss = self.instance_loss(q, k)
        self.enqueue(k)
        return StepOutput(loss)

    def after_step(self, step: int) -> None:
        for online, target in self.momentum_pairs():
            ema_update(target, online, self.cfg.momentum)
