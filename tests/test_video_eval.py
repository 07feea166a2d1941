"""ucf101 / hmdb51 evaluations: clip sampling and score averaging by hand, an oracle encoder on a
dataset whose class is its brightness (expects 100%), fine-tuning, splits, caching, bad settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cropbench.config import from_dict
from cropbench.data.video_synth import UCF_CLASSES, write_video
from cropbench.errors import ConfigError
from cropbench.evaluations.action import (
    ActionSettings,
    clip_starts,
    fit_classifier,
    video_accuracy,
)
from cropbench.evaluations.base import EvalData
from cropbench.registry import BACKBONES, DATASETS, EVALUATIONS

N_CLASSES = 3


class MeanColour(nn.Module):
    """An 'encoder' whose features are the clip's mean channel values (B×3): the oracle here."""

    modality = "video"
    feat_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4)) * self.scale


@pytest.fixture(scope="module")
def brightness_root(tmp_path_factory) -> Path:
    """A tiny UCF101-layout dataset in place of ``synth_ucf101``: class k is grey level 40 + 70k
    (plus noise), 3 groups x 2 clips per class, group g is held out by split g."""
    root = tmp_path_factory.mktemp("data")
    folder = root / DATASETS.get("synth_ucf101").folder_name  # synth_ucf101-v<generator version>
    rng = np.random.default_rng(0)
    classes = UCF_CLASSES[:N_CLASSES]
    rows: dict[int, list[tuple[str, int]]] = {}
    for k, cls in enumerate(classes):
        for g in (1, 2, 3):
            for c in (1, 2):
                rel = f"{cls}/v_{cls}_g{g:02d}_c{c:02d}.avi"
                n = int(rng.integers(10, 20))
                frames = np.clip(40 + 70 * k + rng.normal(0, 10, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
                write_video(folder / "UCF-101" / rel, frames, 25)
                rows.setdefault(g, []).append((rel, k))
    lists = folder / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    for fold in (1, 2, 3):
        train = [r for g, items in rows.items() if g != fold for r in items]
        (lists / f"trainlist0{fold}.txt").write_text("".join(f"{rel} {k + 1}\n" for rel, k in train))
        (lists / f"testlist0{fold}.txt").write_text("".join(f"{rel}\n" for rel, _ in rows[fold]))
    (folder / ".cropbench-complete").write_text("test fixture\n")
    return root


def _settings(**kw: object) -> ActionSettings:
    base = {
        "image_size": 16,
        "crop": 12,
        "frames": 4,
        "stride": 2,
        "test_clips": 3,
        "train_clips": 1,
        "batch_size": 8,
        "svm_c": 1.0,
    }
    return from_dict(EVALUATIONS.get("ucf101").Settings, {**base, **kw})


def test_clip_starts_follow_the_constant_clips_rule_by_hand():
    assert clip_starts(40, 10, 3) == [0, 10, 20]  # k·(40 − 10)/3
    assert clip_starts(25, 10, 4) == [0, 3, 7, 11]  # floor(k·15/4)
    assert clip_starts(8, 10, 3) == [0, 0, 0]  # shorter than the clip: all start at 0 (looped)


def test_video_accuracy_averages_views_before_the_argmax():
    video0 = [
        [0.9, 0.1],
        [0.2, 0.8],
        [0.3, 0.7],
    ]  # label 1: views say 0, 1, 1; mean (.47, .53) -> 1
    video1 = [[0.6, 0.4], [0.6, 0.4], [0.0, 1.0]]  # label 0: views say 0, 0, 1; mean (.4, .6) -> 1
    out = video_accuracy(torch.tensor([video0, video1]), torch.tensor([1, 0]))
    assert out["top1"] == pytest.approx(50.0)  # one of two videos
    assert out["clip_top1"] == pytest.approx(100 * 4 / 6)  # four of six views


def test_classifiers_separate_separable_features():
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 5) * 0.1 + torch.nn.functional.one_hot(y, 3).float().repeat(1, 2)[:, :5] * 3
    for clf in ("svm", "logistic"):
        score = fit_classifier(x, y, 3, _settings(classifier=clf), seed=0)
        assert (score(x).argmax(dim=1) == y).float().mean() == 1.0


def test_an_oracle_encoder_scores_100_on_every_split(brightness_root, tmp_path):
    data = EvalData(brightness_root, cache_dir=tmp_path / "cache", log=lambda m: None)
    ev = EVALUATIONS.get("ucf101")
    out = ev.evaluate(MeanColour(), _settings(split="all", test_crops=3), data)
    assert out["top1"] == 100.0 and out["clip_top1"] == 100.0
    assert {out["top1_split1"], out["top1_split2"], out["top1_split3"]} == {100.0}
    logs: list[str] = []
    again = ev.evaluate(
        MeanColour(),
        _settings(split="2", test_crops=3, classifier="logistic"),  # the classifier is not cached
        EvalData(brightness_root, cache_dir=tmp_path / "cache", log=logs.append),
    )
    assert again["top1"] == 100.0 and any("cached features" in m for m in logs)


def test_a_constant_encoder_is_at_chance(brightness_root):
    class Constant(MeanColour):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 3) + self.scale

    out = EVALUATIONS.get("ucf101").evaluate(Constant(), _settings(), EvalData(brightness_root, log=lambda m: None))
    assert out["top1"] == pytest.approx(100 / N_CLASSES)


def test_finetuning_trains_a_copy_and_leaves_the_encoder_alone(brightness_root):
    torch.manual_seed(0)
    enc = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    s = _settings(mode="finetune", ft_epochs=2, ft_batch=4, ft_lr=0.05)
    out = EVALUATIONS.get("ucf101").evaluate(enc, s, EvalData(brightness_root, log=lambda m: None))
    assert set(out) == {"top1", "clip_top1"} and 0 <= out["top1"] <= 100
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert enc.training  # mode restored


