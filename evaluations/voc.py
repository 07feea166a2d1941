"""PASCAL VOC detection transfer: Faster R-CNN R50-C4 on VOC07+12 trainval, tested on VOC07 test.

Protocol (MoCo ``pascal_voc_R_50_C4_24k``, used by DenseCL / HoughCL / CYBORGS): C4 backbone with
SyncBN and MoCo's extra BN after res5, all layers fine-tuned, 24k iterations at batch 16, lr 0.02,
×0.1 at 18k / 22k, 100 warmup iterations, train scales 480-800 (step 32), test 800. Metric as
detectron2's ``PascalVOCDetectionEvaluator``: the VOC devkit AP per class (difficult objects
ignored, 11-point for VOC2007) at IoU 0.50:0.95, reported as AP (mean), AP50 and AP75 in percent.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cropbench.data import build_dataset, dataset_folder
from cropbench.data.voc import VOC_SPLITS, VocDetection, VocRecord
from cropbench.errors import CropbenchError
from cropbench.evaluations import detectron2_backend as d2
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.detection import (
    DetectionSettings,
    build_detector,
    predict,
    train_detector,
)

# Paper scale: MoCo detection/configs/pascal_voc_R_50_C4_24k{,_moco}.yaml + Base-RCNN-C4-BN.yaml.
# Preset "paper" (``eval: {voc: {preset: paper}}``); DETECTIONS_PER_IMAGE 100 is the Settings default.
PAPER: dict[str, Any] = {
    "dataset": "voc",
    "iterations": 24000,
    "batch_size": 16,
    "lr": 0.02,
    "steps": [18000, 22000],
    "warmup_iters": 100,
    "train_min_sizes": list(range(480, 801, 32)),
    "test_min_size": 800,
    "max_size": 1333,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "rpn_batch_per_image": 256,
    "roi_batch_per_image": 512,
    "rpn_pre_nms_train": 12000,
    "rpn_post_nms_train": 2000,
    "rpn_pre_nms_test": 6000,
    "precise_bn_iters": 200,  # TEST.PRECISE_BN: ENABLED True, NUM_ITER 200 (detectron2 default)
    "rpn_post_nms_test": 1000,
    "log_every": 20,
}


@dataclass(frozen=True)
class VocSettings(DetectionSettings):
    """Micro defaults: embedded 128-px scenes in VOC layout, resnet_micro C4 (stride 4)."""

    dataset: str = "synth_voc"
    train_split: str = "trainval"
    test_split: str = "test"
    arch: Literal["fpn", "c4"] = "c4"
    masks: bool = False
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # all on the single C4 map
    roi_batch_per_image: int = 32  # every RoI runs res5 in C4: the micro budget's largest cost
    use_07_metric: bool = True  # VOC2007 test: the devkit's 11-point AP (detectron2 does the same)
    # detectron2 (the papers' framework) or torchvision; ``auto`` resolves on validation: detectron2
    # on real data when installed, torchvision otherwise and at micro (see coco.CocoSettings)
    backend: Literal["auto", "torchvision", "detectron2"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", d2.resolve_backend(self.backend, self.dataset, "eval.voc.backend"))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Area under the PR curve: 11-point interpolated (VOC2007) or all-point (VOC2010+)."""
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.arange(0.0, 1.1, 0.1)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_inclusive(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU in VOC's inclusive pixel convention (+1 on widths and heights). box (4,), gts (n, 4)."""
    iw = np.maximum(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1.0, 0.0)
    inter = iw * ih
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    return inter / (area + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter)


def voc_class_ap(
    gt: dict[int, tuple[np.ndarray, np.ndarray]],
    dets: list[tuple[int, float, np.ndarray]],
    iou_thresh: float,
    use_07_metric: bool,
) -> float | None:
    """The devkit's AP of one class. ``gt``: image -> (boxes n×4 VOC 1-based, difficult n bool);
    ``dets``: (image, score, box in VOC coordinates). None when the class has no non-difficult
    object."""
    npos = sum(int((~diff).sum()) for _, diff in gt.values())
    if npos == 0:
        return None
    taken = {img: np.zeros(len(b), bool) for img, (b, _) in gt.items()}
    order = sorted(range(len(dets)), key=lambda d: -dets[d][1])
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, d in enumerate(order):
        img, _, box = dets[d]
        boxes, difficult = gt.get(img, (np.zeros((0, 4)), np.zeros(0, bool)))
        iou = _iou_inclusive(box, boxes) if len(boxes) else np.zeros(0)
        j = int(iou.argmax()) if len(iou) else -1
        if j >= 0 and iou[j] > iou_thresh:
            if difficult[j]:
                continue  # neither true nor false positive
            if taken[img][j]:
                fp[rank] = 1
            else:
                tp[rank], taken[img][j] = 1, True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps), use_07_metric)


