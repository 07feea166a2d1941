"""PASCAL VOC detection (VOC07+12 trainval, VOC07 test) read from the official ``VOCdevkit`` layout.

Boxes follow detectron2's ``load_voc_instances``: VOC's 1-based inclusive pixel indices become
``(xmin - 1, ymin - 1, xmax, ymax)`` in continuous coordinates, and "difficult" objects are kept
as training targets (the evaluator ignores them, as the official devkit does).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.synth import CLASSES as TEXTURE_CLASSES
from cropbench.data.synth_dense import DENSE_VERSION, SynthDenseConfig, write_voc
from cropbench.errors import DatasetError

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
VOC_LAYOUT = """<root>/VOCdevkit/VOC2007/Annotations/<id>.xml
<root>/VOCdevkit/VOC2007/JPEGImages/<id>.jpg
<root>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt   one image id per line
<root>/VOCdevkit/VOC2012/{Annotations,JPEGImages,ImageSets/Main/trainval.txt}"""
# split name -> (year, image set) parts, as detectron2's voc_20xx_* sets
VOC_SPLITS = {
    "trainval": (("2007", "trainval"), ("2012", "trainval")),
    "test": (("2007", "test"),),
    "2007_trainval": (("2007", "trainval"),),
    "2012_trainval": (("2012", "trainval"),),
}


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax: VOC's 1-based inclusive pixel indices
    difficult: bool


@dataclass(frozen=True)
class VocRecord:
    image: Path
    year: str
    image_id: str
    objects: tuple[VocObject, ...]


def parse_voc_xml(path: Path, classes: tuple[str, ...]) -> tuple[VocObject, ...]:
    """Objects of one VOC annotation file; unknown class names and missing fields name the file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise DatasetError(f"cannot read VOC annotation {path}: {e}") from e
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise DatasetError(f"{path}: object class {name!r} is not one of {', '.join(classes)}")
        box = obj.find("bndbox")
        try:
            coords = tuple(float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: object {name!r} needs a bndbox with xmin, ymin, xmax, ymax") from e
        objects.append(VocObject(name, coords, (obj.findtext("difficult") or "0").strip() == "1"))
    return tuple(objects)


def read_voc_split(devkit: Path, split: str, classes: tuple[str, ...]) -> list[VocRecord]:
    if split not in VOC_SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}; valid: {', '.join(VOC_SPLITS)}")
    records = []
    for year, image_set in VOC_SPLITS[split]:
        base = devkit / f"VOC{year}"
        listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.is_file():
            raise DatasetError(f"VOC image set {listing} not found\nexpected layout:\n{VOC_LAYOUT}")
        for image_id in listing.read_text().split():
            xml = base / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise DatasetError(f"{xml}: image {image_id} is listed in {listing} but has no annotation")
            records.append(
                VocRecord(
                    base / "JPEGImages" / f"{image_id}.jpg",
                    year,
                    image_id,
                    parse_voc_xml(xml, classes),
                )
            )
    return records


class VocDetection(Dataset):
    """VOC split -> ``(image 3×H×W uint8, target)``; target ``boxes`` N×4 float xyxy, ``labels`` in
    1..K (0 is background), ``difficult`` N bool, ``image_id`` (index into ``records``)."""

    def __init__(self, folder: Path, split: str, classes: tuple[str, ...] = VOC_CLASSES):
        self.classes = tuple(classes)
        self.records = read_voc_split(Path(folder) / "VOCdevkit", split, self.classes)
        self._label = {c: k + 1 for k, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, i: int) -> Tensor:
        path = self.records[i].image
        if not path.is_file():
            raise DatasetError(f"{path}: image {self.records[i].image_id} is listed but the file is missing")
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from e
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def target(self, i: int) -> dict[str, Tensor]:
        objs = self.records[i].objects
        boxes = torch.tensor([o.box for o in objs], dtype=torch.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0  # 1-based inclusive indices -> continuous coordinates (detectron2)
        return {
            "image_id": torch.tensor(i),
            "boxes": boxes,
            "labels": torch.tensor([self._label[o.name] for o in objs], dtype=torch.int64),
            "difficult": torch.tensor([o.difficult for o in objs], dtype=torch.bool),
        }

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.load_image(i), self.target(i)


def _build(classes: tuple[str, ...]) -> Any:
    return lambda folder, split: VocDetection(folder, split, classes)


register_dataset(
    DatasetSpec(
        "synth_voc",
        "detection",
        "synth_voc",
        VOC_LAYOUT,
        _build(TEXTURE_CLASSES),
        synthesize=lambda folder: write_voc(folder, SynthDenseConfig()),
        version=DENSE_VERSION,
        description="embedded texture scenes in VOC07+12 layout, the 10 texture classes, 128 px",
    )
)
register_dataset(
    DatasetSpec(
        "voc",
        "detection",
        "voc",
        VOC_LAYOUT,
        _build(VOC_CLASSES),
        description="PASCAL VOC 2007 + 2012 (VOCdevkit), the 20 official classes",
    )
)
