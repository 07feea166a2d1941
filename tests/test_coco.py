"""COCO: embedded layout, loader, evaluation path vs pycocotools, detector plumbing, e2e."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cropbench.backbones import resnet18, resnet50, resnet_micro
from cropbench.config import from_dict
from cropbench.data.cityscapes import CityscapesSemantic
from cropbench.data.coco import CocoInstances
from cropbench.data.synth_dense import SynthDenseConfig, write_cityscapes, write_coco
from cropbench.dist import DistContext, init_process_group, shutdown
from cropbench.errors import ConfigError, DatasetError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.cityscapes import CityscapesSettings
from cropbench.evaluations.cityscapes import finetune_and_test as finetune_cityscapes
from cropbench.evaluations.coco import (
    METRICS,
    PAPER,
    CocoSettings,
    coco_evaluate,
    evaluate,
    finetune_and_test,
    to_coco_results,
)
from cropbench.evaluations.detection import (
    DetectionSettings,
    build_detector,
    hflip,
    lr_factor,
    predict,
)

TINY = SynthDenseConfig(image_size=64, train_images=6, val_images=10)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_coco(root / "coco", TINY)
    return root


def _gt_outputs(ds: CocoInstances, i: int) -> dict[str, torch.Tensor]:
    """Ground truth of image ``i`` shaped like a torchvision Mask R-CNN output."""
    t = ds.target(ds.ids[i])
    n = len(t["labels"])
    return {
        "boxes": t["boxes"],
        "labels": t["labels"],
        "scores": torch.linspace(1.0, 0.5, n),
        "masks": t["masks"][:, None].float(),
    }


def _pycocotools_stats(gt: COCO, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [v * 100 if v >= 0 else math.nan for v in ev.stats[:6]]


def test_synthetic_layout_is_valid_coco(coco_root):
    gt = COCO(str(coco_root / "coco" / "annotations" / "instances_train2017.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())][:2] == ["vstripes", "hstripes"]
    for ann in gt.dataset["annotations"]:
        rle = gt.annToRLE(ann)
        # pycocotools' own box of the mask
        np.testing.assert_allclose(mask_util.toBbox(rle), ann["bbox"])
        assert mask_util.area(rle) == ann["area"] and ann["iscrowd"] == 0
    for img in gt.dataset["images"]:
        with Image.open(coco_root / "coco" / "train2017" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])


def test_loader_targets_match_annotations(coco_root):
    ds = CocoInstances(coco_root / "coco", "val")
    image, t = ds[0]
    anns = ds.coco.imgToAnns[ds.ids[0]]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    x, y, w, h = anns[0]["bbox"]
    assert t["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert torch.equal(t["masks"][0], torch.from_numpy(ds.coco.annToMask(anns[0])))
    assert [ds.category_id(int(lab)) for lab in t["labels"]] == [a["category_id"] for a in anns]


def test_ground_truth_as_predictions_scores_100_and_matches_pycocotools(coco_root):
    ds = CocoInstances(coco_root / "coco", "val")
    results = [r for i in range(len(ds)) for r in to_coco_results(ds, i, _gt_outputs(ds, i))]
    m = coco_evaluate(ds.coco, results, ("bbox", "segm"))
    assert m["bbox_AP"] == pytest.approx(100) and m["segm_AP"] == pytest.approx(100)
    assert m["bbox_AP50"] == pytest.approx(100) and m["segm_AP75"] == pytest.approx(100)
    shuffled = [
        dict(
            r,
            bbox=results[(k + 1) % len(results)]["bbox"],
            segmentation=results[(k + 1) % len(results)]["segmentation"],
        )
        for k, r in enumerate(results)
    ]
    bad = coco_evaluate(ds.coco, shuffled, ("bbox", "segm"))
    assert bad["bbox_AP"] < 30 and bad["segm_AP"] < 30
    for iou_type in ("bbox", "segm"):
        ref = _pycocotools_stats(ds.coco, shuffled, iou_type)
        got = [bad[f"{iou_type}_{k}"] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        np.testing.assert_allclose(got, ref, equal_nan=True)


def test_empty_predictions_score_zero(coco_root):
    ds = CocoInstances(coco_root / "coco", "val")
    m = coco_evaluate(ds.coco, [], ("bbox", "segm"))
    assert m["bbox_AP"] == 0.0 and m["segm_AP50"] == 0.0


def _write_handmade(root, images, anns, categories):
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for img in images:
        Image.new("RGB", (img["width"], img["height"])).save(root / "val2017" / img["file_name"])
    data = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))


def test_crowd_only_image_and_noncontiguous_categories(tmp_path):
    images = [
        {"id": 5, "file_name": "a.png", "height": 40, "width": 40},
        {"id": 9, "file_name": "b.png", "height": 40, "width": 40},
    ]
    crowd = np.zeros((40, 40), np.uint8)
    crowd[20:40, 0:30] = 1
    crowd_rle = mask_util.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    anns = [
        {
            "id": 1,
            "image_id": 5,
            "category_id": 7,
            "bbox": [2, 3, 10, 12],
            "area": 120,
            "iscrowd": 0,
            "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]],
        },
        {
            "id": 2,
            "image_id": 9,
            "category_id": 3,
            "bbox": [0, 20, 30, 20],
            "area": 600,
            "iscrowd": 1,
            "segmentation": crowd_rle,
        },
    ]
    _write_handmade(tmp_path, images, anns, [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}])
    assert CocoInstances(tmp_path, "val", drop_empty=True).ids == [5]  # training drops crowd-only images
    ds = CocoInstances(tmp_path, "val")
    assert ds.ids == [5, 9] and len(ds.target(9)["boxes"]) == 0  # crowd is never a target
    assert ds.target(5)["labels"].tolist() == [2] and ds.category_id(2) == 7
    hit = {"image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 12], "score": 0.9}
    on_crowd = {"image_id": 9, "category_id": 3, "bbox": [0, 20, 30, 20], "score": 0.95}
    assert coco_evaluate(ds.coco, [hit, on_crowd], ("bbox",))["bbox_AP"] == pytest.approx(100)
    stray = {"image_id": 9, "category_id": 7, "bbox": [25, 0, 10, 10], "score": 0.95}
    got = coco_evaluate(ds.coco, [hit, stray], ("bbox",))
    assert got["bbox_AP"] < 100
    np.testing.assert_allclose(got["bbox_AP"], _pycocotools_stats(ds.coco, [hit, stray], "bbox")[0])


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match="instances_val2017.json not found"):
        CocoInstances(tmp_path, "val")
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}]
    _write_handmade(tmp_path, images, [], [{"id": 1, "name": "x"}])
    (tmp_path / "val2017" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png: image id 1 is listed in .*instances_val2017\.json"):
        CocoInstances(tmp_path, "val")[0]
    Image.new("RGB", (30, 40)).save(tmp_path / "val2017" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: image is 30x40 but"):
        CocoInstances(tmp_path, "val")[0]
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="missing top-level key 'annotations'"):
        CocoInstances(tmp_path, "val")


def test_lr_schedule_and_flip_by_hand():
    s = DetectionSettings(lr=0.02, warmup_iters=10, warmup_factor=0.001, steps=(20, 30))
    assert lr_factor(0, s) == pytest.approx(0.001)
    assert lr_factor(5, s) == pytest.approx(0.001 * 0.5 + 0.5)
    assert (lr_factor(19, s), lr_factor(20, s), lr_factor(35, s)) == pytest.approx((1.0, 0.1, 0.01))
    image = torch.arange(30).reshape(1, 3, 10).expand(3, 3, 10)
    mask = torch.zeros(1, 3, 10, dtype=torch.uint8)
    mask[0, :, 1:4] = 1
    img, t = hflip(image, {"boxes": torch.tensor([[1.0, 0.0, 4.0, 3.0]]), "masks": mask})
    assert t["boxes"].tolist() == [[6.0, 0.0, 9.0, 3.0]]  # x -> 10 - x, ends swapped
    assert t["masks"][0, 0].nonzero().flatten().tolist() == [6, 7, 8]
    assert torch.equal(img[..., 0], image[..., 9])


def test_detector_shapes():
    s = DetectionSettings(
        returned_layers=(1, 2, 3, 4),
        anchor_sizes=(8, 16, 32, 64, 128),
        train_min_sizes=(64,),
        max_size=64,
        roi_batch_per_image=16,
        rpn_batch_per_image=16,
    )
    model = build_detector(resnet18(), 3, s)
    assert model.backbone.body.layer1 is not None and model.roi_heads.box_predictor.cls_score.out_features == 4
    target = {
        "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
        "labels": torch.tensor([2]),
        "masks": torch.zeros(1, 64, 64, dtype=torch.uint8),
    }
    losses = model([torch.rand(3, 64, 64)], [target])
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    c4 = build_detector(resnet_micro(), 3, replace(s, arch="c4", masks=False, anchor_sizes=(16, 32)))
    # MoCo's extra norm after res5
    assert isinstance(c4.roi_heads.box_head[1], torch.nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="anchor_sizes"):
        build_detector(resnet_micro(), 3, DetectionSettings(anchor_sizes=(16, 32)))


def test_evaluate_end_to_end_on_real_layout(coco_root):
    s = CocoSettings(
        dataset="coco",
        backend="torchvision",  # real data: auto would pick detectron2 where it is installed
        iterations=3,
        batch_size=2,
        train_min_sizes=(64,),
        test_min_size=64,
        max_size=64,
        detections_per_image=10,
        log_every=1,
    )
    logs: list[str] = []
    m = evaluate(resnet_micro(), s, EvalData(root=coco_root, log=logs.append))
    assert set(m) == set(METRICS)
    assert all(isinstance(v, float) and (math.isnan(v) or 0 <= v <= 100) for v in m.values())
    assert any("iter 3/3" in line for line in logs)
    # the issue-10 run: batch below the recipe's must not keep the batch-16 lr; the log says so
    assert "[det] lr 0.01 at batch 2 (linear scaling: lr 0.08 at batch 16 x 2/16)" in logs


def test_paper_settings_build_the_r50_fpn_1x_detector():
    s = from_dict(CocoSettings, PAPER, "coco PAPER")
    assert (s.iterations, s.batch_size, s.lr, s.steps) == (90000, 16, 0.02, (60000, 80000))
    model = build_detector(resnet50(), 80, s)
    assert model.backbone.fpn.inner_blocks[0][0].in_channels == 256  # C2 of ResNet-50
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert (model.transform.min_size, model.transform.max_size) == ((640, 672, 704, 736, 768, 800), 1333)
    assert model.roi_heads.detections_per_img == 100


def _ddp_worker(rank: int, world: int, store: str, root: str, out: str) -> None:
    torch.set_num_threads(1)
    init_process_group("gloo", rank, world, store)  # a file store: no port to race for
    data = EvalData(root=root, dist=DistContext(rank, world), log=lambda _: None)
    torch.manual_seed(0)
    s = CocoSettings(iterations=2, batch_size=2, train_min_sizes=(64,), test_min_size=64, max_size=64)
    train, test = CocoInstances(f"{root}/coco", "train"), CocoInstances(f"{root}/coco", "val", masks=False)
    det = finetune_and_test(resnet_micro(), s, data, train, test)
    seen = predict(build_detector(resnet_micro(), 10, s), test, s, data, lambda i, _: [i])
    seg_s = CityscapesSettings(iterations=2, batch_size=2, crop_size=(32, 32), test_stride=(16, 16))
    cs_train, cs_val = CityscapesSemantic(f"{root}/cs", "train"), CityscapesSemantic(f"{root}/cs", "val")
    seg = finetune_cityscapes(resnet_micro(), seg_s, data, cs_train, cs_val)
    torch.save((det, seen, seg), f"{out}/{rank}.pt")
    shutdown(DistContext(rank, world))  # barrier first: a rank leaving early aborts its peer (test_dist_losses)


def test_two_process_finetunes_agree_across_ranks(coco_root, tmp_path):
    """gloo DDP (per-process BN on CPU), detection and segmentation: each rank predicts half of the
    test images; gathered detections / summed confusion matrices give both ranks the same numbers."""
    write_cityscapes(coco_root / "cs", SynthDenseConfig(image_size=32, train_images=8, val_images=4))
    store = str(tmp_path / "store")
    mp.spawn(_ddp_worker, args=(2, store, str(coco_root), str(tmp_path)), nprocs=2, join=True)
    (det0, seen0, seg0), (det1, seen1, seg1) = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    np.testing.assert_array_equal(list(det0.values()), list(det1.values()))
    assert sorted(seen0) == sorted(seen1) == list(range(TINY.val_images))
    assert seg0 == seg1 and 0 <= seg0["mIoU"] <= 100