def voc_metrics(
    records: list[VocRecord],
    detections: list[tuple[int, int, float, np.ndarray]],
    classes: tuple[str, ...],
    use_07_metric: bool,
) -> dict[str, float]:
    """AP (mean over IoU 0.50:0.95 of the class-mean AP), AP50, AP75 in percent.
    ``detections``: (record index, label 1..K, score, box xyxy continuous coordinates)."""
    gt: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {c: {} for c in classes}
    for i, rec in enumerate(records):
        for c in {o.name for o in rec.objects}:
            objs = [o for o in rec.objects if o.name == c]
            gt[c][i] = (
                np.array([o.box for o in objs], float),
                np.array([o.difficult for o in objs], bool),
            )
    per_class: dict[str, list] = defaultdict(list)
    for i, label, score, box in detections:
        # as detectron2's evaluator: back to VOC's 1-based xmin, ymin
        vbox = np.asarray(box, float) + np.array([1.0, 1.0, 0.0, 0.0])
        per_class[classes[label - 1]].append((i, score, vbox))
    aps = {}
    for t in range(50, 100, 5):
        vals = [voc_class_ap(gt[c], per_class[c], t / 100, use_07_metric) for c in classes]
        vals = [v for v in vals if v is not None]
        if not vals:
            raise CropbenchError("VOC evaluation: the test set has no non-difficult objects")
        aps[t] = float(np.mean(vals)) * 100
    return {"AP": float(np.mean(list(aps.values()))), "AP50": aps[50], "AP75": aps[75]}


def _detections(index: int, out: dict[str, Tensor]) -> list[tuple[int, int, float, np.ndarray]]:
    return [
        (index, int(lab), float(sc), box.numpy())
        for box, lab, sc in zip(out["boxes"], out["labels"], out["scores"], strict=True)
    ]


@register_evaluation("voc", VocSettings, metrics=("AP", "AP50", "AP75"), presets={"paper": PAPER, "micro": {}})
def evaluate(encoder: nn.Module, settings: VocSettings, data: EvalData) -> dict[str, float]:
    """Faster R-CNN C4 fine-tune on VOC07+12 trainval; AP / AP50 / AP75 on VOC07 test (%)."""
    s = settings
    if s.backend == "detectron2":
        d2.ensure_installed()
        return _evaluate_detectron2(s, encoder, data)
    train: VocDetection = build_dataset(s.dataset, s.train_split, data.root, data.scale, "eval.voc.dataset")
    test: VocDetection = build_dataset(s.dataset, s.test_split, data.root, data.scale, "eval.voc.dataset")
    return finetune_and_test(encoder, s, data, train, test)


def finetune_and_test(
    encoder: nn.Module, s: VocSettings, data: EvalData, train: VocDetection, test: VocDetection
) -> dict[str, float]:
    """Build the C4 detector, fine-tune it on ``train``, score it on ``test``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        model = build_detector(encoder, train.num_classes, s)
        model = train_detector(model, train, s, data)
        dets = predict(model, test, s, data, _detections)
    data.log(f"[voc] {len(dets)} detections on {len(test)} {s.test_split} images")
    return voc_metrics(test.records, dets, test.classes, s.use_07_metric)


_RUNS = itertools.count()  # a fresh detectron2 dataset name per evaluation in this process


def _evaluate_detectron2(s: VocSettings, encoder: nn.Module, data: EvalData) -> dict[str, float]:
    """detectron2 ``faster_rcnn_R_50_C4`` with MoCo's ``Res5ROIHeadsExtraNorm`` and overrides
    (``detectron2_backend``); detectron2's ``PascalVOCDetectionEvaluator`` (the devkit AP; 11-point
    for VOC2007) on the test split, reported as AP / AP50 / AP75 as the torchvision path."""
    from detectron2.data.datasets import register_pascal_voc
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    test: VocDetection = build_dataset(s.dataset, s.test_split, data.root, data.scale, "eval.voc.dataset")
    devkit = dataset_folder(s.dataset, data.root, data.scale, "eval.voc.dataset") / "VOCdevkit"
    tag, names = next(_RUNS), {}
    for split in (s.train_split, s.test_split):
        for year, image_set in VOC_SPLITS[split]:
            name = f"cropbench_voc{year}_{image_set}_{tag}"
            register_pascal_voc(name, str(devkit / f"VOC{year}"), image_set, int(year), list(test.classes))
            names.setdefault(split, []).append(name)
    if len(names[s.test_split]) != 1:
        raise CropbenchError(f"eval.voc.test_split: {s.test_split!r} spans several years; test one VOC year")
    cfg = d2.build_cfg(encoder, s, test.num_classes, data.device, data.dist.enabled)
    evaluator = lambda out: PascalVOCDetectionEvaluator(names[s.test_split][0])
    res = d2.train_and_test(encoder, s, cfg, names[s.train_split], names[s.test_split][0], data, evaluator)
    return {k: float(res["bbox"][k]) for k in ("AP", "AP50", "AP75")}
