"""Bad datasets and bad fine-tune settings fail before the expensive part, with a message naming
what and where, and write nothing; data problems that leave a usable dataset are warned about
with counts and ids (issue 10: silent wrong results, checked too late, real layouts)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cropbench.data import build_dataset, validate_dataset
from cropbench.data.coco import CocoAnnotationWarning
from cropbench.errors import DatasetError, UnknownNameError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.coco import CocoSettings
from cropbench.evaluations.detection import (
    DetectionSettings,
    LossGrowthWarning,
    LossWatch,
    _optimizer,
    log_lr_scaling,
    scaled_lr,
)
from cropbench.registry import EVALUATIONS
from tests.test_layouts import _ann, write_coco, write_hmdb51


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# --- synthetic data only at micro scale ------------------------------------------------------------
@pytest.mark.parametrize("scale", ["small", "paper"])
def test_coco_eval_at_small_or_paper_scale_refuses_the_embedded_synthetic_coco(tmp_path: Path, scale: str) -> None:
    """The bug: `--scale small --eval coco` evaluated on synth_coco, generated into the user's root."""
    data = EvalData(tmp_path, scale=scale, log=lambda _m: None)
    with pytest.raises(DatasetError) as e:
        EVALUATIONS.get("coco").evaluate(nn.Identity(), CocoSettings(), data)
    msg = str(e.value)
    assert "'synth_coco' (eval.coco.dataset)" in msg and f"--scale {scale} reads real datasets only" in msg
    assert "--set eval.coco.dataset=coco" in msg
    assert _files(tmp_path) == []  # nothing generated into the user's data root


@pytest.mark.parametrize("name", ["voc", "cityscapes", "knn", "linear"])
def test_every_image_eval_refuses_synthetic_data_at_small_scale(tmp_path: Path, name: str) -> None:
    ev = EVALUATIONS.get(name)
    with pytest.raises(DatasetError, match=r"embedded synthetic data, which only the micro scale uses"):
        ev.evaluate(nn.Identity(), ev.Settings(), EvalData(tmp_path, scale="small", log=lambda _m: None))
    assert _files(tmp_path) == []


def test_validate_dataset_checks_without_writing(tmp_path: Path) -> None:
    validate_dataset("synth_coco", tmp_path, ("train", "val"), "micro")  # generated on use, not here
    with pytest.raises(DatasetError, match=r"'synth_images' \(data.dataset\) is cropbench's embedded"):
        validate_dataset("synth_images", tmp_path, "train", "paper", "data.dataset")
    with pytest.raises(DatasetError, match=r"dataset 'coco' \(eval.coco.dataset\) not found at .*coco\n"
                       r"expected layout:\n.*coco/train2017/<file_name>"):  # fmt: skip
        validate_dataset("coco", tmp_path, "train", "small", "eval.coco.dataset")
    with pytest.raises(UnknownNameError, match="unknown dataset 'cocoo'"):
        validate_dataset("cocoo", tmp_path, "train", "small")
    with pytest.raises(DatasetError, match="split 'all' .* only for video datasets, not 'coco'"):
        validate_dataset("coco", tmp_path, "all", "small")
    assert _files(tmp_path) == []


# --- ImageFolder: one class index, from the training split ---------------------------------------
def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def test_val_split_missing_a_class_keeps_the_training_indices(tmp_path: Path) -> None:
    root = tmp_path / "imagenet100"
    for c in ("a", "b", "c"):
        _png(root / "train" / c / "0.png")
    _png(root / "val" / "c" / "0.png")  # torchvision's per-folder index would give class 'c' label 0
    val = build_dataset("imagenet100", "val", tmp_path, image_size=8)
    assert val.targets == [2] and val.classes == ["a", "b", "c"] and val.num_classes == 3


def test_class_only_in_val_is_an_error_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "imagenet100"
    _png(root / "train" / "a" / "0.png")
    _png(root / "val" / "a" / "0.png")
    _png(root / "val" / "zebra" / "0.png")
    with pytest.raises(DatasetError, match=r"imagenet100/val has class folder\(s\) zebra that the training split"):
        validate_dataset("imagenet100", tmp_path, ("train", "val"), "small")


