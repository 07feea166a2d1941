"""Two gloo processes on CPU: the gathered NT-Xent / MoCo losses equal the 1-process loss on the
concatenated batch, their gradients agree (after the trainer's average over processes), the queue
holds the keys of both processes, shuffle-BN's shuffle/unshuffle round-trips, and BYOL's DirectPred
predictor is set from the correlation of the whole batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cropbench.backbones import build_backbone
from cropbench.dist import DistContext, init_process_group, shutdown
from cropbench.methods.base import MethodContext
from cropbench.methods.byol import BYOL
from cropbench.methods.losses import info_nce, nt_xent
from cropbench.methods.momentum import Queue, batch_shuffle, batch_unshuffle
from cropbench.runner import build_generator

WORLD, N, D, K, TAU = 2, 4, 6, 11, 0.2  # processes, local batch, dim, queue size, temperature


def _data() -> dict[str, torch.Tensor]:
    """The global batch every process slices its shard from (identical on all ranks)."""
    g = torch.Generator().manual_seed(0)
    names = ("z1", "z2", "q", "k")
    out = {name: torch.randn(WORLD * N, D, generator=g) for name in names}
    out["queue"] = torch.randn(K, D, generator=g)
    out["x"] = torch.arange(WORLD * N * 3, dtype=torch.float).view(WORLD * N, 3)
    return out


def _queue(keys: torch.Tensor) -> Queue:
    q = Queue(K, D)
    q.keys.copy_(keys)
    return q


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_process_group("gloo", rank, WORLD, str(Path(out_dir) / "store"))
    try:
        data, rows = _data(), slice(rank * N, (rank + 1) * N)
        z1, z2 = (data[n][rows].clone().requires_grad_(True) for n in ("z1", "z2"))
        loss_simclr = nt_xent(z1, z2, TAU, ctx)
        loss_simclr.backward()
        q = data["q"][rows].clone().requires_grad_(True)
        queue = _queue(data["queue"])
        loss_moco = info_nce(q, data["k"][rows], queue.keys.clone(), TAU)
        loss_moco.backward()
        queue.enqueue(data["k"][rows], ctx)
        gen = torch.Generator().manual_seed(100 + rank)  # differs per rank: rank 0's draw is broadcast
        shard, inverse = batch_shuffle(data["x"][rows], ctx, gen)
        back = batch_unshuffle(shard * 10, inverse, ctx)  # a per-sample "key encoder": ×10
        torch.save(
            {
                "simclr": loss_simclr.detach(),
                "z_grads": (z1.grad, z2.grad),
                "moco": loss_moco.detach(),
                "q_grad": q.grad,
                "queue": queue.keys,
                "ptr": queue.ptr,
                "shard": shard,
                "back": back,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    except BaseException:
        dist.destroy_process_group()  # no barrier on failure: the peer may never reach it
        raise
    shutdown(ctx)  # barrier, then destroy: no rank tears down while its peer still talks to it


def test_two_process_losses_equal_one_process_loss_on_the_concatenated_batch(
    tmp_path: Path,
) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = _data()

    # 1-process references on the concatenated batch
    z1, z2 = data["z1"].clone().requires_grad_(True), data["z2"].clone().requires_grad_(True)
    ref_simclr = nt_xent(z1, z2, TAU, DistContext())
    ref_simclr.backward()
    q = data["q"].clone().requires_grad_(True)
    ref_moco = info_nce(q, data["k"], data["queue"], TAU)
    ref_moco.backward()
    ref_queue = _queue(data["queue"])
    ref_queue.enqueue(data["k"], DistContext())

    # losses: the mean over processes (what averaging gradients over processes optimises)
    torch.testing.assert_close(torch.stack([r["simclr"] for r in ranks]).mean(), ref_simclr.detach())
    torch.testing.assert_close(torch.stack([r["moco"] for r in ranks]).mean(), ref_moco.detach())
    # gradients: each shard's gradient, averaged over processes, is the 1-process gradient
    for r, out in enumerate(ranks):
        rows = slice(r * N, (r + 1) * N)
        torch.testing.assert_close(out["z_grads"][0] / WORLD, z1.grad[rows])
        torch.testing.assert_close(out["z_grads"][1] / WORLD, z2.grad[rows])
        torch.testing.assert_close(out["q_grad"] / WORLD, q.grad[rows])
        # the queue got every process's keys, in rank order, identically everywhere
        torch.testing.assert_close(out["queue"], ref_queue.keys)
        assert int(out["ptr"]) == WORLD * N
        # shuffle-BN: unshuffle(f(shuffle(x))) == f(x) for a per-sample f
        torch.testing.assert_close(out["back"], data["x"][rows] * 10)
    shuffled = torch.cat([out["shard"] for out in ranks])
    assert not torch.equal(shuffled, data["x"])  # 8! orders; the seeds above do shuffle
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, data["x"].tolist()))


def _directpred(ctx: DistContext) -> BYOL:
    cfg = BYOL.Config(hidden_dim=8, out_dim=D, predictor="directpred")
    backbone = build_backbone("resnet_micro", widths=(8, 8, 8, 8))
    return BYOL(cfg, backbone, MethodContext(dist=ctx), build_generator("byol", {"views": {"size": 16}}))


def _directpred_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_process_group("gloo", rank, WORLD, str(Path(out_dir) / "store"))
    try:
        method, data = _directpred(ctx), _data()
        rows = slice(rank * N, (rank + 1) * N)
        for step, name in enumerate(("z1", "z2")):
            method.directpred_update(data[name][rows], step)
        torch.save(method.predictor.weight.clone(), Path(out_dir) / f"dp{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown(ctx)


def test_two_process_directpred_predictor_equals_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    """BYOL's DirectPred predictor: the correlation is averaged over processes, so every rank sets
    the same W_p as one process given the whole batch (equal shards)."""
    mp.spawn(_directpred_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    data, ref = _data(), _directpred(DistContext())
    for step, name in enumerate(("z1", "z2")):
        ref.directpred_update(data[name], step)
    alone = _directpred(DistContext())  # what a rank would set from its own shard only
    for step, name in enumerate(("z1", "z2")):
        alone.directpred_update(data[name][:N], step)
    assert not torch.allclose(alone.predictor.weight, ref.predictor.weight, atol=1e-3)
    for r in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"dp{r}.pt", weights_only=True), ref.predictor.weight)
