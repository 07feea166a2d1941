"""Datasets: a registry of ``DatasetSpec``s, each naming its on-disk layout.

Real datasets are read from ``--data-root`` (or ``$CROPBENCH_DATA``) in their official layouts.
The embedded synthetic datasets are generated deterministically on first use into the data root
(default ``~/.cache/cropbench/data``) *in the same layouts*, so the real loaders are what runs.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cropbench.config import check_kwargs
from cropbench.errors import DatasetError
from cropbench.io import atomic_dir
from cropbench.registry import DATASETS


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: Literal["classification", "detection", "segmentation", "video"]
    subdir: str  # the dataset's folder under the data root
    layout: str  # expected on-disk layout, shown in errors and `cropbench list datasets`
    build: Callable[..., Any]  # build(folder: Path, split: str, **kwargs) -> torch Dataset; no ``**_``
    synthesize: Callable[[Path], None] | None = None  # writes the embedded data into a folder
    # validate(folder, split) checks a real dataset's layout and lists without decoding images;
    # None: building the split (``build``) is the check
    validate: Callable[[Path, str], Any] | None = None
    description: str = ""
    version: str = (
        ""  # generator version of synthetic data: part of the folder name, so a changed generator regenerates
    )
    # classes of a classification / video dataset that the embedded generator writes, known before
    # it is written (a real dataset's are counted from its index: ``dataset_num_classes``)
    num_classes: int | None = None

    @property
    def folder_name(self) -> str:
        return f"{self.subdir}-v{self.version}" if self.version else self.subdir

    @property
    def synthetic(self) -> bool:
        return self.synthesize is not None


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.add(spec.name, spec)


def default_data_root() -> Path:
    return Path(os.environ.get("CROPBENCH_DATA", Path.home() / ".cache" / "cropbench" / "data"))


_COMPLETE = ".cropbench-complete"
SYNTHETIC_SCALES = ("micro",)  # the only scale that may read the embedded synthetic data


def describe(spec: DatasetSpec) -> str:
    """Name, description and the exact on-disk layout, as ``cropbench list datasets`` prints it."""
    kind = "embedded synthetic, micro scale only" if spec.synthetic else "real"
    body = "\n".join("    " + line for line in layout_at(spec, f"<data root>/{spec.folder_name}").splitlines())
    return f"{spec.name}  ({kind}) {spec.description}\n{body}"


def layout_at(spec: DatasetSpec, folder: Path | str) -> str:
    """The dataset's layout with ``<root>`` standing for its own ``folder``."""
    lines = spec.layout.splitlines()
    if re.fullmatch(r"<root>/\w+/", lines[0]):  # a layout that opens with its own folder line
        lines = [f"{folder}/", *lines[1:]]
    return "\n".join(line.replace("<root>", str(folder)) for line in lines)


def _require_real(spec: DatasetSpec, scale: str | None, field: str) -> None:
    """At ``small`` / ``paper`` scale only real datasets are read: a synthetic one is an error."""
    if scale is None or scale in SYNTHETIC_SCALES or not spec.synthetic:
        return
    key = field or "data.dataset"
    raise DatasetError(
        f"dataset {spec.name!r} ({key}) is cropbench's embedded synthetic data, which only the micro scale "
        f"uses; --scale {scale} reads real datasets only: set {key} to a real dataset "
        f"(`cropbench list datasets` shows each layout), e.g. --set {key}={spec.name.removeprefix('synth_')}"
    )


def dataset_folder(name: str, data_root: Path | None = None, scale: str | None = None, field: str = "") -> Path:
    """The dataset's folder, generating embedded synthetic data on first use.

    Real datasets must already exist: a missing folder is a ``DatasetError`` that shows the layout.
    Synthetic data is written to a temporary sibling and renamed into place, so an interrupted
    generation never leaves a half-written dataset behind. With ``scale`` other than micro, a
    synthetic dataset is an error naming ``field`` (e.g. ``eval.coco.dataset``), and nothing is written.
    """
    spec: DatasetSpec = DATASETS.get(name)
    _require_real(spec, scale, field)
    folder = _folder(spec, data_root)
    if spec.synthesize is None:
        if not folder.exists():
            raise DatasetError(f"dataset {name!r} not found at {folder}\nexpected layout:\n{layout_at(spec, folder)}")
        return folder
    if (folder / _COMPLETE).exists():
        return folder
    if folder.exists():
        raise DatasetError(
            f"{folder} exists but is not a complete cropbench-generated {name!r} dataset "
            f"(no {_COMPLETE} marker); remove it to regenerate"
        )
    with atomic_dir(folder, done=lambda f: (f / _COMPLETE).exists()) as tmp:  # another process may finish first
        spec.synthesize(tmp)
        (tmp / _COMPLETE).write_text("generated by cropbench\n")
    return folder


