"""Video datasets: UCF101, HMDB51 and Kinetics-400 in their official layouts (pytorchvideo.data).

Paths and labels come from pytorchvideo's parsers (``LabeledVideoPaths``,
``Hmdb51LabeledVideoPaths``) with the fixes the official split files need (protocols.md §1c):
UCF101's ``trainlist`` labels are 1-based and its ``testlist`` has none (pytorchvideo gives -1),
so every label is re-derived from the class folder through ``classInd.txt`` (a trainlist label
that disagrees is an error); HMDB51 labels are class-name strings, mapped to indices in sorted
class order. Frames are decoded by pytorchvideo's PyAV backend (``EncodedVideo``, ``"pyav"``).

``VideoClips`` is the map-style dataset the trainer and the evaluations use (pytorchvideo's
``LabeledVideoDataset`` is iterable and drops undecodable files at debug log level; here a bad file
is skipped with a counted ``BadVideoWarning`` naming it, and too many bad files is an error).
One sample is a *window* of ``frames`` frames taken every ``stride`` frames, its start drawn from
``(seed, epoch, index)``; a video shorter than the window is looped (as BraVe does) and the sample
says so (``looped``). Frames are resized (shorter side) and centre-cropped to a square canvas from
which the methods cut their views on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cropbench.data import DatasetSpec, register_dataset
from cropbench.data.video_decode import (
    BadVideoWarning,
    VideoDecodeError,
    decode_video,
    header_frames,
    to_canvas,
    window_indices,
)
from cropbench.data.video_lists import (
    HMDB51_LAYOUT,
    KINETICS_LAYOUT,
    UCF101_LAYOUT,
    VideoList,
    hmdb51_list,
    kinetics_list,
    ucf101_list,
)
from cropbench.data.video_synth import HMDB_CLASSES, UCF_CLASSES, VIDEO_GENERATOR_VERSION, write_hmdb51, write_ucf101
from cropbench.errors import DatasetError
from cropbench.types import VideoBatch


@dataclass
class VideoSample:
    video: Tensor  # 3×T×S×S uint8
    label: int
    index: int
    looped: bool


def collate_videos(samples: list[VideoSample]) -> VideoBatch:
    return VideoBatch(
        video=torch.stack([s.video for s in samples]),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        index=torch.tensor([s.index for s in samples], dtype=torch.long),
        looped=torch.tensor([s.looped for s in samples], dtype=torch.bool),
    )


@dataclass(frozen=True)
class Window:
    frames: int = 16  # frames per sample
    stride: int = 1  # take every ``stride``-th frame (native frame rate)


class VideoClips(Dataset):
    """Map-style dataset of uint8 windows (3×T×S×S).

    ``cache=True`` keeps every decoded video in memory after its first use (the embedded sets are
    small); ``cache=False`` decodes only each sample's window (real datasets). Bad videos are found
    when first read, warned about, counted and skipped from then on."""

    def __init__(
        self,
        videos: VideoList,
        image_size: int = 64,
        window: Window = Window(),
        seed: int = 0,
        cache: bool = False,
        max_bad_fraction: float = 0.05,
    ):
        self.videos, self.image_size, self.window, self.seed = videos, image_size, window, seed
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.bad: dict[str, str] = {}  # path -> reason (this process)
        self.items = list(videos.items)
        self._memo: dict[int, Tensor] | None = {} if cache else None  # decoded videos, on first use

    # --- bad input -------------------------------------------------------------------------------
    def _try_decode(self, path: str, start: int = 0, num: int | None = None) -> Tensor | None:
        try:
            return to_canvas(decode_video(path, start, num), self.image_size)
        except VideoDecodeError as e:
            self.bad[path] = str(e)
            warnings.warn(
                f"skipping video {path}: {e} ({len(self.bad)} bad video(s) so far in {self.videos.source})",
                BadVideoWarning,
                stacklevel=2,
            )
            limit = self.max_bad_fraction * len(self.videos.items)
            if len(self.bad) > limit:
                raise DatasetError(
                    f"{len(self.bad)} of {len(self.videos.items)} videos listed in "
                    f"{self.videos.source} cannot be decoded (limit {limit:.0f}, "
                    f"max_bad_fraction={self.max_bad_fraction}): " + ", ".join(sorted(self.bad)[:5])
                ) from e
            return None

    # --- the dataset API the trainer uses -------------------------------------------------------
    def configure(self, window: Window | None = None, seed: int | None = None) -> VideoClips:
        """A copy with another window / seed sharing the decoded frames (methods set it)."""
        out = object.__new__(VideoClips)
        out.__dict__.update(self.__dict__)
        out.window = window or self.window
        out.seed = self.seed if seed is None else seed
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.videos.classes

    @property
    def num_classes(self) -> int:
        return len(self.videos.classes)

    @property
    def targets(self) -> list[int]:
        return [it.label for it in self.items]

    collate = staticmethod(collate_videos)

    def full_video(self, i: int) -> Tensor | None:
        """All frames of video ``i`` (T×3×S×S uint8), or None with a warning when undecodable."""
        if self._memo is not None and i in self._memo:
            return self._memo[i]
        frames = self._try_decode(self.items[i].path)
        if frames is not None and self._memo is not None:
            self._memo[i] = frames
        return frames

    def __getitem__(self, i: int) -> VideoSample:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        for k in range(len(self.items)):  # a bad video is replaced by the next good one (deterministic)
            j = (i + k) % len(self.items)
            if self.items[j].path in self.bad:
                continue
            window = self._window(j, rng)
            if window is not None:
                frames, looped = window
                return VideoSample(frames.permute(1, 0, 2, 3).contiguous(), self.items[j].label, i, looped)
        raise DatasetError(f"no decodable video left in {self.videos.source}")

    def _window(self, j: int, rng: np.random.Generator) -> tuple[Tensor, bool] | None:
        """T×3×S×S frames of one random window of video ``j`` and whether it was looped."""
        frames, stride = self.window.frames, self.window.stride
        span = (frames - 1) * stride + 1
        if self._memo is None:  # decode only the window when the header says it is long enough
            path = self.items[j].path
            n = header_frames(path)
            if n >= span:
                part = self._try_decode(path, int(rng.integers(0, n - span + 1)), span)
                if part is None:
                    return None
                if part.shape[0] >= span:
                    return part[::stride][:frames], False
        full = self.full_video(j)
        if full is None:
            return None
        idx, looped = window_indices(full.shape[0], frames, stride, rng)
        return full[torch.from_numpy(idx)], looped


def with_window(dataset: Dataset, window: Window) -> Dataset:
    """Set the decode window of a ``VideoClips`` (or of one wrapped in a ``Subset``, as
    ``data.limit`` does); methods call this from ``prepare_dataset``."""
    if isinstance(dataset, VideoClips):
        return dataset.configure(window=window)
    inner = getattr(dataset, "dataset", None)
    if isinstance(dataset, torch.utils.data.Subset) and isinstance(inner, VideoClips):
        dataset.dataset = inner.configure(window=window)
        return dataset
    raise TypeError(f"expected a video dataset (VideoClips), got {type(dataset).__name__}")


def clip_batches(ds: VideoClips, i: int, window: Window, starts: list[int]) -> tuple[Tensor, bool] | None:
    """Clips of video ``i`` starting at ``starts``: K×3×T×S×S uint8, and whether any looped."""
    frames = ds.full_video(i)
    if frames is None:
        return None
    n, looped = frames.shape[0], False
    clips = []
    for s in starts:
        idx = s + window.stride * np.arange(window.frames)
        looped |= bool(idx[-1] >= n)
        clips.append(frames[torch.from_numpy(idx % n)].permute(1, 0, 2, 3))
    return torch.stack(clips), looped


def _builder(lister: Callable[[Path, str], VideoList], synthetic: bool) -> Callable[..., VideoClips]:
    def build(
        folder: Path,
        split: str,
        image_size: int = 64,
        cache: bool | None = None,
        frames: int = 16,
        stride: int = 1,
        seed: int = 0,
        max_bad_fraction: float = 0.05,
    ) -> VideoClips:
        """Synthetic sets are small: decoded once into memory (``cache``); real ones per sample."""
        return VideoClips(
            lister(Path(folder), split),
            image_size,
            Window(frames, stride),
            seed,
            synthetic if cache is None else cache,
            max_bad_fraction,
        )

    return build


register_dataset(
    DatasetSpec(
        "synth_ucf101",
        "video",
        "synth_ucf101",
        UCF101_LAYOUT,
        _builder(ucf101_list, True),
        synthesize=write_ucf101,
        num_classes=len(UCF_CLASSES),
        description="embedded synthetic action videos, UCF101 layout: 10 classes (texture + motion), 240 clips, 48 px",
        version=str(VIDEO_GENERATOR_VERSION),  # a changed generator writes a new folder
    )
)
register_dataset(
    DatasetSpec(
        "ucf101",
        "video",
        "ucf101",
        UCF101_LAYOUT,
        _builder(ucf101_list, False),
        description="UCF101 (13,320 clips, 101 classes) with the official ucfTrainTestlist splits",
    )
)
register_dataset(
    DatasetSpec(
        "synth_hmdb51",
        "video",
        "synth_hmdb51",
        HMDB51_LAYOUT,
        _builder(hmdb51_list, True),
        synthesize=write_hmdb51,
        num_classes=len(HMDB_CLASSES),
        description="embedded synthetic action videos, HMDB51 layout: 10 classes (texture + motion), 200 clips, pan",
        version=str(VIDEO_GENERATOR_VERSION),  # a changed generator writes a new folder
    )
)
register_dataset(
    DatasetSpec(
        "hmdb51",
        "video",
        "hmdb51",
        HMDB51_LAYOUT,
        _builder(hmdb51_list, False),
        description="HMDB51 (6,766 clips, 51 classes) with the official testTrainMulti_7030_splits",
    )
)
register_dataset(
    DatasetSpec(
        "kinetics400",
        "video",
        "kinetics400",
        KINETICS_LAYOUT,
        _builder(kinetics_list, False),
        description="Kinetics-400 train/val in class folders (paper-scale pretraining data)",
    )
)


__all__ = [
    "BadVideoWarning",
    "VideoClips",
    "VideoSample",
    "Window",
    "clip_batches",
    "collate_videos",
    "decode_video",
    "window_indices",
    "with_window",
]
