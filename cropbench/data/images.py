"""Image classification datasets that yield fixed-size uint8 canvases (views are cut on-device).

Workers only decode and resize (shorter side to ``image_size``, centre crop); all random view
construction happens batched on the training device (``cropbench.views.image``). Taking the
random-resized crop from this canvas rather than from the full-resolution image is a documented
deviation at paper scale (canvas 256 px for 224-px views).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.synth import CLASSES, CLUTTER_CONFIG, GENERATOR_VERSION, SynthImagesConfig, write_imagefolder
from cropbench.errors import DatasetError
from cropbench.types import ImageBatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _mean_std(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean/std (0-255 scale) on ``device``, made once per device: no host-to-device
    copy per call (on CUDA such a copy from pageable memory synchronises the host)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return mean.to(device), std.to(device)


def normalize(images: Tensor) -> Tensor:
    """uint8 (or 0-255 float) B×3×H×W -> float, ImageNet mean/std normalised."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


IMAGEFOLDER_LAYOUT = """<root>/{train,val}/<class_name>/<image>.{jpg,jpeg,png,...}   (torchvision ImageFolder;
    class indices: the sorted class folders of train/, for every split)"""
IMAGENET_LAYOUT = """<root>/train/<wnid>/<wnid>_<n>.JPEG         ILSVRC2012_img_train.tar holds one tar per class:
                                            untar each into its wnid folder
<root>/val/<wnid>/ILSVRC2012_val_<n>.JPEG   ILSVRC2012_img_val.tar unpacks flat: sort it into the
                                            wnid folders first (e.g. the widely used valprep.sh)
    class indices: the sorted wnid folders of train/, for every split"""


def to_canvas(img: Image.Image, size: int) -> Tensor:
    """PIL image -> 3×size×size uint8: resize the shorter side to ``size``, centre crop."""
    img = img.convert("RGB")
    img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderCanvas(Dataset):
    """An ImageFolder split; ``cache=True`` decodes every image once and keeps the canvases in memory.

    Class indices come from the training split's folders (``class_split``), for every split: a
    validation split that lacks a class keeps the training indices (torchvision's per-folder
    ``find_classes`` would shift every later label), and a class folder that exists only in a
    non-training split is an error naming it.
    """

    def __init__(self, folder: Path, split: str, image_size: int = 64, cache: bool = False, class_split: str = "train"):
        self.root = Path(folder) / split
        self.classes, self.class_to_idx = class_index(Path(folder), split, class_split)
        try:
            self.samples = torchvision.datasets.folder.make_dataset(
                str(self.root),
                self.class_to_idx,
                extensions=torchvision.datasets.folder.IMG_EXTENSIONS,
                allow_empty=split != class_split,
            )
        except (FileNotFoundError, OSError) as e:
            raise DatasetError(f"{self.root}: {e}\nexpected layout:\n{IMAGEFOLDER_LAYOUT}") from e
        self.targets = [t for _, t in self.samples]
        self.image_size = image_size
        self._cache: Tensor | None = None
        if cache:
            self._cache = torch.stack([self._load(i) for i in range(len(self.samples))])

    def _load(self, i: int) -> Tensor:
        path = self.samples[i][0]
        try:
            with Image.open(path) as img:
                return to_canvas(img, self.image_size)
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from e

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    collate = staticmethod(lambda samples: collate_images(samples))

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        img = self._cache[i] if self._cache is not None else self._load(i)
        return img, self.targets[i], i


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DatasetError(f"split folder {root} does not exist\nexpected layout:\n{IMAGEFOLDER_LAYOUT}")
    classes = sorted(e.name for e in root.iterdir() if e.is_dir())
    if not classes:
        raise DatasetError(
            f"{root} has no class folders (a flat folder of images, as ILSVRC2012_img_val.tar unpacks, "
            f"must be sorted into class folders first)\nexpected layout:\n{IMAGEFOLDER_LAYOUT}"
        )
    return classes


