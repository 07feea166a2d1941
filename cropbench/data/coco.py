"""COCO instances (detection + instance masks) read with pycocotools from the official layout.

Training follows the official tools: crowd annotations are not training targets and images with
no usable non-crowd annotation are dropped (detectron2 ``filter_empty_annotations``, torchvision's
``_coco_remove_images_without_annotations``); evaluation keeps every image and leaves crowd
regions to ``COCOeval``, which ignores detections matched to them.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.synth_dense import DENSE_VERSION, SynthDenseConfig, write_coco
from cropbench.errors import DatasetError

COCO_LAYOUT = """<root>/train2017/<file_name>            images listed in the train annotations
<root>/val2017/<file_name>
<root>/annotations/instances_train2017.json  COCO instances format (images, annotations, categories)
<root>/annotations/instances_val2017.json"""


def load_coco(ann_file: Path) -> COCO:
    """pycocotools ``COCO`` of an annotation file, with errors that name the file."""
    if not ann_file.is_file():
        raise DatasetError(f"annotation file {ann_file} not found\nexpected layout:\n{COCO_LAYOUT}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(ann_file))
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"{ann_file}: not a COCO instances file ({type(e).__name__}: {e})") from e
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise DatasetError(f"{ann_file}: missing top-level key {key!r} of the COCO instances format")
    return coco


class CocoAnnotationWarning(UserWarning):
    """Annotations that cannot be training targets (named by id): the rest of the file is usable."""


def _ids(ids: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def check_annotations(coco: COCO, ann_file: Path) -> None:
    """Report what the loaders would otherwise drop without a word.

    * an annotation whose ``image_id`` is not in ``images``: warned (count and annotation ids); an
      error when no annotation names an existing image (the file is unusable);
    * a ``bbox`` without 4 numbers: an error; a non-crowd box with width or height <= 0: warned
      (count and ids); it is never a target (detectron2 and torchvision drop degenerate boxes too).
    """
    anns = coco.dataset["annotations"]
    bad_shape = [a.get("id") for a in anns if not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4)]
    if bad_shape:
        raise DatasetError(
            f"{ann_file}: {len(bad_shape)} annotation(s) without a 4-number 'bbox' [x, y, w, h]: ids {_ids(bad_shape)}"
        )
    orphans = [a.get("id") for a in anns if a.get("image_id") not in coco.imgs]
    if orphans and len(orphans) == len(anns):
        raise DatasetError(f"{ann_file}: none of its {len(anns)} annotations names an image id listed in 'images'")
    if orphans:
        warnings.warn(
            f"{ann_file}: {len(orphans)} annotation(s) name an image id not in 'images' and are ignored: "
            f"annotation ids {_ids(orphans)}",
            CocoAnnotationWarning,
            stacklevel=3,
        )
    degenerate = [a.get("id") for a in anns if a.get("iscrowd", 0) == 0 and min(a["bbox"][2], a["bbox"][3]) <= 0]
    if degenerate:
        warnings.warn(
            f"{ann_file}: {len(degenerate)} box(es) with width or height <= 0 are dropped: annotation ids "
            f"{_ids(degenerate)}",
            CocoAnnotationWarning,
            stacklevel=3,
        )


def _usable(ann: dict) -> bool:
    return ann.get("iscrowd", 0) == 0 and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


class CocoInstances(Dataset):
    """One COCO split. Yields ``(image 3×H×W uint8, target)`` with target keys ``image_id``,
    ``boxes`` (N×4 float xyxy pixels), ``labels`` (N int64 in 1..K, 0 is background) and, with
    ``masks=True``, ``masks`` (N×H×W uint8). Crowd annotations are never targets."""

    def __init__(self, folder: Path, split: str, masks: bool = True, drop_empty: bool | None = None):
        folder = Path(folder)
        self.ann_file = folder / "annotations" / f"instances_{split}2017.json"
        self.image_dir = folder / f"{split}2017"
        self.coco = load_coco(self.ann_file)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} not found\nexpected layout:\n{COCO_LAYOUT}")
        check_annotations(self.coco, self.ann_file)
        # contiguous label k (1..K) <-> category id cat_ids[k - 1]
        self.cat_ids = sorted(self.coco.getCatIds())
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._label = {c: k + 1 for k, c in enumerate(self.cat_ids)}
        self.masks = masks
        ids = sorted(self.coco.imgs)
        if drop_empty if drop_empty is not None else split == "train":
            ids = [i for i in ids if any(_usable(a) for a in self.coco.imgToAnns[i])]
            if not ids:
                raise DatasetError(f"{self.ann_file}: no image has a usable (non-crowd, positive-size) annotation")
        self.ids = ids

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def category_id(self, label: int) -> int:
        """Contiguous label (1..K) -> COCO category id."""
        return self.cat_ids[label - 1]

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Tensor:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DatasetError(f"{path}: image id {image_id} is listed in {self.ann_file} but the file is missing")
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from e
        if arr.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (width x height)"
            )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def target(self, image_id: int) -> dict[str, Tensor]:
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns[image_id] if _usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64)
        out = {"image_id": torch.tensor(image_id), "boxes": boxes[keep], "labels": labels[keep]}
        if self.masks:
            m = [self._mask(a) for a in anns]
            masks = torch.from_numpy(np.stack(m)) if m else torch.zeros((0, h, w), dtype=torch.uint8)
            out["masks"] = masks[keep]
        return out

    def _mask(self, ann: dict) -> np.ndarray:
        if "segmentation" not in ann:
            raise DatasetError(f"{self.ann_file}: annotation {ann.get('id')} has no 'segmentation' (needed for masks)")
        return self.coco.annToMask(ann)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.ids[i]
        return self.load_image(image_id), self.target(image_id)


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection models take lists: images of different sizes are not stacked."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _build(folder: Path, split: str, masks: bool = True) -> CocoInstances:
    return CocoInstances(folder, split, masks)


register_dataset(
    DatasetSpec(
        "synth_coco",
        "detection",
        "synth_coco",
        COCO_LAYOUT,
        _build,
        synthesize=lambda folder: write_coco(folder, SynthDenseConfig()),
        version=DENSE_VERSION,
        description="embedded texture scenes in COCO layout, 10 categories, 128 px (400 train / 100 val)",
    )
)
register_dataset(
    DatasetSpec(
        "coco",
        "detection",
        "coco",
        COCO_LAYOUT,
        _build,
        description="COCO 2017 instances (train2017 / val2017) in the official layout",
    )
)