# --- COCO annotations that the loaders drop: reported --------------------------------------------
def test_negative_box_and_orphan_annotation_are_warned_with_counts_and_ids(tmp_path: Path) -> None:
    anns = [
        _ann(1, 139, [2.0, 3.0, 10.0, 8.0]),
        _ann(7, 139, [20.0, 3.0, -4.0, 8.0]),  # negative width
        _ann(8, 285, [1.0, 1.0, 5.0, -1.0]),  # negative height: image 285 has no usable box left
        _ann(9, 999, [1.0, 1.0, 5.0, 5.0]),  # image id 999 is not in 'images'
    ]
    write_coco(tmp_path, anns)
    with pytest.warns(CocoAnnotationWarning) as rec:
        ds = build_dataset("coco", "train", tmp_path)
    msgs = [str(w.message) for w in rec]
    assert any("1 annotation(s) name an image id not in 'images' and are ignored: annotation ids 9" in m for m in msgs)
    assert any("2 box(es) with width or height <= 0 are dropped: annotation ids 7, 8" in m for m in msgs)
    assert all("instances_train2017.json" in m for m in msgs)
    assert ds.ids == [139] and ds[0][1]["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]


def test_coco_file_whose_annotations_name_no_listed_image_is_an_error(tmp_path: Path) -> None:
    write_coco(tmp_path, [_ann(1, 5, [1.0, 1.0, 4.0, 4.0]), _ann(2, 6, [1.0, 1.0, 4.0, 4.0])])
    with pytest.raises(DatasetError, match=r"instances_train2017.json: none of its 2 annotations names an image id"):
        validate_dataset("coco", tmp_path, "train", "paper")


def test_coco_without_any_usable_box_is_an_error_and_bad_bbox_is_named(tmp_path: Path) -> None:
    write_coco(tmp_path, [_ann(1, 139, [1.0, 1.0, -4.0, 4.0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoAnnotationWarning)
        with pytest.raises(DatasetError, match="no image has a usable .* annotation"):
            build_dataset("coco", "train", tmp_path)
    write_coco(tmp_path / "b", [{**_ann(3, 139, [1.0, 1.0, 4.0, 4.0]), "bbox": [1.0, 2.0]}])
    with pytest.raises(DatasetError, match=r"1 annotation\(s\) without a 4-number 'bbox' .*: ids 3"):
        build_dataset("coco", "val", tmp_path / "b")


def test_clean_coco_gives_no_warning(tmp_path: Path) -> None:
    write_coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_dataset("coco", "train", tmp_path)


# --- fine-tune lr follows the batch (detectron2 REFERENCE_WORLD_SIZE rule) -----------------------
def test_lr_scales_linearly_with_the_batch() -> None:
    """detectron2 ``DefaultTrainer.auto_scale_workers`` (facebookresearch/detectron2
    engine/defaults.py): BASE_LR x new IMS_PER_BATCH / old. Hand numbers: 0.02 at 16 -> 2 is 0.0025."""
    assert scaled_lr(0.02, 2, 16) == pytest.approx(0.0025)
    assert scaled_lr(0.02, 16, 16) == 0.02
    s = DetectionSettings(batch_size=2, lr=0.02, lr_batch=16)
    opt = _optimizer(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), s)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.0025)] * 2
    lines: list[str] = []
    log_lr_scaling("[det]", 0.02, 2, 16, lines.append)
    assert lines == ["[det] lr 0.0025 at batch 2 (linear scaling: lr 0.02 at batch 16 x 2/16)"]


def test_micro_and_paper_defaults_keep_their_effective_lr() -> None:
    """The micro goldens ran lr 0.02 at batch 4; the papers' 0.02 at batch 16."""
    micro = CocoSettings()
    assert scaled_lr(micro.lr, micro.batch_size, micro.lr_batch) == pytest.approx(0.02)
    from cropbench.evaluations.cityscapes import CityscapesSettings
    from cropbench.evaluations.coco import PAPER

    assert scaled_lr(PAPER["lr"], PAPER["batch_size"], CocoSettings().lr_batch) == 0.02
    c = CityscapesSettings()
    assert scaled_lr(c.lr, c.batch_size, c.lr_batch) == 0.01


def test_loss_growth_warns_once_past_ten_times_its_first_value() -> None:
    """The reported run: mask loss 1.7 -> 10.9 -> 225 at batch 2 with lr 0.02."""
    lines: list[str] = []
    watch = LossWatch("[det]", lines.append)
    watch.update(20, {"loss_mask": 1.7, "loss_classifier": 1.0})
    watch.update(40, {"loss_mask": 10.9, "loss_classifier": 1.0})  # total 11.9 < 27: not yet
    assert lines == []
    with pytest.warns(LossGrowthWarning, match=r"loss grew from 2.7 .* to 226 at iteration 60.*loss_mask: 1.7 -> 225"):
        watch.update(60, {"loss_mask": 225.0, "loss_classifier": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.update(80, {"loss_mask": 500.0, "loss_classifier": 1.0})  # once only
    assert len(lines) == 1 and lines[0].startswith("WARNING: [det] loss grew")


# --- video splits -----------------------------------------------------------------------------------
def test_hmdb51_split_file_naming_missing_videos_fails_before_training(tmp_path: Path) -> None:
    folder = write_hmdb51(tmp_path)
    (folder / "cartwheel" / "cartwheel_clip_1_u_nm_np1_fr_goo_1.avi").unlink()
    before = _files(tmp_path)
    with pytest.raises(DatasetError) as e:
        validate_dataset("hmdb51", tmp_path, "all", "small", "eval.hmdb51.dataset")
    msg = str(e.value)
    assert "testTrainMulti_7030_splits/*_test_split1.txt names 1 video(s) that do not exist" in msg
    assert "cartwheel/cartwheel_clip_1_u_nm_np1_fr_goo_1.avi" in msg and "expected layout:" in msg
    assert _files(tmp_path) == before


def test_split_all_with_fold_files_missing_names_the_fold(tmp_path: Path) -> None:
    write_hmdb51(tmp_path, folds=(1,))
    validate_dataset("hmdb51", tmp_path, ("train1", "test1"), "small")  # fold 1 alone is fine
    with pytest.raises(DatasetError, match=r"no \*_test_split2.txt files in .*testTrainMulti_7030_splits"):
        validate_dataset("hmdb51", tmp_path, "all", "small")


def test_ucf101_missing_testlist_for_split_all_is_named(tmp_path: Path) -> None:
    lists = tmp_path / "ucf101" / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    with pytest.raises(DatasetError, match=r"ucfTrainTestlist/trainlist01.txt not found"):
        validate_dataset("ucf101", tmp_path, "all", "paper")


def test_coco_eval_before_any_training_names_a_missing_split_folder(tmp_path: Path) -> None:
    folder = write_coco(tmp_path)
    for p in (folder / "val2017").iterdir():
        p.unlink()
    (folder / "val2017").rmdir()
    with pytest.raises(DatasetError, match=r"image folder .*coco/val2017 not found\nexpected layout"):
        validate_dataset("coco", tmp_path, ("train", "val"), "paper")
    assert torch.is_tensor(build_dataset("coco", "train", tmp_path)[0][0])


def test_cli_small_scale_coco_eval_fails_before_training_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported command, `cropbench run regioncl --scale small --eval coco --data-root R`, with
    R holding the small recipe's real training set (CIFAR-10 in its official layout, tiny)."""
    from click.testing import CliRunner

    from cropbench.cli import cli
    from tests.test_layouts import write_cifar10

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)  # md5 only
    write_cifar10(tmp_path / "data")
    before = _files(tmp_path)
    args = ["run", "regioncl", "--variant", "m", "--scale", "small", "--eval", "coco", "--device", "cpu"]
    args += [
        "--data-root",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "rec"),
        "--work-dir",
        str(tmp_path / "runs"),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert "dataset 'synth_coco' (eval.coco.dataset) is cropbench's embedded synthetic data" in res.output
    assert "--set eval.coco.dataset=coco" in res.output
    assert _files(tmp_path) == before  # no synthetic COCO in the data root, no run folder, no record
