"""Momentum (EMA) encoders, the MoCo key queue and MoCo's shuffle-BN (across processes, and
emulated by split BatchNorm on one process)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.dist import DistContext, gather_no_grad
from cropbench.errors import ConfigError

KeyOut = TypeVar("KeyOut", Tensor, tuple[Tensor, ...])


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module``: the MoCo key encoder / BYOL target starts equal to it."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online for every parameter (MoCo eq. 2; BYOL eq. 1).

    Buffers (BatchNorm running statistics) are left alone: each network keeps its own.
    """
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, online has {len(o_params)}")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's schedule τ_k = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2, generalised to end at ``final``."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class Queue(nn.Module):
    """A FIFO of K keys (MoCo's dictionary) in registered buffers, so it is checkpointed.

    ``keys``: K×D, initialised to random unit vectors (as MoCo); ``ptr``: the next slot to write.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"Queue: size and dim must be positive, got size={size}, dim={dim}")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, dist: DistContext) -> None:
        """Write this step's keys of *all* processes (gathered here) over the oldest slots.

        Wraps around the end; if more than K keys arrive at once, only the last K are kept.
        Runs on the device without a host sync (the pointer is a tensor).
        """
        keys = gather_no_grad(keys.detach(), dist).to(self.keys.dtype)
        n = keys.shape[0]
        start = self.ptr
        if n > self.size:
            keys, start, n = keys[n - self.size :], self.ptr + (n - self.size), self.size
        idx = (start + torch.arange(n, device=keys.device)) % self.size
        self.keys.index_copy_(0, idx, keys)
        self.ptr.copy_((start + n) % self.size)

    def age(self) -> Tensor:
        """K long: how many keys were written after each slot (0 = newest), for temporal decay."""
        slots = torch.arange(self.size, device=self.keys.device)
        return (self.ptr - 1 - slots) % self.size


@torch.no_grad()
def batch_shuffle(x: Tensor, dist: DistContext, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """MoCo's shuffle-BN, step 1: give this process a random shard of the *global* key batch.

    The permutation is drawn on rank 0 and broadcast. Returns (local shuffled shard, inverse
    permutation). On one process it is the identity; ``shuffle_bn_forward`` shuffles there itself.
    """
    if not dist.enabled:
        return x, None
    everything = gather_no_grad(x, dist)
    perm = torch.randperm(everything.shape[0], generator=generator, device=generator.device).to(x.device)
    torch_dist.broadcast(perm, src=0)
    mine = perm.view(dist.world_size, -1)[dist.rank]
    return everything[mine], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: Tensor, unshuffle: Tensor | None, dist: DistContext) -> Tensor:
    """Step 2: gather the key encoder's outputs, take back this process's own samples in order."""
    if unshuffle is None:
        return y
    everything = gather_no_grad(y, dist)
    return everything[unshuffle.view(dist.world_size, -1)[dist.rank]]


def bn_groups_per_process(splits: int, world_size: int) -> int:
    """How many BatchNorm groups this process's key batch is split into: the global key batch
    forms ``splits`` groups (MoCo: one per GPU), spread evenly over the processes."""
    if splits < 1 or splits % world_size:
        raise ConfigError(
            f"params.shuffle_bn_splits: expected a positive multiple of --nproc {world_size} "
            f"(the key batch's BatchNorm groups are spread evenly over the processes), got {splits}"
        )
    return splits // world_size


def _map(out: KeyOut, fn: Callable[[Tensor], Tensor]) -> KeyOut:
    return fn(out) if isinstance(out, Tensor) else tuple(fn(t) for t in out)


@torch.no_grad()
def split_bn_forward(fn: Callable[[Tensor], KeyOut], x: Tensor, groups: int) -> KeyOut:
    """``fn`` run on ``groups`` consecutive slices of ``x``, outputs concatenated on dim 0.

    In training mode every BatchNorm inside ``fn`` then normalises with the statistics of its own
    slice, as on ``groups`` GPUs (the MoCo demo's SplitBatchNorm [facebookresearch/moco@f736491
    colab/moco_cifar10_demo.ipynb], here for every BN of the key encoder and its heads). Slice
    sizes differ by at most one when ``groups`` does not divide N (``torch.tensor_split``).
    ``fn``: N×… -> N×… tensor or tuple of tensors (one row per sample).
    """
    if groups == 1:
        return fn(x)
    n = x.shape[0]
    if n < 2 * groups:
        raise ConfigError(
            f"params.shuffle_bn_splits: a key batch of {n} per process cannot be split into "
            f"{groups} BatchNorm groups of at least 2 samples; lower it to at most {max(1, n // 2)} "
            "per process (1 = BatchNorm over the whole key batch)"
        )
    outs = [fn(chunk) for chunk in x.tensor_split(groups)]
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


@torch.no_grad()
def shuffle_bn_forward(
    fn: Callable[[Tensor], KeyOut],
    x: Tensor,
    dist: DistContext,
    generator: torch.Generator,
    splits: int,
) -> KeyOut:
    """MoCo's shuffle-BN around the key encoder ``fn`` (He et al. 2020, §3.3).

    The key batch is permuted at random, its BatchNorm statistics are computed per group of
    (global batch / ``splits``) samples, and the outputs are returned in the original order, so a
    key never shares BN statistics with exactly the samples its query was normalised with.
    Several processes: ``batch_shuffle`` / ``batch_unshuffle`` (official ``_batch_shuffle_ddp``),
    ``splits / world_size`` groups per process. One process: a local permutation drawn from
    ``generator`` and ``split_bn_forward`` (the official single-GPU demo's emulation).
    ``splits == 1`` on one process is plain BN over the whole batch (no permutation drawn).
    """
    groups = bn_groups_per_process(splits, dist.world_size)
    if dist.enabled:
        shard, unshuffle = batch_shuffle(x, dist, generator)
        out = split_bn_forward(fn, shard, groups)
        return _map(out, lambda t: batch_unshuffle(t, unshuffle, dist))
    if groups == 1:
        return fn(x)
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    inverse = torch.argsort(perm)
    return _map(split_bn_forward(fn, x[perm], groups), lambda t: t[inverse])