def class_index(folder: Path, split: str, class_split: str = "train") -> tuple[list[str], dict[str, int]]:
    """Sorted class names of ``<folder>/<class_split>`` and their indices, checked against ``split``.

    A class folder of ``split`` that the training split lacks is a ``DatasetError`` naming it."""
    classes = _class_folders(folder / class_split)
    if split != class_split:
        extra = sorted(set(_class_folders(folder / split)) - set(classes))
        if extra:
            raise DatasetError(
                f"{folder / split} has class folder(s) {', '.join(extra)} that the training split "
                f"{folder / class_split} does not have: class indices come from the training split"
            )
    return classes, {c: i for i, c in enumerate(classes)}


def collate_images(samples: list[tuple[Tensor, int, int]]) -> ImageBatch:
    imgs, labels, idx = zip(*samples, strict=True)
    return ImageBatch(torch.stack(imgs), torch.tensor(labels, dtype=torch.long), torch.tensor(idx, dtype=torch.long))


def _build_imagefolder(folder: Path, split: str, image_size: int = 64, cache: bool = False) -> ImageFolderCanvas:
    return ImageFolderCanvas(folder, split, image_size, cache)


def _build_synth(folder: Path, split: str, image_size: int = 64, cache: bool = True) -> ImageFolderCanvas:
    return ImageFolderCanvas(folder, split, image_size, cache)


register_dataset(
    DatasetSpec(
        "synth_images",
        "classification",
        "synth_images",
        IMAGEFOLDER_LAYOUT,
        _build_synth,
        synthesize=lambda folder: write_imagefolder(folder, SynthImagesConfig()),
        description="embedded synthetic texture scenes, 10 classes, 64 px (1600 train / 1000 val)",
        version=str(GENERATOR_VERSION),
        num_classes=len(CLASSES),
    )
)
register_dataset(
    DatasetSpec(
        "synth_clutter",
        "classification",
        "synth_clutter",
        IMAGEFOLDER_LAYOUT,
        _build_synth,
        synthesize=lambda folder: write_imagefolder(folder, CLUTTER_CONFIG),
        description=(
            "synth_images with a smaller main object and two distractor objects of other classes "
            "(harder: separates supervised from SSL pretraining at micro)"
        ),
        version=str(GENERATOR_VERSION),
        num_classes=len(CLASSES),
    )
)
register_dataset(
    DatasetSpec(
        "imagenet",
        "classification",
        "imagenet",
        IMAGENET_LAYOUT,
        _build_imagefolder,
        description="ImageNet-1k in ImageFolder layout (train/, val/ with class folders)",
    )
)
register_dataset(
    DatasetSpec(
        "imagenet100",
        "classification",
        "imagenet100",
        IMAGENET_LAYOUT,
        _build_imagefolder,
        description="ImageNet-100 (CMC subset) in ImageFolder layout",
    )
)


class TorchvisionCanvas(Dataset):
    """CIFAR-10/100 and STL-10 from their official torchvision binary layouts (never downloads)."""

    LAYOUTS = {
        "cifar10": "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "cifar100": "<root>/cifar-100-python/{train,test,meta}",
        "stl10": "<root>/stl10_binary/{train_X.bin,train_y.bin,test_X.bin,test_y.bin,unlabeled_X.bin}",
    }

    def __init__(self, name: str, folder: Path, split: str, image_size: int):
        try:
            if name == "stl10":
                ds = torchvision.datasets.STL10(
                    str(folder), split="train" if split == "train" else "test", download=False
                )
                self.images, self.targets = torch.from_numpy(ds.data), [int(t) for t in ds.labels]
            else:
                cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
                ds = cls(str(folder), train=split == "train", download=False)
                self.images, self.targets = torch.from_numpy(ds.data).permute(0, 3, 1, 2), list(ds.targets)
        except RuntimeError as e:
            raise DatasetError(
                f"{name} not found or corrupt under {folder}: {e}\nexpected layout:\n{self.LAYOUTS[name]}"
            ) from e
        self.classes = list(ds.classes)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        img = self.images[i]
        if img.shape[-1] != self.image_size:
            img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        return img, self.targets[i], i


for _name in ("cifar10", "cifar100", "stl10"):
    register_dataset(
        DatasetSpec(
            _name,
            "classification",
            _name,
            TorchvisionCanvas.LAYOUTS[_name],
            (lambda n: lambda folder, split, image_size=32: TorchvisionCanvas(n, folder, split, image_size))(_name),
            description=f"{_name} in its official torchvision layout",
        )
    )