def build_dataset(
    name: str, split: str, data_root: Path | None = None, scale: str | None = None, field: str = "", **kwargs: Any
) -> Any:
    """Build one split; ``scale``/``field`` as in ``dataset_folder``. A keyword the dataset's
    builder does not take is a ``ConfigError`` naming it and the valid ones (never ignored)."""
    spec: DatasetSpec = DATASETS.get(name)
    check_dataset_kwargs(name, kwargs, field)
    return spec.build(dataset_folder(name, data_root, scale, field), split, **kwargs)


def check_dataset_kwargs(name: str, kwargs: dict[str, Any], field: str = "") -> None:
    """A ``ConfigError`` when the builder of dataset ``name`` does not take one of ``kwargs``
    (preflight calls this for the training set before any data is read)."""
    where = f"{field}: dataset {name!r}" if field else f"dataset {name!r}"
    check_kwargs(DATASETS.get(name).build, kwargs, where, skip=2)


def validate_dataset(
    name: str, root: Path | None, split: str | tuple[str, ...], scale: str = "micro", field: str = ""
) -> None:
    """Check a dataset before any training: call it for every dataset a run will read.

    Raises ``DatasetError`` naming the path (or ``field``) and showing the expected layout for: an
    unknown name (``UnknownNameError``), a synthetic dataset at small / paper scale, a missing
    folder, a split whose folders / annotation / split files are missing or name missing files.
    ``split`` may be a tuple of splits, or ``"all"`` for the three folds of a video dataset
    (``train1..3`` and ``test1..3``). Embedded synthetic data that does not exist yet is generated
    complete on first use, so it is not checked (nor written) here; an existing copy is checked like
    a real dataset. Nothing is written.
    """
    spec: DatasetSpec = DATASETS.get(name)
    _require_real(spec, scale, field)
    splits = _expand_splits(spec, split)
    folder = _folder(spec, root)
    if spec.synthetic and not folder.exists():
        return  # generated (complete, known good) on first use
    if spec.synthetic and not (folder / _COMPLETE).exists():
        dataset_folder(name, root)  # raises: a folder that is not a complete generated dataset
    if not folder.is_dir():
        where = f" ({field})" if field else ""
        raise DatasetError(
            f"dataset {name!r}{where} not found at {folder}\nexpected layout:\n{layout_at(spec, folder)}"
        )
    for s in splits:
        if spec.validate is not None:
            spec.validate(folder, s)
        else:
            _split_index(spec, folder, s)


def dataset_num_classes(name: str, root: Path | None, split: str) -> int | None:
    """Classes of a classification or video dataset's ``split`` before any training: the
    generator's count for embedded data not yet written, else from the split's index (no image is
    decoded). None for detection / segmentation datasets."""
    spec: DatasetSpec = DATASETS.get(name)
    if spec.kind not in ("classification", "video"):
        return None
    folder = _folder(spec, root)
    if spec.synthetic and not folder.exists():
        return spec.num_classes
    return int(_split_index(spec, folder, split).num_classes)


def _folder(spec: DatasetSpec, root: Path | None) -> Path:
    return (Path(root) if root is not None else default_data_root()) / spec.folder_name


def _split_index(spec: DatasetSpec, folder: Path, split: str) -> Any:
    """The split's dataset built for its index only: no image is decoded (builders that cache
    decode on demand)."""
    cache = {"cache": False} if "cache" in inspect.signature(spec.build).parameters else {}
    return spec.build(folder, split, **cache)


def _expand_splits(spec: DatasetSpec, split: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(split, tuple):
        return tuple(s for one in split for s in _expand_splits(spec, one))
    if split == "all":
        if spec.kind != "video":
            raise DatasetError(f"split 'all' (the three folds) exists only for video datasets, not {spec.name!r}")
        return tuple(f"{kind}{fold}" for fold in (1, 2, 3) for kind in ("train", "test"))
    return (split,)
