"""MoCo v2 (Chen, Fan, Girshick, He 2020, arXiv 2003.04297): momentum key encoder, a queue of
negative keys, InfoNCE at τ = 0.2, MLP head and blur augmentation.

Shuffle-BN (MoCo §3.3): the key batch is shuffled before the key encoder and un-shuffled after,
with BatchNorm statistics per group of global batch / ``shuffle_bn_splits`` samples, as MoCo's 8
GPUs. Across processes the shuffle is MoCo's ``_batch_shuffle_ddp`` (``momentum.batch_shuffle``);
on one process the groups are emulated by running the key encoder on each group of a randomly
permuted batch (``momentum.shuffle_bn_forward``), as the official single-GPU demo does with
SplitBatchNorm; that demo reports about 4 points lost without shuffle-BN. The query encoder's
BatchNorm stays per process (official: per GPU). ``batchnorm = "shuffle"``: the trainer never
converts these methods to SyncBN (the official code has none).

The parts are separate so DenseCL / RegionCL / HoughCL / video subclasses reuse them:
``encode_query`` / ``encode_key`` (``key_forward`` runs any key-encoder function under
shuffle-BN), ``instance_loss`` against the queue, ``enqueue``, and ``momentum_pairs`` (extend it
to momentum-update extra heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod, StepOutput
from cropbench.methods.heads import mocov2_projector, simclr_projector
from cropbench.methods.losses import info_nce
from cropbench.methods.momentum import (
    KeyOut,
    Queue,
    bn_groups_per_process,
    ema_update,
    momentum_copy,
    shuffle_bn_forward,
)
from cropbench.registry import METHODS
from cropbench.types import ImageBatch
from cropbench.views.generators import ViewGenerator


@METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    # shuffle-BN, no SyncBN [facebookresearch/moco@3631be0 moco/builder.py _batch_shuffle_ddp]
    batchnorm: ClassVar[str] = "shuffle"

    @dataclass(frozen=True)
    class Config:
        hidden_dim: int = 2048  # MLP 2048-2048-128 (MoCo v2)
        out_dim: int = 128  # moco --moco-dim default
        temperature: float = 0.2  # --moco-t 0.2 for MoCo v2 (v1 default 0.07)
        queue_size: int = 65536  # --moco-k default
        momentum: float = 0.999  # --moco-m default
        shuffle_bn: bool = True  # MoCo's shuffle-BN for the key encoder (False: plain BN)
        # BatchNorm groups of the global key batch: MoCo trains on 8 GPUs (BN over 32 of 256
        # images each); the official 1-GPU demo emulates them with --bn-splits 8
        # [facebookresearch/moco@f736491 colab/moco_cifar10_demo.ipynb]. 1 = BN over the batch.
        shuffle_bn_splits: int = 8
        # BatchNorm in the projector (Linear-BN-ReLU-Linear-BN, as SimCLR / MoCo v3), not MoCo v2's
        # plain MLP: off at paper scale; micro turns it on (see the mocov2 entry's deviations)
        projector_bn: bool = False
        # Symmetric loss (the official CIFAR demo's --symmetric, off by default there and in MoCo v2):
        # each view is both query and key, loss = L(q1, k2) + L(q2, k1), and both key batches
        # are enqueued [facebookresearch/moco@f736491 colab/moco_cifar10_demo.ipynb]
        symmetric: bool = False

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx)
        if cfg.symmetric and type(self).training_step is not MoCoV2.training_step:
            raise ConfigError(f"params.symmetric: {type(self).__name__} has its own training step; only mocov2 has it")
        if cfg.shuffle_bn:
            bn_groups_per_process(cfg.shuffle_bn_splits, ctx.dist.world_size)  # fail early
        head = simclr_projector if cfg.projector_bn else mocov2_projector
        self.projector = head(backbone.feat_dim, cfg.hidden_dim, cfg.out_dim)
        self.key_backbone = momentum_copy(backbone)
        self.key_projector = momentum_copy(self.projector)
        self.queue = Queue(cfg.queue_size, cfg.out_dim)
        self.views = views

    def encode_query(self, x: Tensor) -> Tensor:
        """B×3×h×w -> B×out_dim unit query embeddings (with gradient)."""
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def key_forward(self, fn: Callable[[Tensor], KeyOut], x: Tensor, generator: torch.Generator) -> KeyOut:
        """A key-encoder function (N×… -> per-sample outputs) under shuffle-BN when enabled."""
        if not self.cfg.shuffle_bn:
            return fn(x)
        return shuffle_bn_forward(fn, x, self.ctx.dist, generator, self.cfg.shuffle_bn_splits)

    @torch.no_grad()
    def encode_key(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """B×3×h×w -> B×out_dim unit keys of the momentum encoder, under shuffle-BN."""
        net = lambda t: F.normalize(self.key_projector(self.key_backbone(t)), dim=1)  # noqa: E731
        return self.key_forward(net, x, generator)

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
        if self.cfg.symmetric:
            q1, q2 = self.encode_query(v_q.tensor), self.encode_query(v_k.tensor)
            k1, k2 = self.encode_key(v_q.tensor, generator), self.encode_key(v_k.tensor, generator)
            loss = self.instance_loss(q1, k2) + self.instance_loss(q2, k1)  # both against the same queue
            self.enqueue(torch.cat([k1, k2]))
            return StepOutput(loss)
        q = self.encode_query(v_q.tensor)  # N×D
        k = self.encode_key(v_k.tensor, generator)  # N×D, no gradient
        loss = self.instance_loss(q, k)
        self.enqueue(k)
        return StepOutput(loss)

    def after_step(self, step: int) -> None:
        for online, target in self.momentum_pairs():
            ema_update(target, online, self.cfg.momentum)
