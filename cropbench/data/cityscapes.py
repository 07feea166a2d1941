"""Cityscapes semantic segmentation (gtFine) through ``torchvision.datasets.Cityscapes``.

torchvision finds the files (``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and the matching
``gtFine/<split>/<city>/*_gtFine_labelIds.png``); the raw labelIds (0..33) are mapped to the 19
train ids with the official table (``Cityscapes.classes[i].train_id``), everything else -> 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.synth_dense import DENSE_VERSION, SynthDenseConfig, write_cityscapes
from cropbench.errors import DatasetError

IGNORE_INDEX = 255
NUM_TRAIN_CLASSES = 19
CITYSCAPES_LAYOUT = """<root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
<root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    (8-bit PNGs of the raw label ids 0..33)"""
TRAIN_CLASS_NAMES = tuple(
    c.name
    for c in sorted(
        (c for c in torchvision.datasets.Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX),
        key=lambda c: c.train_id,
    )
)


def label_id_to_train_id() -> np.ndarray:
    """Look-up table (256,) uint8: labelId -> trainId (19 classes), 255 for ignored ids."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in torchvision.datasets.Cityscapes.classes:
        if c.id >= 0 and 0 <= c.train_id < IGNORE_INDEX:
            lut[c.id] = c.train_id
    return lut


def _read(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path} is missing\nexpected layout:\n{CITYSCAPES_LAYOUT}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if mode == "RGB" else img)
    except OSError as e:
        raise DatasetError(f"cannot decode {path}: {e}") from e


class CityscapesSemantic(Dataset):
    """One split -> ``(image 3×H×W uint8, label H×W int64 train ids, 255 = ignore)``."""

    def __init__(self, folder: Path, split: str):
        try:
            ds = torchvision.datasets.Cityscapes(str(folder), split=split, mode="fine", target_type="semantic")
        except (RuntimeError, ValueError) as e:
            raise DatasetError(
                f"Cityscapes split {split!r} not found under {folder}: {e}\nexpected layout:\n{CITYSCAPES_LAYOUT}"
            ) from e
        self.images = [Path(p) for p in ds.images]
        self.labels = [Path(t[0]) for t in ds.targets]
        if not self.images:
            raise DatasetError(
                f"no *_leftImg8bit.png images under {folder}/leftImg8bit/{split}\nexpected layout:\n{CITYSCAPES_LAYOUT}"
            )
        self.lut = torch.from_numpy(label_id_to_train_id().astype(np.int64))
        self.classes = TRAIN_CLASS_NAMES
        self.num_classes = NUM_TRAIN_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = _read(self.images[i], "RGB")
        label_ids = _read(self.labels[i], "L")
        if label_ids.ndim != 2:
            raise DatasetError(f"{self.labels[i]}: expected a single-channel labelIds PNG, got shape {label_ids.shape}")
        if label_ids.shape != image.shape[:2]:
            raise DatasetError(
                f"{self.labels[i]}: label map is {label_ids.shape[1]}x{label_ids.shape[0]} but its "
                f"image {self.images[i].name} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        if label_ids.max(initial=0) > 255:
            raise DatasetError(f"{self.labels[i]}: label ids above 255; is this an instanceIds PNG?")
        label = self.lut[torch.from_numpy(label_ids.astype(np.int64))]
        return torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), label


def _build(folder: Path, split: str) -> CityscapesSemantic:
    return CityscapesSemantic(folder, split)


register_dataset(
    DatasetSpec(
        "synth_cityscapes",
        "segmentation",
        "synth_cityscapes",
        CITYSCAPES_LAYOUT,
        _build,
        synthesize=lambda folder: write_cityscapes(folder, SynthDenseConfig()),
        version=DENSE_VERSION,
        description="embedded texture scenes in Cityscapes layout, 128x256, "
        "10 train classes + road (200 train / 50 val)",
    )
)
register_dataset(
    DatasetSpec(
        "cityscapes",
        "segmentation",
        "cityscapes",
        CITYSCAPES_LAYOUT,
        _build,
        description="Cityscapes gtFine (leftImg8bit + gtFine labelIds), 19 train classes",
    )
)
