"""Embedded detection / segmentation data: the texture scenes of ``synth.py`` in real layouts.

The same generator (``render_scene``) is written three ways, so the real loaders are what runs:

* COCO: ``train2017/*.png``, ``val2017/*.png``, ``annotations/instances_{train,val}2017.json``
  (RLE segmentation of the *visible* part, tight ``bbox`` of it, ``area`` = its pixel count).
* VOC: ``VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}`` and
  ``VOCdevkit/VOC2012/...`` trainval; the texture class names are the VOC class names.
* Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with ``gtFine`` ``labelIds`` and
  ``instanceIds``; each image is two scenes side by side (Cityscapes' 2:1 aspect), texture classes
  on ten Cityscapes train classes, background = ``road``, a bottom band = ``ego vehicle`` (ignored).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from cropbench.data.synth import CLASSES, GENERATOR_VERSION, Scene, render_scene, scene_rng

# texture class -> Cityscapes labelId (person, rider, car, truck, bus, train, motorcycle, bicycle,
# pole, traffic sign: all train classes); the scene background is road (7), the bottom band
# is ego vehicle (1, ignored)
CITYSCAPES_LABEL_IDS = (24, 25, 26, 27, 28, 31, 32, 33, 17, 20)
CITYSCAPES_BACKGROUND_ID = 7
CITYSCAPES_EGO_ID = 1
_CITYSCAPES_INSTANCE_IDS = {24, 25, 26, 27, 28, 29, 30, 31, 32, 33}  # classes with hasInstances
LAYOUT_VERSION = 1  # bump when these writers change; part of the data folder name (with the scenes')
DENSE_VERSION = f"{GENERATOR_VERSION}.{LAYOUT_VERSION}"


@dataclass(frozen=True)
class SynthDenseConfig:
    image_size: int = 128  # scene side; objects span ~15-100 px, so COCO small/medium/large all occur
    train_images: int = 400  # enough for a few hundred fine-tuning iterations without overfitting
    val_images: int = 100  # every class appears ~10 times as a main object
    distractors: tuple[int, int] = (1, 3)  # inclusive range of small objects per scene
    main_area: tuple[float, float] = (0.25, 0.65)  # fraction of the canvas, before occlusion
    distractor_area: tuple[float, float] = (0.03, 0.08)
    seed: int = 0


def dense_scene(cfg: SynthDenseConfig, seed_offset: int, split: str, index: int) -> Scene:
    """Scene ``index`` of a split; main class cycles through the classes, distractors are random."""
    rng = scene_rng(cfg.seed + seed_offset, split, index)
    n = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
    return render_scene(rng, cfg.image_size, index % len(CLASSES), n, cfg.main_area, cfg.distractor_area)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive pixel bounds ``(x0, y0, x1, y1)`` of a non-empty H×W bool mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ---------------------------------------------------------------- COCO


def _coco_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    anns = []
    for k, inst in enumerate(scene.instances):
        x0, y0, x1, y1 = mask_box(inst.mask)
        rle = mask_util.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
        anns.append(
            {
                "id": first_ann_id + k,
                "image_id": image_id,
                "category_id": inst.category + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                "area": float(inst.mask.sum()),
                "iscrowd": 0,
                "segmentation": {
                    "size": list(rle["size"]),
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return anns


def write_coco(folder: Path, cfg: SynthDenseConfig = SynthDenseConfig()) -> None:
    """COCO 2017 layout; category ids 1..10 are the texture classes."""
    categories = [{"id": c + 1, "name": n, "supercategory": "texture"} for c, n in enumerate(CLASSES)]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", cfg.train_images), ("val", cfg.val_images)):
        (folder / f"{split}2017").mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(count):
            scene, image_id = dense_scene(cfg, 100, split, i), i + 1
            name = f"{image_id:012d}.png"
            Image.fromarray(scene.image).save(folder / f"{split}2017" / name)
            h, w = scene.image.shape[:2]
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
            anns += _coco_annotations(scene, image_id, len(anns) + 1)
        data = {
            "info": {"description": "cropbench synthetic texture scenes"},
            "licenses": [],
            "images": images,
            "annotations": anns,
            "categories": categories,
        }
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


# ---------------------------------------------------------------- VOC

VOC_DIFFICULT_PIXELS = 64  # a visible part smaller than this is marked difficult (VOC: hard to recognise)


def _voc_xml(scene: Scene, year: str, name: str) -> str:
    h, w = scene.image.shape[:2]
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for inst in scene.instances:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[inst.category]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(inst.mask.sum() < VOC_DIFFICULT_PIXELS))
        box = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), mask_box(inst.mask), strict=True):
            ET.SubElement(box, tag).text = str(v + 1)  # VOC pixel indices are 1-based, inclusive
    return ET.tostring(root, encoding="unicode")


def _write_voc_year(devkit: Path, year: str, seed_offset: int, splits: dict[str, int], cfg: SynthDenseConfig) -> None:
    base = devkit / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, count in splits.items():
        names = []
        for i in range(count):
            scene = dense_scene(cfg, seed_offset, "val" if split == "test" else "train", i)
            # test ids apart from trainval ids, as in VOC2007
            first = 500000 if split == "test" else 1
            name = f"{i + first:06d}" if year == "2007" else f"2012_{i + first:06d}"
            Image.fromarray(scene.image).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            (base / "Annotations" / f"{name}.xml").write_text(_voc_xml(scene, year, name))
            names.append(name)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")


def write_voc(folder: Path, cfg: SynthDenseConfig = SynthDenseConfig()) -> None:
    """VOC07+12 layout: VOC2007 trainval/test and VOC2012 trainval, half the train images each."""
    half = cfg.train_images // 2
    _write_voc_year(folder / "VOCdevkit", "2007", 200, {"trainval": half, "test": cfg.val_images}, cfg)
    _write_voc_year(folder / "VOCdevkit", "2012", 201, {"trainval": cfg.train_images - half}, cfg)


# ---------------------------------------------------------------- Cityscapes

_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


def cityscapes_maps(scenes: list[Scene], ego_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scenes side by side -> (image H×W×3 uint8, labelIds H×W uint8, instanceIds H×W uint16)."""
    image = np.concatenate([s.image for s in scenes], axis=1)
    label_ids, instance_ids = [], []
    for s in scenes:
        lab = np.full(s.image.shape[:2], CITYSCAPES_BACKGROUND_ID, np.int64)
        inst = lab.copy()
        for k, obj in enumerate(s.instances):
            lid = CITYSCAPES_LABEL_IDS[obj.category]
            lab[obj.mask] = lid
            inst[obj.mask] = lid * 1000 + k if lid in _CITYSCAPES_INSTANCE_IDS else lid
        label_ids.append(lab)
        instance_ids.append(inst)
    lab, inst = np.concatenate(label_ids, axis=1), np.concatenate(instance_ids, axis=1)
    if ego_rows > 0:
        lab[-ego_rows:], inst[-ego_rows:] = CITYSCAPES_EGO_ID, CITYSCAPES_EGO_ID
    return image, lab.astype(np.uint8), inst.astype(np.uint16)


def write_cityscapes(folder: Path, cfg: SynthDenseConfig = SynthDenseConfig()) -> None:
    """Cityscapes layout (as ``torchvision.datasets.Cityscapes`` reads it), gtFine only."""
    # the ego-vehicle band at the bottom, ignored in training and evaluation
    ego_rows = cfg.image_size // 16
    for split, count in (("train", cfg.train_images // 2), ("val", cfg.val_images // 2)):
        cities = _CITIES[split]
        for i in range(count):
            city = cities[i % len(cities)]
            scenes = [dense_scene(cfg, 300, split, 2 * i), dense_scene(cfg, 300, split, 2 * i + 1)]
            image, lab, inst = cityscapes_maps(scenes, ego_rows)
            stem = f"{city}_{i:06d}_000019"
            img_dir, gt_dir = (
                folder / "leftImg8bit" / split / city,
                folder / "gtFine" / split / city,
            )
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(lab).save(gt_dir / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(inst).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
