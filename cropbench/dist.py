"""Explicit distributed context: rank and world size are passed around, never read from globals."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def gather_with_grad(x: Tensor, ctx: DistContext) -> Tensor:
    """All-gather along dim 0 keeping the gradient path to the local shard (SimCLR/CLIP style)."""
    if not ctx.enabled:
        return x
    import torch.distributed.nn.functional as dnn

    return torch.cat(dnn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor, ctx: DistContext) -> Tensor:
    """All-gather along dim 0 without gradient (MoCo keys, kNN banks). Equal shard sizes required."""
    if not ctx.enabled:
        return x
    out = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: Tensor, ctx: DistContext) -> Tensor:
    if not ctx.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / ctx.world_size


def all_reduce_grads(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Average gradients over processes in one flat all-reduce (what DDP does, minus bucketing)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not ctx.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def init_process_group(backend: str, rank: int, world_size: int, store_file: str) -> DistContext:
    """Join a process group rendezvousing through a file, not a TCP port.

    A ``file://`` store has no server: with the default TCP store rank 0 hosts the store in a
    background thread, so rank 0 exiting while a peer still talks to it (or a port taken by
    another job between choosing and binding it) kills the peer from a C++ thread.
    """
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    return DistContext(rank, world_size)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Without the barrier a fast rank tears down its gloo connections (and exits) while a slow rank
    is still in its last collective or in its own teardown; gloo's background threads then see the
    peer vanish and abort the process ("terminate called without an active exception").
    """
    if not dist.is_initialized():
        return
    if ctx.enabled:
        dist.barrier()
    dist.destroy_process_group()


def params_checksum(module: nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank when data-parallel training is in sync."""
    return float(sum(p.detach().double().sum() for p in module.parameters()))


# ---------------------------------------------------------------- joining a launch (torchrun, srun, --nproc)
def join_process_group(
    rank: int, world_size: int, local_rank: int, device: torch.device
) -> tuple[DistContext, torch.device]:
    """Join the process group the launcher describes in the environment (``env://``: MASTER_ADDR,
    MASTER_PORT; under torchrun its agent's store). NCCL on CUDA with LOCAL_RANK's device, gloo on CPU.
    Returns the context and this process's device."""
    if device.type == "cuda":  # one visible GPU per process (a site's GPU binding): it is device 0
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **extra)
    return DistContext(rank, world_size), device


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op in one process)."""
    if ctx.enabled:
        dist.barrier()


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on at least one (one all-reduce of a max)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s values, in place."""
    if not ctx.enabled:
        return
    for t in module.state_dict().values():
        buf = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)


def gather_floats(x: float, ctx: DistContext, device: torch.device) -> list[float]:
    """``x`` from every process, by rank (float64)."""
    t = torch.tensor([x], dtype=torch.float64, device=device)
    return [float(v) for v in gather_no_grad(t, ctx).tolist()]
