"""``coco_images``: every image of a COCO 2017 split folder as a canvas, without annotations.

CYBORGS pretrains on COCO train2017 images alone (its masks come from the model, not from the
annotations); this is that training set. Layout: the official COCO folders (``train2017/``,
``val2017/``) under ``<root>/coco``; the label of every sample is -1.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.images import to_canvas
from cropbench.errors import DatasetError

COCO_IMAGES_LAYOUT = "<root>/coco/{train2017,val2017}/*.jpg   (every image of the split folder; no labels)"


class FlatImageCanvas(Dataset):
    """All images of one folder as canvases with label -1: CYBORGS pretrains on COCO train2017."""

    def __init__(self, folder: Path, split: str, image_size: int = 256):
        root = folder / f"{split}2017" if (folder / f"{split}2017").is_dir() else folder / split
        if not root.is_dir():
            raise DatasetError(f"image folder {root} not found\nexpected layout:\n{COCO_IMAGES_LAYOUT}")
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise DatasetError(f"{root}: no images\nexpected layout:\n{COCO_IMAGES_LAYOUT}")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        try:
            with Image.open(self.files[i]) as img:
                return to_canvas(img, self.image_size), -1, i
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot decode image {self.files[i]}: {e}") from e


register_dataset(
    DatasetSpec(
        "coco_images",
        "classification",
        "coco",
        COCO_IMAGES_LAYOUT,
        lambda folder, split, image_size=256, **_: FlatImageCanvas(folder, split, image_size),
        description="COCO 2017 images without annotations, as canvases (CYBORGS pretraining set)",
    )
)
