"""Data-parallel evaluation helpers: shard a pass over a dataset by batches, gather the rows back in
dataset order, agree on a flag, key per-sample randomness, and a BatchNorm synchronised over gloo.

An evaluation run with ``data.dist = DistContext(rank, world)`` must give the one-process result
within float tolerance. Sharding whole batches (rank r runs batches r, r + world, ...) keeps every
forward pass the same as in one process, so frozen features are bit-identical on CPU; randomness
that must not depend on the world size is drawn from generators keyed by the sample's position in
the global stream (``keyed_generator``), not from a per-process global stream.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors when the world size is above one (its forward
raises ``ValueError`` unless the input is on CUDA / XPU / HPU; torch 2.14), so CPU (gloo) ranks use
``GlooSyncBatchNorm``: the statistics of the whole global batch (sum and count, then the centred
sum of squares: two all-reduces) and, in backward, the all-reduced sums of dy and dy·x̂ (the same
arithmetic as torch's ``SyncBatchNorm`` / apex, Ioffe & Szegedy 2015 Alg. 1 over the union batch).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cropbench.dist import DistContext


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches of a one-process pass over ``n`` items (the last may be shorter)."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def owns(batch: int, ctx: DistContext) -> bool:
    """Whether this rank handles batch number ``batch`` (batches are dealt round-robin)."""
    return batch % ctx.world_size == ctx.rank


def shard_batches(n: int, batch_size: int, ctx: DistContext) -> list[int]:
    """Indices of the dataset items this rank handles: whole batches ``rank, rank + world, ...`` of
    the one-process pass (batches of ``batch_size`` in dataset order; the last may be shorter)."""
    batches = range(ctx.rank, math.ceil(n / batch_size), ctx.world_size)
    return [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def _collective_device(device: torch.device) -> torch.device:
    """gloo reduces CPU tensors, NCCL CUDA tensors."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_batches(local: Tensor, sizes: list[int], ctx: DistContext, device: torch.device) -> Tensor:
    """All rows of a pass made of batches of ``sizes`` rows, in pass order, on every rank, from
    each rank's rows of the batches it ``owns`` (``local``: those rows, concatenated). Shards of
    unequal length are padded to the longest for ``all_gather``, then trimmed. A CPU tensor."""
    if not ctx.enabled:
        return local.cpu()
    meta: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(meta, (tuple(local.shape), str(local.dtype).removeprefix("torch.")))
    shape, dtype = max(meta, key=lambda m: m[0][0])  # the longest shard names the row shape and dtype
    dev = _collective_device(device)
    padded = torch.zeros(shape, dtype=getattr(torch, dtype), device=dev)
    if local.shape[0]:
        padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    out, taken = [], [0] * ctx.world_size
    for b, size in enumerate(sizes):
        r = b % ctx.world_size
        out.append(parts[r][taken[r] : taken[r] + size].cpu())
        taken[r] += size
    return torch.cat(out) if out else local.cpu()


