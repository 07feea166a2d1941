"""Momentum (EMA) encoders, the MoCo key queue and MoCo's shuffle-BN across processes."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.dist import DistContext, gather_no_grad


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
        raise ValueError(
            f"ema_update: target has {len(t_params)} parameters, online has {len(o_params)}"
        )
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
def batch_shuffle(
    x: Tensor, dist: DistContext, generator: torch.Generator
) -> tuple[Tensor, Tensor | None]:
    """MoCo's shuffle-BN, step 1: give this process a random shard of the *global* key batch.

    The permutation is drawn on rank 0 and broadcast. Returns (local shuffled shard, inverse
    permutation). On one process it is the identity (BN statistics do not depend on batch order).
    """
    if not dist.enabled:
        return x, None
    everything = gather_no_grad(x, dist)
    perm = torch.randperm(everything.shape[0], generator=generator, device=generator.device).to(
        x.device
    )
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