def test_bad_settings_and_encoders_are_clear_errors(brightness_root):
    with pytest.raises(ConfigError, match=r"crop \(40\) must be <= image_size \(32\)"):
        _settings(crop=40, image_size=32)
    with pytest.raises(ConfigError, match="split: expected one of"):
        _settings(split="4")
    image_encoder = BACKBONES.get("resnet_micro")()
    with pytest.raises(ConfigError, match="expected a video encoder"):
        EVALUATIONS.get("hmdb51").evaluate(image_encoder, _settings(), EvalData(brightness_root))


def _naive_tf_colour(clip: np.ndarray, delta: float, sat: float, con: float, hue: float) -> np.ndarray:
    """Per-pixel transcription of deepmind/brave@0ae20d9 brave/datasets/augmentations.py
    ``_color_default_augm.color_augment`` (TF ops: random_brightness, random_saturation,
    random_contrast, random_hue, clip), with colorsys for TF's HSV round trips. clip: 3×T×H×W."""
    import colorsys

    x = clip.astype(np.float64) + delta
    _, t, h, w = x.shape
    for i in range(t):
        for yy in range(h):
            for xx in range(w):
                hh, ss, vv = colorsys.rgb_to_hsv(*x[:, i, yy, xx])
                x[:, i, yy, xx] = colorsys.hsv_to_rgb(hh, min(max(ss * sat, 0.0), 1.0), vv)
    mean = x.mean(axis=(2, 3), keepdims=True)  # tf.image.adjust_contrast: per image and channel
    x = (x - mean) * con + mean
    for i in range(t):
        for yy in range(h):
            for xx in range(w):
                hh, ss, vv = colorsys.rgb_to_hsv(*x[:, i, yy, xx])
                x[:, i, yy, xx] = colorsys.hsv_to_rgb((hh + hue) % 1.0, ss, vv)
    return np.clip(x, 0.0, 1.0)


def test_brave_colour_ops_match_a_per_pixel_transcription_of_tf():
    from cropbench.evaluations.action import brave_color_ops

    g = torch.Generator().manual_seed(0)
    x = 0.15 + 0.7 * torch.rand(3, 3, 2, 4, 5, generator=g, dtype=torch.float64)  # B×3×T×H×W
    delta = torch.tensor([0.1, -0.12, 0.03], dtype=torch.float64)
    sat = torch.tensor([1.4, 0.6, 1.1], dtype=torch.float64)  # 1.4 clips some saturations at 1
    con = torch.tensor([0.7, 1.35, 1.0], dtype=torch.float64)
    hue = torch.tensor([0.17, -0.2, 0.05], dtype=torch.float64)
    out = brave_color_ops(x, delta, sat, con, hue)
    for b in range(3):
        ref = _naive_tf_colour(x[b].numpy(), *(float(v[b]) for v in (delta, sat, con, hue)))
        assert np.allclose(out[b].numpy(), ref, atol=1e-9), b
    # a broken variant fails: contrast before saturation (torchvision's order) differs
    swapped = out.clone()
    for b in range(3):
        y = x[b : b + 1] + delta[b]
        m = y.mean(dim=(3, 4), keepdim=True)
        y = (y - m) * con[b] + m
        from cropbench.evaluations.action import tf_adjust_saturation
        from cropbench.views.image import adjust_hue

        swapped[b] = adjust_hue(tf_adjust_saturation(y, sat[b : b + 1]), hue[b : b + 1]).clamp(0, 1)[0]
    assert (swapped - out).abs().max() > 1e-3


def test_brave_colour_augment_probabilities_and_linear_mode_only():
    """p(colour) = 0.8 and p(grey) = 0.2 per clip (binomial, n = 4000: 4 sd = 0.025); every frame
    of a clip gets the same draw; fine-tuning clips get no colour augmentation."""
    from cropbench.evaluations.action import brave_color_augment

    n = 4000
    g = torch.Generator().manual_seed(1)
    base = torch.tensor([0.6, 0.3, 0.2]).view(1, 3, 1, 1, 1).expand(n, 3, 2, 1, 1).contiguous()
    out = brave_color_augment(base, g)
    grey = (out.amax(dim=1) - out.amin(dim=1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    changed = (out - base).abs().amax(dim=(1, 2, 3, 4)) > 1e-6
    assert abs(grey.float().mean().item() - 0.2) < 0.025
    assert abs(changed[~grey].float().mean().item() - 0.8) < 0.03
    assert torch.allclose(out[:, :, 0], out[:, :, 1])  # one draw for all frames of a clip


def test_linear_training_clips_are_colour_augmented_finetune_clips_are_not(brightness_root, monkeypatch):
    import cropbench.evaluations.action as action
    from cropbench.data import build_dataset

    calls = []
    real = action.brave_color_augment
    monkeypatch.setattr(action, "brave_color_augment", lambda x, g: calls.append(x.shape) or real(x, g))
    for mode in ("linear", "finetune"):
        s = ActionSettings(mode=mode, image_size=16, crop=12, frames=4, stride=1, batch_size=64, ft_batch=64)
        ds = build_dataset("synth_ucf101", "train1", brightness_root, image_size=16)
        views = next(action.train_batches(ds, s, 0, torch.Generator().manual_seed(0), shuffle=False)).views
        assert views.shape[1:] == (3, 4, 12, 12)
        assert len(calls) == 1  # linear: once; finetune: not again