def all_agree(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True only when ``flag`` is true on every rank (e.g. "my cache file is readable"): ranks that
    would otherwise take different branches around a collective agree first."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def keyed_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded by (seed, key...), e.g. (seed, stream position): the same draws for a
    sample whichever rank, batch or world size it lands in."""
    digest = hashlib.sha256(":".join(str(int(k)) for k in (seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------- BatchNorm over gloo


@torch.no_grad()
def _global_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (mean, biased variance, count) of the union of every rank's N×C×... batch:
    Σx and N in one all-reduce, then the centred Σ(x − μ)² (no E[x²] − E[x]² cancellation)."""
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    total = torch.cat([x.sum(dims), count])
    dist.all_reduce(total)
    n = total[-1]
    mean = total[:-1] / n
    sq = (x - _per_channel(mean, x)).square().sum(dims)
    dist.all_reduce(sq)
    return mean, sq / n, n


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


class _SyncBNFunction(torch.autograd.Function):
    """y = (x − μ)·invstd·w + b with the global μ, invstd; backward all-reduces Σdy and Σdy·x̂."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, n: Tensor) -> Tensor:  # type: ignore[override]
        xhat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        ctx.save_for_backward(xhat, weight, invstd, n)
        return xhat * _per_channel(weight, x) + _per_channel(bias, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xhat, weight, invstd, n = ctx.saved_tensors
        dims = [d for d in range(grad.dim()) if d != 1]
        local = torch.cat([grad.sum(dims), (grad * xhat).sum(dims)])  # Σdy, Σdy·x̂ of this rank
        total = local.clone()
        dist.all_reduce(total)
        c = weight.shape[0]
        mean_dy, mean_dy_xhat = _per_channel(total[:c] / n, grad), _per_channel(total[c:] / n, grad)
        dx = (grad - mean_dy - xhat * mean_dy_xhat) * _per_channel(weight * invstd, grad)
        # weight / bias: this rank's sums; the data-parallel gradient average does the rest
        return dx, local[c:], local[:c], None, None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics span every rank's batch, for CPU (gloo) ranks.

    Affine, with running statistics (updated with the unbiased variance of the global batch, as
    torch does); eval mode and a world of one behave exactly as ``nn.BatchNorm*d``."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlooSyncBatchNorm: expected at least 2-D input (N×C×...), got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if not self.training or world == 1 or not self.affine or not self.track_running_stats:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var, n = _global_stats(x)
        out = _SyncBNFunction.apply(x, self.weight, self.bias, mean, (var + self.eps).rsqrt(), n)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).to(self.running_var.dtype), momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over the process group: torch's ``SyncBatchNorm``
    on accelerators, ``GlooSyncBatchNorm`` on CPU. Parameters and buffers are kept (shared)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


def _shard_dropout(x: Tensor, p: float, shard: tuple[int, int], batch_size: int | None, feature: bool) -> Tensor:
    """torch's CPU dropout arithmetic (keep-coins from the global generator, scaled by 1/(1 − p);
    one coin per sample and channel for feature dropout) drawn for the whole global batch of
    ``batch_size`` rows (default ``len(x) × world``), of which this rank's rows are ``rank::world``."""
    rank, world = shard
    n = x.shape[0] * world if batch_size is None else batch_size
    if len(range(rank, n, world)) != x.shape[0]:
        raise ValueError(f"ShardDropout: {x.shape[0]} local rows are not rows {rank}::{world} of a batch of {n}")
    shape = (n, x.shape[1], *((1,) * (x.dim() - 2))) if feature else (n, *x.shape[1:])
    noise = x.new_empty(shape)
    noise.bernoulli_(1 - p).div_(1 - p)
    return x * noise[rank::world]


class ShardDropout(nn.Dropout):
    """``nn.Dropout`` that, with ``shard = (rank, world)``, draws the masks of the whole
    data-parallel batch (``batch_size`` rows; None: local rows × world) from the global generator
    (the same on every rank) and keeps this rank's rows ``rank::world``: the one-process masks.
    World 1: exactly ``nn.Dropout``."""

    shard: tuple[int, int] = (0, 1)
    batch_size: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.shard[1] == 1:
            return super().forward(x)
        return _shard_dropout(x, self.p, self.shard, self.batch_size, feature=False)


class ShardDropout2d(nn.Dropout2d):
    """``nn.Dropout2d`` (one keep-coin per sample and channel) with ``ShardDropout``'s sharding."""

    shard: tuple[int, int] = (0, 1)
    batch_size: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.shard[1] == 1:
            return super().forward(x)
        return _shard_dropout(x, self.p, self.shard, self.batch_size, feature=True)


__all__ = [
    "GlooSyncBatchNorm",
    "all_agree",
    "batch_sizes",
    "owns",
    "convert_sync_batchnorm",
    "gather_batches",
    "keyed_generator",
    "shard_batches",
    "ShardDropout",
    "ShardDropout2d",
]
