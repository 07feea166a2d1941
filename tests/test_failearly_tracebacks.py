"""Fail early, category "tracebacks instead of errors" (issue 10): each bad input is an error with
exit status 2 that names the input and what was expected, printed without a traceback, and
nothing is written. Numeric ``--set`` values are read the way users write them."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.errors import ConfigError
from cropbench.recipe import RANGES, load_entry, parse_overrides, parse_value

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]
TINY += ["--set", "data.limit=64"]
WHERE = "entry.yaml (variant 'default', scale 'micro')"


def invoke(*args: str) -> tuple[int, str]:
    """Exit status and output of the CLI; a traceback (any exception but SystemExit) fails the test."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error: {result.exception!r}") from result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def run_simclr(tmp: Path, data_root: Path, *sets: str) -> tuple[int, str]:
    args = ["run", "simclr", "--eval", "knn", *TINY, "--data-root", str(data_root)]
    return invoke(*args, "--out", str(tmp / "rec"), "--work-dir", str(tmp / "runs"), *sets)


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1e-3", 0.001), ("1E-3", 0.001), (".5", 0.5), ("-1", -1), ("1_000", 1000), ("2", 2), ("0.25", 0.25)]
    + [("true", True), ("null", None), ("cosine", "cosine"), ("[0.2, 1.0]", [0.2, 1.0]), ("nan", "nan")],
)
def test_values_are_parsed_as_users_write_them(raw: str, value: object) -> None:
    got = parse_value(raw)
    assert got == value and type(got) is type(value)  # 2 stays an int, nan stays text (not a number)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.epochs", "--set 'train.epochs': expected KEY.PATH=VALUE"),
        ("train..epochs=1", "--set 'train..epochs=1': expected KEY.PATH=VALUE"),
        ("=1", "expected KEY.PATH=VALUE"),
        ("params.views.scale=[0.2,", "--set value '[0.2,' is neither a number nor valid YAML"),
    ],
)
def test_malformed_set_items_name_the_item(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_overrides([item])


def test_conflicting_set_items_are_an_error() -> None:
    with pytest.raises(ConfigError, match="--set 'train.epochs.x=2': train.epochs was already set to a value"):
        parse_overrides(["train.epochs=1", "train.epochs.x=2"])
    with pytest.raises(ConfigError, match="--set 'train=3': train is a section"):
        parse_overrides(["train.epochs=1", "train=3"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.batch_size=0"], "train.batch_size: expected an integer >= 1, got 0"),
        (["train.epochs=0"], "train.epochs: expected an integer >= 1, got 0"),
        (["optim.lr=0"], "optim.lr: expected a finite number > 0, got 0.0"),
        (["optim.lr=-1e-3"], "optim.lr: expected a finite number > 0, got -0.001"),
        (["optim.lr=.inf"], "optim.lr: expected a finite number > 0, got inf"),
        (["optim.lr=nan"], "optim.lr: expected a number, got str 'nan'"),
        (["optim.momentum=1.5"], "optim.momentum: expected a number in [0, 1), got 1.5"),
        (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch: expected null (no cap) or an integer >= 1"),
        (["data.image_size=-64"], "data.image_size: expected an integer >= 1, got -64"),
        (["optim=3"], "optim: expected a mapping for OptimConfig, got int 3"),
        (["train.epochs=1.5"], "train.epochs: expected an integer, got float 1.5"),
    ],
)
def test_out_of_range_numbers_are_errors(sets: list[str], message: str, tmp_path: Path, data_root: Path) -> None:
    code, out = run_simclr(tmp_path, data_root, *(a for s in sets for a in ("--set", s)))
    assert code == 2 and WHERE in out and message in out, out
    assert files(tmp_path) == []


def test_every_entry_recipe_is_within_the_ranges() -> None:
    """The committed recipes pass the range checks (so RANGES is not stricter than the papers)."""
    from cropbench.recipe import list_entries

    for name in list_entries():
        e = load_entry(name)
        for v in e.variants:
            for scale in ("micro", "small", "paper"):
                e.recipe(v, scale)  # raises on any range violation
    assert {"train.epochs", "train.batch_size", "optim.lr"} <= set(RANGES)


def test_a_view_size_off_the_backbone_stride_is_an_error(tmp_path: Path, data_root: Path) -> None:
    """RegionCL boxes lie on the backbone's output grid (resnet_micro: stride 8): a 60-px view is
    named with the stride, instead of a ValueError from the first training step."""
    args = [
        "run",
        "regioncl",
        "--eval",
        "knn",
        *TINY,
        "--set",
        "params.views.views.size=60",
        "--data-root",
        str(data_root),
    ]
    code, out = invoke(*args, "--out", str(tmp_path / "rec"), "--work-dir", str(tmp_path / "runs"))
    assert code == 2 and "regioncl/entry.yaml (variant 'm', scale 'micro'): params.views.views.size: 60" in out
    assert "is not a multiple of the backbone's output stride 8" in out and files(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_checkpoint_with_resume_is_an_error_naming_it(damage: str, tmp_path: Path, data_root: Path) -> None:
    import torch

    ckpt = tmp_path / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"encoder": {"w": torch.ones(64)}, "epoch": 1}, ckpt)
    blob = {"truncated": ckpt.read_bytes()[:300], "garbage": b"not a checkpoint at all", "empty": b""}[damage]
    ckpt.write_bytes(blob)
    code, out = run_simclr(tmp_path, data_root, "--resume")
    assert code == 2 and f"{ckpt}: not a readable checkpoint (corrupt or truncated" in out
    assert "delete it to start this run from scratch" in out
    assert ckpt.read_bytes() == blob and files(tmp_path) == ["runs/micro/simclr/default/seed0/checkpoint.pt"]


def test_unknown_names_list_the_valid_ones_in_plain_english(tmp_path: Path) -> None:
    code, out = invoke("run", "nope")
    assert code == 2 and "unknown entry 'nope'; valid entries: " in out
    code, out = invoke("run", "regioncl", "--variant", "x")
    assert code == 2 and "unknown variant of regioncl 'x'; valid variants of regioncl: d, m, s" in out
