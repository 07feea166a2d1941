"""COCO instance detection / segmentation transfer: Mask R-CNN R50-FPN 1x, scored by pycocotools.

Protocol (MoCo / DenseCL / RegionCL, detectron2 ``coco_R_50_FPN_1x`` as in mmselfsup's benchmark
configs): fine-tune all layers with SyncBN in backbone and FPN, 90k iterations at batch 16, lr
0.02, ×0.1 at 60k / 80k, 1000 warmup iterations, multi-scale 640-800 train, 800 / 1333 test;
``COCOeval`` bbox and segm on val2017. Reported in percent as the papers do.

Backends (``backend``): ``torchvision`` (this module and ``detection.py``) or ``detectron2``
(``detectron2_backend.py``: the papers' own framework, installed from the vendored source); ``auto``
picks detectron2 on real datasets when it is installed, torchvision otherwise and at micro.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from cropbench.data import build_dataset, dataset_folder
from cropbench.data.coco import CocoInstances, load_coco
from cropbench.errors import CropbenchError
from cropbench.evaluations import detectron2_backend as d2
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.detection import (
    DetectionSettings,
    build_detector,
    predict,
    train_detector,
)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
_RUNS = itertools.count()  # a fresh detectron2 dataset name per evaluation in this process
METRICS = tuple(f"{t}_{m}" for t in ("bbox", "segm") for m in STAT_NAMES)

# Paper scale: detectron2 Base-RCNN-FPN + coco_R_50_FPN_1x (mmselfsup configs/benchmarks/detectron2).
# Preset "paper": entries say ``eval: {coco: {preset: paper}}``. DETECTIONS_PER_IMAGE 100 is the
# Settings default (no key here, so resolved recipes keep their identity).
PAPER: dict[str, Any] = {
    "dataset": "coco",
    "iterations": 90000,
    "batch_size": 16,
    "lr": 0.02,
    "steps": [60000, 80000],
    "warmup_iters": 1000,
    "train_min_sizes": [640, 672, 704, 736, 768, 800],
    "test_min_size": 800,
    "max_size": 1333,
    "returned_layers": [1, 2, 3, 4],
    "anchor_sizes": [32, 64, 128, 256, 512],
    "fpn_channels": 256,
    "box_head_dim": 1024,
    "mask_head_channels": 256,
    "rpn_batch_per_image": 256,
    "roi_batch_per_image": 512,
    "rpn_pre_nms_train": 2000,
    "rpn_post_nms_train": 1000,
    "rpn_pre_nms_test": 1000,
    "precise_bn_iters": 200,  # TEST.PRECISE_BN: ENABLED True, NUM_ITER 200 (detectron2 default)
    "rpn_post_nms_test": 1000,
    "log_every": 20,
}


@dataclass(frozen=True)
class CocoSettings(DetectionSettings):
    """Micro defaults: embedded 128-px scenes, resnet_micro (output stride 8, so the FPN takes C4,
    C5 and adds P6), 300 iterations at batch 4: about 3 CPU-minutes (170-185 s measured on one
    thread). ``PAPER`` holds the R50-FPN 1x values."""

    dataset: str = "synth_coco"
    train_split: str = "train"
    test_split: str = "val"
    arch: Literal["fpn", "c4"] = "fpn"
    masks: bool = True
    # detectron2 (the papers' framework) or torchvision (the same detector in torchvision); ``auto``
    # resolves on validation: detectron2 on real data when installed, torchvision otherwise / at micro
    backend: Literal["auto", "torchvision", "detectron2"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", d2.resolve_backend(self.backend, self.dataset, "eval.coco.backend"))


def _rle(mask: Tensor) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(dataset: CocoInstances, index: int, out: dict[str, Tensor]) -> list[dict]:
    """One image's detections -> COCO result records: xyxy -> xywh, contiguous label -> category id,
    mask probabilities ``> 0.5`` -> RLE (as torchvision's reference ``CocoEvaluator``)."""
    image_id = dataset.ids[index]
    boxes = out["boxes"].clone()
    boxes[:, 2:] -= boxes[:, :2]
    records = []
    for k in range(boxes.shape[0]):
        rec = {
            "image_id": image_id,
            "category_id": dataset.category_id(int(out["labels"][k])),
            "bbox": [round(float(v), 3) for v in boxes[k]],
            "score": float(out["scores"][k]),
        }
        if "masks" in out:
            rec["segmentation"] = _rle(out["masks"][k, 0] > 0.5)
        records.append(rec)
    return records


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections (pycocotools' ``loadRes([])`` cannot build one)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "annotations": [],
        "categories": list(coco_gt.dataset["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_types: tuple[str, ...]) -> dict[str, float]:
    """pycocotools ``COCOeval`` per IoU type -> ``{type}_{AP,AP50,AP75,APs,APm,APl}`` in percent.

    Handling of edge cases: no detections at all score 0 (zero recall; detectron2 reports NaN
    and warns); an area range with no ground truth gives NaN, as detectron2 (COCOeval's -1)."""
    if not coco_gt.getImgIds():
        raise CropbenchError("COCO evaluation: the ground truth has no images")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    metrics = {}
    for iou_type in iou_types:
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, v in zip(STAT_NAMES, ev.stats[:6], strict=True):
            metrics[f"{iou_type}_{name}"] = float(v * 100) if v >= 0 else float("nan")
    return metrics


@register_evaluation("coco", CocoSettings, metrics=METRICS, presets={"paper": PAPER, "micro": {}})
def evaluate(encoder: nn.Module, settings: CocoSettings, data: EvalData) -> dict[str, float]:
    """Mask R-CNN FPN fine-tune on COCO train, COCOeval bbox + segm AP on val (percent)."""
    s = settings
    if s.backend == "detectron2":
        d2.ensure_installed()
        return _evaluate_detectron2(encoder, s, data)
    train = build_dataset(s.dataset, s.train_split, data.root, data.scale, "eval.coco.dataset", masks=s.masks)
    test = build_dataset(s.dataset, s.test_split, data.root, data.scale, "eval.coco.dataset", masks=False)
    return finetune_and_test(encoder, s, data, train, test)


def finetune_and_test(
    encoder: nn.Module, s: CocoSettings, data: EvalData, train: CocoInstances, test: CocoInstances
) -> dict[str, float]:
    """The torchvision path on given splits: build, fine-tune, predict, ``COCOeval``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        model = build_detector(encoder, train.num_classes, s)
        model = train_detector(model, train, s, data)
        results = predict(model, test, s, data, lambda i, out: to_coco_results(test, i, out))
    data.log(f"[coco] {len(results)} detections on {len(test)} {s.test_split} images")
    iou_types = ("bbox", "segm") if s.masks else ("bbox",)
    return coco_evaluate(test.coco, results, iou_types)


def _evaluate_detectron2(encoder: nn.Module, s: CocoSettings, data: EvalData) -> dict[str, float]:
    """detectron2 ``mask_rcnn_R_50_FPN_1x`` with the MoCo overrides (``detectron2_backend``) on our
    exported backbone; detectron2's ``COCOEvaluator`` on the test split."""
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator

    folder = dataset_folder(s.dataset, data.root, data.scale, "eval.coco.dataset")
    tag = next(_RUNS)
    names = {}
    for split in (s.train_split, s.test_split):
        names[split] = f"cropbench_coco_{split}_{tag}"
        ann = folder / "annotations" / f"instances_{split}2017.json"
        register_coco_instances(names[split], {}, str(ann), str(folder / f"{split}2017"))
    gt = load_coco(folder / "annotations" / f"instances_{s.train_split}2017.json")
    cfg = d2.build_cfg(encoder, s, len(gt.getCatIds()), data.device, data.dist.enabled)
    if any(isinstance(a.get("segmentation"), dict) for a in gt.dataset["annotations"]):
        cfg.INPUT.MASK_FORMAT = "bitmask"  # RLE masks (polygons are detectron2's default)
    tasks = ("bbox", "segm") if s.masks else ("bbox",)
    evaluator = lambda out: COCOEvaluator(names[s.test_split], tasks=tasks, output_dir=str(out))
    res = d2.train_and_test(encoder, s, cfg, [names[s.train_split]], names[s.test_split], data, evaluator)
    return {f"{t}_{m}": float(res[t][m]) for t in tasks for m in STAT_NAMES}
