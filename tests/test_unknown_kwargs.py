"""Unknown backbone and dataset arguments are errors (issue 11, item 4): a typo in ``backbone_args``
or a dataset builder keyword names the key and lists the valid ones, and ``cropbench run`` stops in
preflight (exit 2, nothing written) instead of training with the default silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cropbench.backbones import build_backbone
from cropbench.cli import cli
from cropbench.config import check_kwargs
from cropbench.data import build_dataset, check_dataset_kwargs
from cropbench.errors import ConfigError
from cropbench.registry import BACKBONES, DATASETS

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error: {result.exception!r}") from result.exception
    return result.exit_code, result.output


def test_check_kwargs_names_the_key_and_the_valid_ones() -> None:
    def builder(folder: Path, split: str, image_size: int = 64, cache: bool = False, **_: Any) -> None:
        """A ``**_`` that used to swallow typos: the declared names are still the only valid ones."""

    check_kwargs(builder, {"image_size": 32, "cache": True}, "dataset 'x'", skip=2)
    with pytest.raises(
        ConfigError, match=r"dataset 'x': unknown argument 'image_sise'; valid arguments: image_size, cache$"
    ):
        check_kwargs(builder, {"image_sise": 32}, "dataset 'x'", skip=2)
    with pytest.raises(ConfigError, match="unknown argument 'folder'"):  # skipped positionals are no settings
        check_kwargs(builder, {"folder": "."}, "dataset 'x'", skip=2)


def test_backbone_typo_names_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"backbone_args of resnet_micro: unknown argument 'widht'; valid arguments: widths, depths"
    ):
        build_backbone("resnet_micro", widht=[8, 8, 8, 16])
    assert build_backbone("resnet_micro", widths=[8, 8, 8, 16]).feat_dim == 16  # the right key still works


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_rejects_an_unknown_argument(name: str) -> None:
    """Checked before anything is built, so no torchvision / pytorchvideo model is constructed."""
    with pytest.raises(ConfigError, match=f"backbone_args of {name}: unknown argument 'not_an_arg'"):
        build_backbone(name, not_an_arg=1)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_builder_rejects_an_unknown_argument(name: str, tmp_path: Path) -> None:
    """Checked before the folder is resolved or read (tmp_path holds no data)."""
    with pytest.raises(ConfigError, match=f"dataset '{name}': unknown argument 'not_an_arg'; valid arguments: "):
        build_dataset(name, "train", tmp_path, not_an_arg=1)


def test_dataset_typo_lists_the_builders_arguments() -> None:
    with pytest.raises(
        ConfigError, match=r"dataset 'synth_images': unknown argument 'imge_size'; valid arguments: image_size, cache$"
    ):
        check_dataset_kwargs("synth_images", {"imge_size": 32})
    with pytest.raises(
        ConfigError,
        match=r"data\.dataset: dataset 'synth_coco': unknown argument 'image_size'; valid arguments: masks$",
    ):
        check_dataset_kwargs("synth_coco", {"image_size": 32}, "data.dataset")
    check_dataset_kwargs("synth_ucf101", {"image_size": 32, "frames": 8, "stride": 2})


def test_run_stops_in_preflight_on_a_backbone_typo(tmp_path: Path, data_root: Path) -> None:
    code, out = invoke(
        "run", "simclr", *TINY, "--set", "backbone_args.widht=[8, 8, 8, 16]", "--data-root", str(data_root),
        "--out", str(tmp_path / "rec"), "--work-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 2, out
    assert "scale 'micro'" in out and "unknown argument 'widht'; valid arguments: widths, depths" in out
    assert not list(tmp_path.rglob("checkpoint.pt")) and not list(tmp_path.rglob("*.json"))  # no step ran


def test_run_stops_in_preflight_on_a_training_set_that_takes_other_arguments(tmp_path: Path, data_root: Path) -> None:
    """A detection set as the training set: its builder takes no ``image_size`` (was ignored)."""
    code, out = invoke(
        "run", "simclr", *TINY, "--set", "data.dataset=synth_coco", "--data-root", str(data_root),
        "--out", str(tmp_path / "rec"), "--work-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert code == 2, out
    assert "data.dataset: dataset 'synth_coco': unknown argument 'image_size'; valid arguments: masks" in out
    assert not list(tmp_path.rglob("checkpoint.pt"))
