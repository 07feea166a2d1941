"""Data parallelism on CPU with gloo: the gradient all-reduce, and a 2-process pretraining run."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from cropbench.config import from_dict
from cropbench.dist import DistContext, all_reduce_grads, init_process_group, params_checksum, shutdown
from cropbench.methods.base import MethodContext
from cropbench.optim import lr_at, set_lr
from cropbench.recipe import Recipe, list_entries, load_entry
from cropbench.runner import build_method, build_train_set, load_encoder, method_context, pretrain_distributed
from cropbench.trainer import Trainer, views_generator


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


# ------------------------------------------------------------------ DDP vs the flat all-reduce
# One variant per registered method: each trains under DDP. The old flat all-reduce runs beside
# DDP on the ones that exercise each way a step can differ (to keep the test short): SimCLR's
# gather with gradient, MoCo v2's shuffle-BN and queue, BYOL's momentum target, BraVe's per-group
# grad_scale / lr_scale and Nesterov, VideoMoCo's generator without a gradient at its first step.
DDP_CASES = [
    (e, v)
    for e, v in [(e, v) for e in list_entries() for v in load_entry(e).variants]
    if (e, v) not in {("brave", "v_v"), ("videomoco", "r3d")}
]
FLAT_CHECKED = ("simclr", "mocov2", "byol", "brave", "videomoco")


def _tiny_recipe(entry: str, variant: str) -> Recipe:
    """The entry's micro recipe, shrunk to a global batch of 16 (8 per process): 2 steps where the
    flat all-reduce is compared (VideoMoCo's generator acts from the second), else 1."""
    steps = 2 if entry in FLAT_CHECKED else 1
    shrink = {"train": {"epochs": 1, "max_steps_per_epoch": steps, "batch_size": 16, "log_every": 1}}
    return load_entry(entry).recipe(variant, "micro", {**shrink, "data": {"limit": 32}})


def flat_allreduce_step(tr: Trainer, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The trainer's step before DDP (the reference): forward and backward in the method, then one
    flat all-reduce of every gradient (``all_reduce_grads``), clip, optimizer step."""
    tc, s = tr.recipe.train, tr.state
    set_lr(tr.optimizer, lr_at(s.step, tr.steps_per_epoch, tc.epochs, tr.base_lr, tr.recipe.optim), tr.base_lr)
    gen = views_generator(tc.seed, s.step, tr.dist.rank, tr.device)
    out = tr.method.training_step(batch.to(tr.device), s.step, gen)
    tr.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    all_reduce_grads(tr.method.parameters(), tr.dist)
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(tr.method.parameters(), tc.grad_clip)
    tr.optimizer.step()
    tr.method.after_step(s.step)
    return out.loss.detach(), out.logs


def _fit(recipe: Recipe, run_dir: Path, ds: Any, ctx: DistContext, flat: bool) -> Trainer:
    method = build_method(recipe, method_context(recipe, len(ds), ctx))
    tr = Trainer(method, ds, recipe, run_dir, torch.device("cpu"), ctx, quiet=True)
    if flat:
        tr._step = partial(flat_allreduce_step, tr)  # type: ignore[method-assign]
    tr.fit()
    return tr


def _ddp_vs_flat_worker(rank: int, world: int, store: str, root: str, data_root: str) -> None:
    ctx = init_process_group("gloo", rank, world, store)
    out: dict[str, Any] = {}
    for entry, variant in DDP_CASES:
        recipe, t0 = _tiny_recipe(entry, variant), time.perf_counter()
        ds = build_train_set(recipe, Path(data_root))
        ddp = _fit(recipe, Path(root) / f"{entry}-{variant}", ds, ctx, flat=False)
        out[f"{entry}/{variant}"] = {"checksum": params_checksum(ddp.method), "steps": ddp.state.step}
        if entry in FLAT_CHECKED:
            ref = _fit(recipe, Path(root) / f"{entry}-{variant}-flat", ds, ctx, flat=True)
            pairs = zip(ddp.method.state_dict().values(), ref.method.state_dict().values(), strict=True)
            diff = max((a.double() - b.double()).abs().max().item() for a, b in pairs if a.is_floating_point())
            losses = (ddp.state.loss_first, ddp.state.loss_last, ref.state.loss_first, ref.state.loss_last)
            out[f"{entry}/{variant}"].update(max_diff=diff, loss=losses)
        out[f"{entry}/{variant}"]["seconds"] = time.perf_counter() - t0
    torch.save(out, Path(root) / f"rank{rank}.pt")
    shutdown(ctx)


@pytest.mark.slow
def test_ddp_equals_the_flat_all_reduce_for_every_registered_method(tmp_path: Path, data_root: Path) -> None:
    """Under 2 gloo processes every registered method trains a step under DDP without hanging or
    erroring; both ranks end with the same weights, equal to the old flat all-reduce's (world 2:
    (a + b) / 2 and a / 2 + b / 2 are the same float, measured max |diff| = 0); the checkpoint
    holds the unwrapped method's state_dict."""
    procs = mp.spawn(
        _ddp_vs_flat_worker, args=(2, str(tmp_path / "store"), str(tmp_path), str(data_root)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 600
    while not procs.join(timeout=5):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("2-process DDP run did not finish in 600 s (a hang)")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(DDP_CASES) and sum("max_diff" in r for r in ranks[0].values()) == sum(
        e in FLAT_CHECKED for e, _ in DDP_CASES
    )
    for case in ranks[0]:
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["steps"] >= 1 and r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-9, abs=1e-9), case
        if "max_diff" in r0:
            assert r0["max_diff"] <= 1e-6, (case, r0["max_diff"])
            assert r0["loss"][:2] == pytest.approx(r0["loss"][2:], rel=1e-6), case
    print({c: (f"{v.get('max_diff', -1):.1e}", round(v["seconds"], 1)) for c, v in ranks[0].items()})
    method = build_method(_tiny_recipe("mocov2", "default"), MethodContext())
    blob = torch.load(tmp_path / "mocov2-default" / "checkpoint.pt", weights_only=True)
    assert list(blob["method"]) == list(method.state_dict())  # no "module." prefix from the wrapper
