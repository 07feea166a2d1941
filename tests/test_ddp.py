"""Data parallelism on CPU with gloo: the gradient all-reduce, and a 2-process pretraining run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from cropbench.config import from_dict
from cropbench.dist import all_reduce_grads, init_process_group, shutdown
from cropbench.recipe import Recipe
from cropbench.runner import load_encoder, pretrain_distributed


def _grad_worker(rank: int, world: int, store: str, out: str) -> None:
    ctx = init_process_group("gloo", rank, world, store)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    shard = slice(rank * 4, rank * 4 + 4)
    torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
    all_reduce_grads(model.parameters(), ctx)
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    shutdown(ctx)


def test_all_reduce_grads_equals_the_full_batch_gradient(tmp_path: Path) -> None:
    out = str(tmp_path / "grads.pt")
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for got, want in zip(torch.load(out), (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_two_process_pretraining_runs_in_sync(tmp_path: Path, data_root: Path) -> None:
    """torchrun-launched gloo workers finish, write one checkpoint, and end with identical weights
    (``pretrain_distributed`` raises if the ranks' parameter checksums differ)."""
    recipe = from_dict(
        Recipe,
        {
            "method": "simclr",
            "backbone": "resnet_micro",
            "backbone_args": {"widths": [8, 8, 16, 16]},
            "data": {"image_size": 32, "limit": 32},
            "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2},
            "params": {"views": {"size": 16}, "hidden_dim": 32, "out_dim": 16},
        },
    )
    result = pretrain_distributed(recipe, tmp_path, data_root, torch.device("cpu"), 2, False, "test")
    assert result.steps == 2 and result.epochs == 1
    assert torch.isfinite(torch.tensor(result.loss_last))
    blob = torch.load(result.checkpoint, weights_only=True)
    assert blob["finished"]
    load_encoder(result.checkpoint, torch.device("cpu"))
