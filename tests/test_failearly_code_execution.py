"""Fail early, category "code execution from files" (issue 10): every checkpoint load uses
``torch.load(weights_only=True)`` (``Trainer.load`` for ``--resume``, ``runner.load_encoder``,
``cropbench export``), and checkpoints store only tensors and plain data, so a crafted
``checkpoint.pt`` whose pickle would run code is refused with an error naming it, and its code
never runs (the file it would write is not written)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.dist import DistContext
from cropbench.errors import CheckpointError, TrainingError
from cropbench.recipe import load_entry
from cropbench.runner import load_encoder, pretrain_local
from cropbench.trainer import CHECKPOINT, Trainer, check_plain, read_checkpoint

TINY = {"train": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}, "data": {"limit": 64}}


class WritesAFile:
    """Unpickling this runs ``touch target`` (what an attacker's checkpoint would do)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


def malicious_checkpoint(path: Path, target: Path) -> Path:
    """A checkpoint of the right shape with one poisoned value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "recipe_hash": "x", "encoder": {"w": torch.ones(2)}, "payload": WritesAFile(target)}, path)
    return path


def test_the_crafted_checkpoint_does_run_code_without_weights_only(tmp_path: Path) -> None:
    """Control: the payload is live, so the refusals below are what keeps it from running."""
    target = tmp_path / "pwned"
    torch.load(malicious_checkpoint(tmp_path / "evil.pt", target), weights_only=False)
    assert target.exists()


def test_resume_refuses_a_malicious_checkpoint_and_runs_none_of_it(tmp_path: Path, data_root: Path) -> None:
    target = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "runs" / "micro" / "simclr" / "default" / "seed0" / CHECKPOINT, target)
    before = ckpt.read_bytes()
    args = ["run", "simclr", "--eval", "knn", "--resume", "--data-root", str(data_root)]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "rec"), "--work-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"{ckpt}: refused: it holds objects other than tensors and plain data" in result.output
    assert "posix.system" in result.output and "weights_only=True" in result.output
    assert not target.exists() and ckpt.read_bytes() == before and not (tmp_path / "rec").exists()


def test_load_encoder_and_export_refuse_it_too(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    ckpt = malicious_checkpoint(tmp_path / "evil.pt", target)
    with pytest.raises(CheckpointError, match=f"{ckpt}: refused"):
        load_encoder(ckpt, torch.device("cpu"))
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "o.pth")])
    assert result.exit_code == 2 and "cannot be loaded with weights_only=True" in result.output
    assert not target.exists() and not (tmp_path / "o.pth").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("code_exec")
    recipe = load_entry("simclr").recipe("default", "micro", TINY)
    pretrain_local(recipe, run_dir, data_root, torch.device("cpu"), DistContext(), False, True, "simclr")
    return run_dir, recipe


def test_checkpoints_hold_only_tensors_and_plain_data(trained: tuple[Path, object]) -> None:
    run_dir, _ = trained
    blob = read_checkpoint(run_dir / CHECKPOINT)  # weights_only=True
    assert blob["epoch"] == 1 and blob["finished"] and isinstance(blob["recipe"], dict)
    encoder = load_encoder(run_dir / CHECKPOINT, torch.device("cpu"))
    assert torch.equal(next(iter(encoder.state_dict().values())), next(iter(blob["encoder"].values())))


def test_saving_anything_but_plain_data_is_refused_naming_the_key() -> None:
    @dataclass
    class Config:
        lr: float = 0.1

    check_plain({"a": [1, 2.0, "x", None, torch.ones(1)], "b": {"c": (True,)}})
    with pytest.raises(TrainingError, match=r"checkpoint\['recipe'\]\['optim'\] is a Config; checkpoints store only"):
        check_plain({"epoch": 1, "recipe": {"optim": Config()}})
    with pytest.raises(TrainingError, match=r"checkpoint\['h'\]\[1\] is a WritesAFile"):
        check_plain({"h": [1, WritesAFile(Path("x"))]})


def test_trainer_load_refuses_a_malicious_checkpoint(
    trained: tuple[Path, object], tmp_path: Path, data_root: Path
) -> None:
    _, recipe = trained
    from cropbench.runner import build_method, build_train_set, method_context

    dataset = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(dataset), DistContext()))
    trainer = Trainer(method, dataset, recipe, tmp_path, torch.device("cpu"), quiet=True)
    target = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / CHECKPOINT, target)
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        trainer.load()
    assert not target.exists()
