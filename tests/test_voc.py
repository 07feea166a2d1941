"""VOC: the devkit AP against hand-computed values, the VOCdevkit loader, bad input, e2e."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cropbench.backbones import resnet50, resnet_micro
from cropbench.config import from_dict
from cropbench.data.synth import CLASSES
from cropbench.data.synth_dense import SynthDenseConfig, write_voc
from cropbench.data.voc import VOC_CLASSES, VocDetection
from cropbench.errors import DatasetError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.detection import build_detector
from cropbench.evaluations.voc import (
    PAPER,
    VocSettings,
    finetune_and_test,
    voc_ap,
    voc_class_ap,
    voc_metrics,
)

TINY = SynthDenseConfig(image_size=64, train_images=6, val_images=12)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "voc"
    write_voc(root, TINY)
    return root


def test_voc_ap_by_hand():
    rec = np.array([0.25, 0.5, 0.5, 0.75])
    prec = np.array([1.0, 1.0, 2 / 3, 0.75])
    # 11-point, max precision at recall >= t: t <= .5 -> 1, t = .6, .7 -> .75, t >= .8 -> 0
    assert voc_ap(rec, prec, True) == pytest.approx((6 * 1.0 + 2 * 0.75) / 11)
    # all-point: envelope 1, 1, .75, .75 -> 0.25 * 1 + 0.25 * 1 + 0.25 * 0.75
    assert voc_ap(rec, prec, False) == pytest.approx(0.6875)


def test_class_ap_difficult_duplicates_and_misses():
    gt = {
        0: (np.array([[1, 1, 10, 10], [20, 20, 30, 30]], float), np.array([False, True])),
        1: (np.array([[5, 5, 15, 15]], float), np.array([False])),
    }
    dets = [
        (0, 0.9, np.array([1, 1, 10, 10], float)),  # TP
        (0, 0.8, np.array([1, 1, 10, 10], float)),  # duplicate -> FP
        (0, 0.7, np.array([20, 20, 30, 30], float)),  # on a difficult object -> ignored
        (1, 0.6, np.array([40, 40, 50, 50], float)),  # miss -> FP
        (1, 0.5, np.array([5, 5, 15, 14], float)),  # IoU 110/121 > 0.5 -> TP
    ]
    # ranked: TP, FP, (ignored), FP, TP, npos = 2: recall .5 .5 .5 .5 1, precision 1 .5 .5 1/3 .5
    assert voc_class_ap(gt, dets, 0.5, use_07_metric=False) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # at IoU 0.95 the second TP becomes a miss
    assert voc_class_ap(gt, dets, 0.95, use_07_metric=False) == pytest.approx(0.5)
    assert voc_class_ap({0: (np.zeros((0, 4)), np.zeros(0, bool))}, dets, 0.5, True) is None


def test_loader_boxes_and_perfect_predictions_score_100(voc_root):
    test = VocDetection(voc_root, "test", CLASSES)
    _, t = test[0]
    obj = test.records[0].objects[0]
    assert t["boxes"][0].tolist() == [obj.box[0] - 1, obj.box[1] - 1, obj.box[2], obj.box[3]]
    dets = [
        (i, int(lab), 1.0, box.numpy())
        for i in range(len(test))
        for box, lab in zip(test.target(i)["boxes"], test.target(i)["labels"], strict=True)
    ]
    assert voc_metrics(test.records, dets, test.classes, True) == pytest.approx({"AP": 100, "AP50": 100, "AP75": 100})
    shifted = [(i, lab, s, box + np.array([6.0, 0, 6.0, 0])) for i, lab, s, box in dets]
    m = voc_metrics(test.records, shifted, test.classes, True)
    assert m["AP"] < 60 and m["AP75"] < m["AP50"]
    assert len(VocDetection(voc_root, "trainval", CLASSES)) == TINY.train_images  # 2007 + 2012


def test_bad_input(tmp_path, voc_root):
    with pytest.raises(DatasetError, match=r"trainval\.txt not found"):
        VocDetection(tmp_path, "trainval")
    with pytest.raises(DatasetError, match=r"Annotations/.*\.xml: object class 'vstripes' is not one of aeroplane"):
        VocDetection(voc_root, "test", VOC_CLASSES)  # texture names are not the 20 official classes
    base = tmp_path / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    (base / "Annotations" / "000001.xml").write_text(
        "<annotation><object><name>cat</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>8</xmax></bndbox></object></annotation>"
    )
    with pytest.raises(DatasetError, match=r"000001\.xml: object 'cat' needs a bndbox"):
        VocDetection(tmp_path, "test")
    (base / "Annotations" / "000001.xml").write_text(
        "<annotation><object><name>cat</name><difficult>1</difficult>"
        "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>8</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DatasetError, match=r"000002\.xml: image 000002 is listed in .*test\.txt"):
        VocDetection(tmp_path, "test")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    ds = VocDetection(tmp_path, "test")
    assert ds.target(0)["difficult"].tolist() == [True]
    with pytest.raises(DatasetError, match=r"JPEGImages/000001\.jpg: image 000001 is listed"):
        ds[0]
    (base / "JPEGImages").mkdir()
    Image.new("RGB", (10, 10)).save(base / "JPEGImages" / "000001.jpg")
    assert ds[0][0].shape == (3, 10, 10)


def test_finetune_end_to_end(voc_root):
    s = VocSettings(
        iterations=3,
        batch_size=2,
        train_min_sizes=(64,),
        test_min_size=64,
        max_size=64,
        detections_per_image=10,
        log_every=1,
        anchor_sizes=(16, 32),
    )
    train, test = (
        VocDetection(voc_root, "trainval", CLASSES),
        VocDetection(voc_root, "test", CLASSES),
    )
    logs: list[str] = []
    torch.manual_seed(0)
    m = finetune_and_test(resnet_micro(), s, EvalData(root=voc_root, log=logs.append), train, test)
    assert set(m) == {"AP", "AP50", "AP75"} and all(0 <= v <= 100 for v in m.values())
    assert any("iter 3/3" in line for line in logs)


def test_paper_settings_build_the_r50_c4_detector():
    s = from_dict(VocSettings, PAPER, "voc PAPER")
    assert (s.arch, s.masks, s.iterations, s.steps, s.warmup_iters) == ("c4", False, 24000, (18000, 22000), 100)
    model = build_detector(resnet50(), 20, s)
    assert model.backbone.out_channels == 1024 and model.roi_heads.box_predictor.cls_score.in_features == 2048
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    assert model.transform.min_size == tuple(range(480, 801, 32))
