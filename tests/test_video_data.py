"""Video data: official layouts and label fixes, PyAV round trip, windows and loops, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorchvideo.data.hmdb51 import Hmdb51LabeledVideoPaths
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths

from cropbench.data.video import (
    BadVideoWarning,
    VideoClips,
    Window,
    decode_video,
    window_indices,
    with_window,
)
from cropbench.data.video_lists import VideoItem, VideoList, hmdb51_list, parse_split, ucf101_list
from cropbench.data.video_synth import (
    HMDB_CLASSES,
    UCF_CLASSES,
    SynthVideoConfig,
    hmdb_marks,
    ucf_test_groups,
    write_hmdb51,
    write_ucf101,
    write_video,
)
from cropbench.errors import DatasetError

TINY = SynthVideoConfig(size=16, frames=(12, 16), groups=3, clips_per_group=1, distractors=0)


@pytest.fixture(scope="module")
def tiny_ucf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ucf")
    write_ucf101(folder, TINY)
    return folder


@pytest.fixture(scope="module")
def tiny_hmdb(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hmdb")
    write_hmdb51(folder, TINY)
    return folder


def _ramp_video(path: Path, n: int, size: int = 16) -> np.ndarray:
    """Frame k is a flat grey of level 8 + 12·k: decoded frames can be told apart by their mean."""
    frames = np.stack([np.full((size, size, 3), (8 + 12 * k) % 256, np.uint8) for k in range(n)])
    write_video(path, frames, 25)
    return frames


def test_ucf101_labels_come_from_class_ind_not_the_raw_split_files(tiny_ucf):
    lists = tiny_ucf / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_text().splitlines()[0] == f"1 {UCF_CLASSES[0]}"
    raw_train = LabeledVideoPaths.from_csv(str(lists / "trainlist01.txt"))
    raw_test = LabeledVideoPaths.from_csv(str(lists / "testlist01.txt"))
    assert min(raw_train[i][1]["label"] for i in range(len(raw_train))) == 1  # 1-based in the file
    assert {raw_test[i][1]["label"] for i in range(len(raw_test))} == {-1}  # no labels in testlist
    for split in ("train1", "test1", "test3"):
        videos = ucf101_list(tiny_ucf, split)
        for item in videos.items:
            assert UCF_CLASSES[item.label] == Path(item.path).parent.name
    test1 = ucf101_list(tiny_ucf, "test")
    groups = {int(Path(it.path).stem.split("_g")[1][:2]) for it in test1.items}
    assert groups == set(ucf_test_groups(TINY, 1)) == {1}
    assert len(test1.items) == len(UCF_CLASSES)


def test_hmdb51_marks_and_string_labels_are_mapped_to_indices(tiny_hmdb):
    splits = tiny_hmdb / "testTrainMulti_7030_splits"
    raw = Hmdb51LabeledVideoPaths.from_dir(splits, split_id=2, split_type="test")
    assert isinstance(raw[0][1]["label"], str)  # pytorchvideo gives the class name
    marks = hmdb_marks(TINY, 2)
    for kind, mark in (("train", 1), ("test", 2), ("unused", 0)):
        videos = hmdb51_list(tiny_hmdb, f"{kind}2")
        expected = sum(1 for m in marks.values() if m == mark) * len(HMDB_CLASSES)
        assert len(videos.items) == expected
        for item in videos.items:
            assert videos.classes[item.label] == Path(item.path).parent.name
    assert hmdb51_list(tiny_hmdb, "test2").classes == tuple(sorted(HMDB_CLASSES))


def test_bad_split_files_are_errors_naming_the_file(tiny_ucf, tmp_path):
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        parse_split("val")
    assert parse_split("test3") == ("test", 3)
    broken = tmp_path / "ucf"
    (broken / "ucfTrainTestlist").mkdir(parents=True)
    (broken / "ucfTrainTestlist" / "classInd.txt").write_text(
        (tiny_ucf / "ucfTrainTestlist" / "classInd.txt").read_text()
    )
    rel = f"{UCF_CLASSES[1]}/v_{UCF_CLASSES[1]}_g02_c01.avi"
    (broken / "ucfTrainTestlist" / "trainlist01.txt").write_text(f"{rel} 2\n")
    with pytest.raises(DatasetError, match=r"trainlist01.txt names 1 video\(s\) that do not exist.*g02_c01"):
        ucf101_list(broken, "train")
    (broken / "ucfTrainTestlist" / "trainlist01.txt").write_text(f"{rel} 5\n")
    with pytest.raises(DatasetError, match="trainlist01.txt:1: label 5 disagrees with classInd.txt"):
        ucf101_list(broken, "train")
    with pytest.raises(DatasetError, match="testlist01.txt not found"):
        ucf101_list(broken, "test")
    with pytest.raises(DatasetError, match="no \\*_test_split1.txt files"):
        hmdb51_list(tmp_path, "train")


def test_decoding_is_frame_exact_and_windows_decode_only_their_frames(tmp_path):
    path = tmp_path / "ramp.avi"
    frames = _ramp_video(path, 12)
    full = decode_video(str(path))
    assert full.shape == (12, 3, 16, 16) and full.dtype == torch.uint8
    levels = full.float().mean(dim=(1, 2, 3))
    assert torch.allclose(levels, torch.tensor(frames.mean(axis=(1, 2, 3)), dtype=torch.float32), atol=3)
    part = decode_video(str(path), start_frame=5, num_frames=4)
    assert torch.equal(part, full[5:9])


def test_window_indices_loop_short_videos_by_hand():
    idx, looped = window_indices(20, frames=4, stride=3, rng=None)  # span 10, centred start 5
    assert idx.tolist() == [5, 8, 11, 14] and not looped
    idx, looped = window_indices(5, frames=4, stride=2, rng=None)  # span 7 > 5: wrap from frame 0
    assert idx.tolist() == [0, 2, 4, 1] and looped


def test_short_videos_are_looped_and_flagged(tmp_path):
    path = tmp_path / "short.avi"
    _ramp_video(path, 6)
    ds = VideoClips(
        VideoList((VideoItem(str(path), 0),), ("a",), "list"),
        image_size=16,
        window=Window(8, 1),
        cache=True,
    )
    sample = ds[0]
    assert sample.looped and sample.video.shape == (3, 8, 16, 16)
    k = ((sample.video.float().mean(dim=(0, 2, 3)) - 8) / 12).round().long()  # source frame index
    assert k.tolist() == [(int(k[0]) + i) % 6 for i in range(8)]  # consecutive frames, wrapping
    batch = ds.collate([sample, sample])
    assert batch.looped.tolist() == [True, True] and batch.video.shape == (2, 3, 8, 16, 16)


def test_samples_are_a_function_of_seed_epoch_and_index(tiny_ucf):
    ds = VideoClips(ucf101_list(tiny_ucf, "train"), image_size=12, window=Window(6, 1), cache=True)
    a = ds[3].video
    assert torch.equal(a, ds[3].video)
    ds.set_epoch(1)
    assert not torch.equal(a, ds[3].video)
    ds.set_epoch(0)
    assert torch.equal(a, ds[3].video)
    other = with_window(ds, Window(4, 2))
    assert other.window == Window(4, 2) and ds.window == Window(6, 1) and other[0].video.shape[1] == 4
    lazy = VideoClips(ucf101_list(tiny_ucf, "train"), image_size=12, window=Window(6, 1), cache=False)
    assert lazy[3].video.shape == a.shape and lazy[3].label == ds[3].label


def test_undecodable_and_truncated_videos_are_skipped_with_a_counted_warning(tmp_path):
    good, junk, cut = tmp_path / "good.avi", tmp_path / "junk.avi", tmp_path / "cut.avi"
    _ramp_video(good, 12)
    _ramp_video(cut, 40)
    junk.write_bytes(b"not a video" * 20)
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    items = tuple(VideoItem(str(p), 0) for p in (good, junk, cut))
    videos = VideoList(items, ("a",), "my_list.txt")
    ds = VideoClips(videos, image_size=16, window=Window(4, 1), cache=True, max_bad_fraction=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = [ds.full_video(i) for i in range(3)]  # bad files show up when first read
        samples = [ds[i] for i in range(3)]  # ... and are skipped from then on
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    assert [d is None for d in decoded] == [False, True, True] and len(messages) == 2
    assert sorted(ds.bad) == sorted([str(junk), str(cut)])
    assert all(s.video.shape == (3, 4, 16, 16) and s.label == 0 for s in samples)
    assert any("junk.avi" in m and "1 bad video(s) so far in my_list.txt" in m for m in messages)
    assert any("cut.avi" in m and "truncated" in m and "2 bad video(s)" in m for m in messages)
    strict = VideoClips(videos, image_size=16, window=Window(4, 1), cache=True, max_bad_fraction=0.5)
    with pytest.raises(DatasetError, match="2 of 3 videos listed in my_list.txt cannot be decoded"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            [strict[i] for i in range(3)]
    lazy = VideoClips(videos, image_size=16, window=Window(4, 1), cache=False, max_bad_fraction=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = lazy[1]  # junk: replaced by the next decodable video, deterministically
    assert any("junk.avi" in str(w.message) for w in caught)
    assert sample.video.shape == (3, 4, 16, 16) and str(junk) in lazy.bad
