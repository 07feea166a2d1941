"""Embedded videos: the class shows in an appearance that persists through the clip, the group's
look is shared by its clips of every class, and renders are a pure function of the seed.

The texture statistic is written here from scratch (a radial power spectrum of each grey frame),
not from the generator's code: it does not know where the object is or which texture it wears.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cropbench.data import dataset_folder
from cropbench.data import video_synth as vs
from cropbench.registry import DATASETS

# The UCF101-like set (no distractors, little noise) with short clips to keep the test fast.
CFG = vs.SynthVideoConfig(noise=3.0, distractors=0, frames=(16, 16))
TRAIN_GROUPS, TEST_GROUPS = range(4, 10), range(1, 4)  # held-out groups, as UCF101 split 1


def radial_spectrum(frames: np.ndarray) -> np.ndarray:
    """T×H×W×3 uint8 -> T×B log share of each frame's grey-level power in integer radial
    frequency bands 3..H/2 (cycles per frame; bands 0-2 hold the background's gradient and
    waves). Invariant to where the object is and how it is turned."""
    grey = frames.astype(np.float32).mean(-1)
    grey -= grey.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(grey)) ** 2
    n = grey.shape[-1]
    f = np.fft.fftfreq(n) * n
    band = np.minimum(np.round(np.hypot(f[:, None], f[None, :])).astype(int), n // 2).ravel()
    hist = np.stack([np.bincount(band, weights=p.ravel(), minlength=n // 2 + 1) for p in power])[:, 3:]
    return np.log(hist / hist.sum(1, keepdims=True) + 1e-6)


def spectra(groups: range) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame spectra (G·10)×T×B of clip 1 of every class of ``groups``, and their classes."""
    x, y = [], []
    for g in groups:
        look = vs.group_look(CFG, "ucf", g)
        for a in range(len(vs.ACTIONS)):
            x.append(radial_spectrum(vs.render_video(vs.clip_rng(CFG, "ucf", a, g, 1), a, look, CFG)))
            y.append(a)
    return np.stack(x), np.array(y)


def held_out_frame_accuracy() -> tuple[float, float]:
    """Nearest class centroid (standardised spectra) fitted on every frame of the training
    groups; accuracy on single frames of the held-out groups, first half and second half of the
    clips apart."""
    xtr, ytr = spectra(TRAIN_GROUPS)
    xte, yte = spectra(TEST_GROUPS)
    frames = xtr.reshape(-1, xtr.shape[-1])
    mu, sd = frames.mean(0), frames.std(0) + 1e-6
    centroids = np.stack([((xtr[ytr == c] - mu) / sd).mean((0, 1)) for c in range(len(vs.ACTIONS))])
    dist = ((((xte - mu) / sd)[:, :, None] - centroids) ** 2).sum(-1)  # clips×T×classes
    right = dist.argmin(-1) == yte[:, None]
    half = right.shape[1] // 2
    return float(right[:, :half].mean()), float(right[:, half:].mean())


def test_class_texture_tells_held_out_groups_apart_in_every_part_of_the_clip():
    """Chance is 0.10. Measured (first half, second half of the clips) for seeds 0-2 of the
    config: (0.35, 0.36), (0.48, 0.49), (0.46, 0.43); with one texture for every class (version
    1's motion-only classes, below): (0.18, 0.17), (0.13, 0.16), (0.15, 0.13): motion alone (mask
    size, blinking) moves it a little. The bounds sit between the two ranges."""
    first, second = held_out_frame_accuracy()
    assert first > 0.25 and second > 0.25, (first, second)


def test_motion_only_classes_fail_the_texture_statistic(monkeypatch):
    """The statistic can fail: one texture family for every class (version 1 had the texture per
    group, i.e. independent of the class) leaves it near chance."""
    monkeypatch.setattr(vs, "texture_family", lambda action: 2)
    first, second = held_out_frame_accuracy()
    assert first < 0.22 and second < 0.22, (first, second)


def colour_spread(look_of: Callable[[int, int], vs.Look]) -> tuple[float, float]:
    """Std of the clip-mean colour across the classes of a group (mean over groups) and across
    the groups' means, 0-255 scale; ``look_of(group, action)`` gives the look a clip wears."""
    means = np.array(
        [
            [
                vs.render_video(vs.clip_rng(CFG, "ucf", a, g, 1), a, look_of(g, a), CFG).reshape(-1, 3).mean(0)
                for a in range(len(vs.ACTIONS))
            ]
            for g in range(1, 10)
        ]
    )
    return float(means.std(1).mean()), float(means.mean(1).std(0).mean())


