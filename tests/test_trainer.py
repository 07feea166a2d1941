"""Trainer: exact resume, NaN stop keeping the last good checkpoint, atomic checkpoints, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.errors import TrainingError
from cropbench.optim import LARS, lr_at
from cropbench.recipe import OptimConfig, Recipe
from cropbench.runner import build_method, build_train_set, method_context
from cropbench.trainer import CHECKPOINT, Trainer

TINY = {
    "method": "simclr",
    "backbone": "resnet_micro",
    "backbone_args": {"widths": [8, 8, 16, 16]},
    "data": {"image_size": 32, "limit": 48},
    "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2, "log_every": 1},
    "optim": {"lr": 0.1, "base_batch": 16, "warmup_epochs": 0.5},
    "params": {"views": {"size": 16}, "hidden_dim": 32, "out_dim": 16},
}


# BYOL with DirectPred: method state outside the parameters (the correlation EMA, the set predictor)
DIRECTPRED = {
    "method": "byol",
    "params": {"views": {"views": {"size": 16}}, "hidden_dim": 32, "out_dim": 16, "predictor": "directpred"},
}


def _trainer(run_dir: Path, data_root: Path, recipe_over: dict | None = None, **train: object) -> Trainer:
    recipe = from_dict(Recipe, {**TINY, **(recipe_over or {}), "train": {**TINY["train"], **train}})
    ds = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(ds), DistContext()))
    return Trainer(method, ds, recipe, run_dir, torch.device("cpu"), quiet=True)


@pytest.mark.parametrize("recipe_over", [None, DIRECTPRED], ids=["simclr", "byol-directpred"])
def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(
    tmp_path: Path, data_root: Path, recipe_over: dict | None
) -> None:
    full = _trainer(tmp_path / "full", data_root, recipe_over)
    res_full = full.fit()

    interrupted = _trainer(tmp_path / "cut", data_root, recipe_over)
    original = interrupted._epoch
    calls = {"n": 0}

    def epoch_then_crash(epoch: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during the second epoch, after the first checkpoint
        original(epoch)

    interrupted._epoch = epoch_then_crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["epoch"] == 1

    resumed = _trainer(tmp_path / "cut", data_root, recipe_over)
    res_resumed = resumed.fit(resume=True)
    assert (res_resumed.loss_first, res_resumed.loss_last, res_resumed.steps) == (
        res_full.loss_first,
        res_full.loss_last,
        res_full.steps,
    )
    for (k, a), b in zip(full.method.state_dict().items(), resumed.method.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert not list((tmp_path / "cut").glob(".*tmp*")), "a temporary checkpoint file was left behind"


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path, data_root: Path) -> None:
    trainer = _trainer(tmp_path, data_root)
    step_fn = trainer.method.training_step

    def poisoned(batch, step, gen):  # type: ignore[no-untyped-def]
        out = step_fn(batch, step, gen)
        if step == 3:  # second step of the second epoch
            out.loss = out.loss * float("nan")
        return out

    trainer.method.training_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="non-finite loss .* epoch 2, step 3.*last good checkpoint"):
        trainer.fit()
    blob = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert blob["epoch"] == 1 and not blob["finished"]
    assert all(torch.isfinite(v).all() for v in blob["encoder"].values() if v.is_floating_point())


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path: Path, data_root: Path) -> None:
    _trainer(tmp_path, data_root, epochs=1).fit()
    with pytest.raises(TrainingError, match="different recipe"):
        _trainer(tmp_path, data_root, epochs=3).fit(resume=True)


def test_lr_schedule_warmup_then_cosine_to_zero() -> None:
    cfg = OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine")
    spe, epochs = 10, 3
    assert lr_at(0, spe, epochs, 2.0, cfg) == pytest.approx(2.0 / 10)
    assert lr_at(9, spe, epochs, 2.0, cfg) == pytest.approx(2.0)
    assert lr_at(10, spe, epochs, 2.0, cfg) == pytest.approx(2.0)
    assert lr_at(20, spe, epochs, 2.0, cfg) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    step = OptimConfig(schedule="step", milestones=(1.0, 2.0))
    assert [lr_at(s, spe, epochs, 1.0, step) for s in (5, 15, 25)] == pytest.approx([1.0, 0.1, 0.01])


def test_lars_step_matches_the_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    g = torch.randn(5)
    w0 = w.detach().clone()
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    w.grad = g.clone()
    opt.step()
    d = g + 0.1 * w0
    expected = w0 - 0.5 * (0.01 * w0.norm() / d.norm()) * d
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_metrics_rows_hold_every_loss_component_and_the_summary_its_first_and_last(
    tmp_path: Path, data_root: Path
) -> None:
    """Each metrics.jsonl step row holds the mean of every logged component over the steps since
    the previous row; the summary (the record's ``pretrain``) has ``loss_<c>_first`` / ``_last``."""
    dense = {
        **TINY,
        "method": "densecl",
        "params": {**TINY["params"], "dense_hidden_dim": 16, "queue_size": 64, "shuffle_bn_splits": 2},
        "train": {**TINY["train"], "max_steps_per_epoch": 3, "log_every": 2},  # 3 steps per epoch
    }
    recipe = from_dict(Recipe, dense)
    ds = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(ds), DistContext()))
    trainer = Trainer(method, ds, recipe, tmp_path, torch.device("cpu"), quiet=True)
    seen: list[dict[str, float]] = []
    step_fn = method.training_step

    def recording(batch, step, gen):  # type: ignore[no-untyped-def]
        out = step_fn(batch, step, gen)
        seen.append({k: float(v) for k, v in out.logs.items()})
        return out

    method.training_step = recording  # type: ignore[method-assign]
    summary = trainer.fit().summary()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6] and len(seen) == 6
    # the window restarts at each epoch (so --resume gives the same rows): step 3 is in no row
    windows = {2: seen[0:2], 4: seen[3:4], 6: seen[4:6]}
    for row in steps:
        for key in ("loss_global", "loss_dense", "match_acc"):
            window = [v[key] for v in windows[row["step"]]]
            assert row[key] == pytest.approx(sum(window) / len(window), rel=1e-9), (row["step"], key)
    assert seen[0]["loss_dense"] != seen[1]["loss_dense"]  # so a single step's value would differ
    assert {k for k in summary if k.startswith("loss_") and k not in ("loss_first", "loss_last")} == {
        "loss_global_first",
        "loss_global_last",
        "loss_dense_first",
        "loss_dense_last",
    }
    assert summary["loss_dense_first"] == steps[0]["loss_dense"]
    assert summary["loss_dense_last"] == steps[-1]["loss_dense"]
    assert summary["loss_global_last"] == steps[-1]["loss_global"]
