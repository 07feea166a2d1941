"""Epoch hooks get an ``EpochContext``, not the trainer; one schedule length (issue 11, items 1-2).

* ``on_epoch_start`` / ``on_epoch_end`` receive a frozen ``EpochContext`` (epoch, device, seed,
  run folder, rank / world size) and nothing else of the trainer.
* Steps per epoch are computed once (``runner.method_context``) and the same number drives the lr
  schedule and the methods' own step schedules: BYOL's cosine momentum (BYOL §3.3, tau_k =
  1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 over all K training steps) and VideoMoCo's adversarial
  start (``adversarial_from`` x total steps).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.errors import TrainingError
from cropbench.methods.base import EpochContext
from cropbench.recipe import Recipe, load_entry
from cropbench.runner import build_method, build_train_set, method_context
from cropbench.trainer import Trainer

TINY = {
    "method": "byol",
    "backbone": "resnet_micro",
    "backbone_args": {"widths": [8, 8, 16, 16]},
    "data": {"image_size": 32, "limit": 48},
    "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2, "log_every": 1, "seed": 3},
    "optim": {"lr": 0.1, "base_batch": 16, "warmup_epochs": 0.5},
    "params": {"views": {"views": {"size": 16}}, "hidden_dim": 32, "out_dim": 16, "base_momentum": 0.9},
}


def _recipe(**over: Any) -> Recipe:
    return from_dict(Recipe, {**TINY, **over})


def _trainer(recipe: Recipe, run_dir: Path, data_root: Path, n_ctx: int | None = None) -> Trainer:
    ds = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(ds) if n_ctx is None else n_ctx, DistContext()))
    return Trainer(method, ds, recipe, run_dir, torch.device("cpu"), quiet=True)


def test_method_context_steps_by_hand() -> None:
    """n // batch, capped by max_steps_per_epoch, at least 1; batch per process = batch / world."""
    r = _recipe(train={**TINY["train"], "max_steps_per_epoch": None})
    assert method_context(r, 100, DistContext()).steps_per_epoch == 6  # 100 // 16
    assert method_context(_recipe(), 100, DistContext()).steps_per_epoch == 2  # capped
    assert method_context(r, 10, DistContext()).steps_per_epoch == 1
    ctx = method_context(r, 100, DistContext(0, 2))
    assert (ctx.total_steps, ctx.batch_size, ctx.epochs) == (12, 8, 2)


def test_hooks_receive_an_epoch_context_not_the_trainer(tmp_path: Path, data_root: Path) -> None:
    trainer = _trainer(_recipe(), tmp_path, data_root)
    seen: list[tuple[str, Any]] = []
    base = type(trainer.method)

    class Recording(base):  # type: ignore[misc, valid-type]
        def on_epoch_start(self, ctx: Any) -> None:
            seen.append(("start", ctx))

        def on_epoch_end(self, ctx: Any) -> dict[str, float]:
            seen.append(("end", ctx))
            return {"hook_epoch": float(ctx.epoch)}

    trainer.method.__class__ = Recording
    trainer.fit()
    assert [(k, c.epoch) for k, c in seen] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    for _, ctx in seen:
        assert type(ctx) is EpochContext
        assert (ctx.device, ctx.seed, ctx.run_dir, ctx.dist) == (torch.device("cpu"), 3, tmp_path, DistContext())
    fields = {f.name for f in dataclasses.fields(EpochContext)}
    assert fields == {"epoch", "device", "seed", "run_dir", "dist"}  # no trainer, no recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0][1].epoch = 5  # type: ignore[misc]
    assert [h["hook_epoch"] for h in trainer.state.history if "hook_epoch" in h] == [0.0, 1.0]


def test_lr_schedule_and_byol_momentum_share_one_length(tmp_path: Path, data_root: Path) -> None:
    """48 samples at batch 16 = 3 steps, capped to 2 per epoch, 2 epochs: K = 4 for both."""
    trainer = _trainer(_recipe(), tmp_path, data_root)
    assert trainer.steps_per_epoch == trainer.method.ctx.steps_per_epoch == 2
    trainer.fit()
    rows = [h for h in trainer.state.history if "momentum" in h]
    tau = [1 - (1 - 0.9) * (math.cos(math.pi * k / 4) + 1) / 2 for k in range(4)]
    assert [h["momentum"] for h in rows] == pytest.approx(tau, abs=1e-7)
    # lr: warmup over 0.5 epoch = 1 step, then cosine to 0 over the other 3 of the same K = 4 steps
    lr = [0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 3)) for k in range(1, 4)]
    assert [h["lr"] for h in rows] == pytest.approx(lr, rel=1e-6)  # 0.1, 0.1, 0.075, 0.025


def test_videomoco_adversarial_start_uses_the_lr_schedule_length(tmp_path: Path, data_root: Path) -> None:
    """adversarial_from 0.5 of 2 x 2 steps: frames are dropped (and logged) from step 2 on."""
    over = {"train": {"epochs": 2, "max_steps_per_epoch": 2, "batch_size": 16, "log_every": 1}}
    over |= {"data": {"limit": 64}, "params": {"adversarial_from": 0.5}}
    trainer = _trainer(load_entry("videomoco").recipe("default", "micro", over), tmp_path, data_root)
    assert trainer.method.ctx.total_steps == trainer.steps_per_epoch * 2 == 4
    trainer.fit()
    steps = [h["step"] for h in trainer.state.history if "dropped_first_half" in h]
    assert steps == [3, 4]  # rows are written after steps 2 and 3 (0-based)


def test_prepare_dataset_must_keep_the_sample_count(tmp_path: Path, data_root: Path) -> None:
    recipe = _recipe()
    ds = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(ds), DistContext()))
    method.prepare_dataset = lambda d, run_dir: torch.utils.data.Subset(d, range(32))  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match=r"prepare_dataset changed the number of training samples \(48 -> 32\)"):
        Trainer(method, ds, recipe, tmp_path, torch.device("cpu"), quiet=True)


def test_a_method_built_for_more_data_is_refused(tmp_path: Path, data_root: Path) -> None:
    recipe = _recipe(train={**TINY["train"], "max_steps_per_epoch": None})
    with pytest.raises(TrainingError, match=r"built for 62 steps x 2 epochs .* has 48 samples"):
        _trainer(recipe, tmp_path, data_root, n_ctx=1000)
