"""Which videos a split holds: official UCF101 / HMDB51 / Kinetics split files (pytorchvideo).

Split names: ``train`` / ``test`` (fold 1), ``train1``..``train3`` / ``test1``..``test3``, and for
HMDB51 ``unused1``..``unused3``; Kinetics has ``train`` and ``val``. Every path a split file names
must exist: a missing video is an error naming the split file and the videos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pytorchvideo.data.hmdb51 import Hmdb51LabeledVideoPaths
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths

from cropbench.errors import DatasetError

UCF101_LAYOUT = """<root>/ucf101/
  UCF-101/<Class>/v_<Class>_gGG_cCC.avi
  ucfTrainTestlist/classInd.txt             lines '1 ApplyEyeMakeup' (1-based class ids)
  ucfTrainTestlist/trainlist0{1,2,3}.txt    lines '<Class>/v_<Class>_gGG_cCC.avi <1-based label>'
  ucfTrainTestlist/testlist0{1,2,3}.txt     lines '<Class>/v_<Class>_gGG_cCC.avi' (no label)"""
HMDB51_LAYOUT = """<root>/hmdb51/
  <class>/<video>.avi                       as hmdb51_org.rar's per-class archives unpack
                                            (or videos/<class>/<video>.avi)
  testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt   (test_train_splits.rar)
      lines '<video>.avi <1 train | 2 test | 0 unused>'"""
KINETICS_LAYOUT = """<root>/kinetics400/{train,val}/<class>/<youtube_id>_<start>_<end>.mp4
  (pytorchvideo's directory layout: classes are the sorted folder names)"""


@dataclass(frozen=True)
class VideoItem:
    path: str
    label: int  # 0-based class index


@dataclass(frozen=True)
class VideoList:
    items: tuple[VideoItem, ...]
    classes: tuple[str, ...]
    source: str  # the split file(s) or folder the list came from (named in errors and warnings)


def parse_split(split: str, kinds: tuple[str, ...] = ("train", "test")) -> tuple[str, int]:
    """``"train"`` -> ("train", 1); ``"test3"`` -> ("test", 3)."""
    m = re.fullmatch(r"([a-z]+)([123]?)", split)
    if m is None or m.group(1) not in kinds:
        raise DatasetError(
            f"unknown split {split!r}; expected one of {', '.join(kinds)}, optionally followed by the fold 1, 2 or 3"
        )
    return m.group(1), int(m.group(2) or 1)


def _check_exist(items: list[VideoItem], source: str, layout: str) -> None:
    missing = [it.path for it in items if not Path(it.path).is_file()]
    if missing:
        raise DatasetError(
            f"{source} names {len(missing)} video(s) that do not exist, e.g. "
            + ", ".join(missing[:5])
            + f"\nexpected layout:\n{layout}"
        )
    if not items:
        raise DatasetError(f"{source} lists no videos\nexpected layout:\n{layout}")


def read_class_ind(path: Path) -> tuple[str, ...]:
    """UCF101 ``classInd.txt`` ('<1-based id> <Class>' per line) -> class names in id order."""
    if not path.is_file():
        raise DatasetError(f"{path} not found\nexpected layout:\n{UCF101_LAYOUT}")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != 2 or not r[0].isdigit()]
    ids = [int(r[0]) for r in rows if r not in bad]
    if bad or ids != list(range(1, len(rows) + 1)):
        raise DatasetError(f"{path}: expected lines '<id> <Class>' with ids 1..N in order, got {bad[:1] or rows[:3]}")
    return tuple(r[1] for r in rows)