def test_a_groups_scene_is_shared_by_its_clips_of_every_class(monkeypatch):
    """With the object hidden, the clip-mean colour (the group's background: gradient colours and
    layout) is the same for every class of a group up to the pixel noise and differs between
    groups. Measured (seed 0): within-group std 0.01, between-group std 63; a look per (group,
    class) instead (the negative control) gives within 48."""
    hidden = lambda look, pose, size, tile: (np.zeros((len(pose["cx"]), size, size), bool), 0.0)  # noqa: E731
    monkeypatch.setattr(vs, "_object_layer", hidden)
    within, between = colour_spread(lambda g, a: vs.group_look(CFG, "ucf", g))
    assert within < 2 and between > 25, (within, between)
    within, _ = colour_spread(lambda g, a: vs.group_look(CFG, "ucf", 100 * g + a))
    assert within > 20, within


def test_object_colours_are_a_clip_nuisance():
    """The object's colours are drawn per clip (hue jitter makes colour no class cue and, per
    clip, no group shortcut for clip contrast): two clips of one class and group differ in them."""
    look = vs.group_look(CFG, "ucf", 1)
    a, b = (vs.clip_look(vs.clip_rng(CFG, "ucf", 3, 1, c), look) for c in (1, 2))
    assert not np.allclose(a.fg, b.fg) and (a.bg0 == b.bg0).all() and a.shape == b.shape


def test_texture_moves_with_the_object():
    """A sliding object keeps its texture: the object pixels of frame t+1 are those of frame t
    shifted by the motion (the texture is drawn in the object's frame, not the canvas')."""
    look = vs.Look(
        fg=np.full(3, 250, np.float32),
        fg2=np.full(3, 10, np.float32),
        bg0=np.zeros(3, np.float32),
        bg1=np.zeros(3, np.float32),
        shape=1,
        period=0.15,
        radius=0.26,
        aspect=1.4,
        scene=0,
        start=(0.5, 0.5),
        angle=0.0,
    )
    size = 48
    tile = vs.texture_tile(np.random.default_rng(0), 2, look, size)  # checkerboard
    pose = {
        "cx": np.array([20.0, 23.0], np.float32),
        "cy": np.full(2, 24.0, np.float32),
        "scale": np.ones(2, np.float32),
        "angle": np.zeros(2, np.float32),
        "visible": np.ones(2, bool),
    }
    mask, colour = vs._object_layer(look, pose, size, tile)
    inner = mask[0] & np.roll(mask[1], -3, axis=1)
    assert inner.sum() > 200
    assert np.array_equal(colour[0][inner], np.roll(colour[1], -3, axis=1)[inner])
    assert 0.3 < (colour[0][inner][:, 0] > 128).mean() < 0.7  # a checkerboard, not a flat patch


@pytest.mark.parametrize("dataset", ["ucf", "hmdb"])
def test_renders_are_a_pure_function_of_the_seed(dataset):
    cfg = vs.SynthVideoConfig(size=16, frames=(8, 8), seed=3)
    a = vs.render_video(vs.clip_rng(cfg, dataset, 7, 2, 1), 7, vs.group_look(cfg, dataset, 2), cfg)
    b = vs.render_video(vs.clip_rng(cfg, dataset, 7, 2, 1), 7, vs.group_look(cfg, dataset, 2), cfg)
    c = vs.render_video(vs.clip_rng(cfg, dataset, 7, 2, 2), 7, vs.group_look(cfg, dataset, 2), cfg)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ------------------------------------------------------------------ the data folder follows the version


@pytest.mark.parametrize("name", ["synth_ucf101", "synth_hmdb51"])
def test_embedded_video_folders_carry_the_generator_version(name):
    """The folder name holds ``VIDEO_GENERATOR_VERSION`` (as the image sets' hold theirs), so a
    changed generator never reads videos an older one wrote (before, both folders had no version)."""
    spec = DATASETS.get(name)
    assert spec.version == str(vs.VIDEO_GENERATOR_VERSION)
    assert spec.folder_name == f"{name}-v{vs.VIDEO_GENERATOR_VERSION}"


def test_a_changed_generator_version_lands_in_a_new_folder(tmp_path, monkeypatch):
    """Data written by version N is reused by version N and never by version N + 1, which
    generates its own folder next to it; without a version (the specs before this fix) every
    generator reads the one folder written first."""
    spec = DATASETS.get("synth_ucf101")
    written: list[Path] = []

    def fake_writer(folder: Path) -> None:
        written.append(folder)
        (folder / "marker").write_text(str(len(written)))

    def folder_at(version: str) -> Path:
        monkeypatch.setitem(DATASETS._items, "synth_ucf101", replace(spec, synthesize=fake_writer, version=version))
        return dataset_folder("synth_ucf101", tmp_path)

    old = folder_at("1")
    assert folder_at("1") == old and len(written) == 1  # same version: reused
    new = folder_at("2")
    assert new != old and new.name == "synth_ucf101-v2" and len(written) == 2
    assert (old / "marker").read_text() == "1" and (new / "marker").read_text() == "2"
    unversioned = folder_at("")  # the old specs: one folder, whatever the generator
    assert unversioned.name == "synth_ucf101" and folder_at("") == unversioned and len(written) == 3