def ucf101_list(folder: Path, split: str) -> VideoList:
    """UCF101 split with 0-based labels taken from the class folder via ``classInd.txt``."""
    kind, fold = parse_split(split)
    lists = Path(folder) / "ucfTrainTestlist"
    classes = read_class_ind(lists / "classInd.txt")
    split_file = lists / f"{kind}list0{fold}.txt"
    if not split_file.is_file():
        raise DatasetError(f"{split_file} not found\nexpected layout:\n{UCF101_LAYOUT}")
    try:
        parsed = LabeledVideoPaths.from_csv(str(split_file))  # 1-based labels; -1 for testlist lines
    except (AssertionError, ValueError) as e:
        raise DatasetError(f"{split_file}: cannot parse ({e}); expected lines '<Class>/<video>.avi [label]'") from e
    parsed.path_prefix = str(Path(folder) / "UCF-101")
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for line in range(len(parsed)):
        path, info = parsed[line]
        cls, label = Path(path).parent.name, info["label"]
        if cls not in index:
            raise DatasetError(f"{split_file}:{line + 1}: class folder {cls!r} of {path} is not in classInd.txt")
        if label != -1 and label - 1 != index[cls]:
            raise DatasetError(
                f"{split_file}:{line + 1}: label {label} disagrees with classInd.txt ({cls} = {index[cls] + 1})"
            )
        items.append(VideoItem(path, index[cls]))
    _check_exist(items, str(split_file), UCF101_LAYOUT)
    return VideoList(tuple(items), classes, str(split_file))


def hmdb51_video_root(folder: Path) -> Path:
    """Where the class folders are: ``<folder>/videos`` (cropbench's synthetic layout) when it
    exists, else ``<folder>`` itself (the official archives unpack class folders there)."""
    return folder / "videos" if (folder / "videos").is_dir() else folder


def hmdb51_list(folder: Path, split: str) -> VideoList:
    """HMDB51 split: all ``<class>_test_split<fold>.txt``; rows marked 1 train, 2 test, 0 unused."""
    kind, fold = parse_split(split, ("train", "test", "unused"))
    splits = Path(folder) / "testTrainMulti_7030_splits"
    files = sorted(splits.glob(f"*_test_split{fold}.txt")) if splits.is_dir() else []
    if not files:
        raise DatasetError(f"no *_test_split{fold}.txt files in {splits}\nexpected layout:\n{HMDB51_LAYOUT}")
    classes = tuple(sorted(f.name[: -len(f"_test_split{fold}.txt")] for f in files))
    source = f"{splits}/*_test_split{fold}.txt"
    try:
        parsed = Hmdb51LabeledVideoPaths.from_csvs(files, split_type=kind)  # labels are class-name strings
    except (AssertionError, ValueError, IndexError) as e:
        raise DatasetError(f"{source}: cannot parse ({e}); expected lines '<video>.avi <0|1|2>'") from e
    if isinstance(parsed, Exception):  # pytorchvideo 0.1.5 returns (not raises) some errors
        raise DatasetError(f"{source}: {parsed}")
    parsed.path_prefix = str(hmdb51_video_root(Path(folder)))
    index = {c: i for i, c in enumerate(classes)}
    items = [VideoItem(path, index[info["label"]]) for path, info in (parsed[i] for i in range(len(parsed)))]
    _check_exist(items, source, HMDB51_LAYOUT)
    return VideoList(tuple(items), classes, source)


def kinetics_list(folder: Path, split: str) -> VideoList:
    """Kinetics-400 ``train`` / ``val`` class folders (pytorchvideo's rule: sorted class names)."""
    kind, _ = parse_split(split, ("train", "val"))
    root = Path(folder) / kind
    if not root.is_dir():
        raise DatasetError(f"{root} not found\nexpected layout:\n{KINETICS_LAYOUT}")
    try:
        parsed = LabeledVideoPaths.from_directory(str(root))
    except (AssertionError, FileNotFoundError) as e:
        raise DatasetError(f"{root}: {e}\nexpected layout:\n{KINETICS_LAYOUT}") from e
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    items = [VideoItem(path, int(info["label"])) for path, info in (parsed[i] for i in range(len(parsed)))]
    return VideoList(tuple(items), classes, str(root))
