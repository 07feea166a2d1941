"""The cluttered image set ``synth_clutter``: the same generator as ``synth_images`` with a smaller
main object and two distractor objects of other texture classes.

Checked here: the scenes carry the structure the config names (a label-class main object that
stays the largest visible object, distractors of other classes, areas in their ranges), the
default ``synth_images`` scenes are unchanged by the variant, and the registered dataset is written
in the ImageFolder layout with the class balance the evaluations assume.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cropbench.data import DATASETS, build_dataset, dataset_folder
from cropbench.data.synth import CLASSES, CLUTTER_CONFIG, GENERATOR_VERSION, SynthImagesConfig, render_scene, scene_rng
from cropbench.errors import DatasetError


def _scene(cfg: SynthImagesConfig, index: int, split: str = "train"):
    label = index % len(CLASSES)
    rng = scene_rng(cfg.seed, split, index)
    return render_scene(rng, cfg.image_size, label, cfg.n_distractors, cfg.main_area, cfg.distractor_area)


def test_clutter_scenes_have_a_main_object_and_two_distractors_of_other_classes() -> None:
    n, size = 200, CLUTTER_CONFIG.image_size
    main_frac, n_instances, largest = [], [], 0
    for i in range(n):
        scene = _scene(CLUTTER_CONFIG, i)
        main, *distractors = scene.instances
        assert scene.label == i % len(CLASSES) and main.category == scene.label
        assert all(d.category != scene.label for d in distractors)
        last = distractors[-1].mask.sum() / size**2  # drawn last, never occluded: its whole area shows
        assert 0.5 * CLUTTER_CONFIG.distractor_area[0] < last < 1.5 * CLUTTER_CONFIG.distractor_area[1]
        main_frac.append(main.mask.sum() / size**2)
        n_instances.append(len(scene.instances))
        largest += int(all(main.mask.sum() > d.mask.sum() for d in distractors))
    lo, hi = CLUTTER_CONFIG.main_area
    # occlusion by the distractors only removes area; shape kinds other than ellipses add some
    assert lo - 2 * CLUTTER_CONFIG.distractor_area[1] < np.mean(main_frac) < hi
    assert np.mean(n_instances) > 2.8  # a distractor is fully hidden only when another covers it
    assert largest / n > 0.9


# sha256 of the first 10 train and 10 val default scenes (generator v2), computed with the generator
# as it was before the clutter variant existed (commit 819f757): the micro goldens were made on them.
DEFAULT_SCENES_SHA256 = "7c1fb9abd7b4596af17d092a37bad2e0ef45875159ca4e59da1c516ce8038217"


def test_default_scenes_are_untouched_by_the_clutter_variant() -> None:
    default = SynthImagesConfig()
    assert GENERATOR_VERSION == 2, "a new generator version needs a new DEFAULT_SCENES_SHA256"
    digest = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(10):
            scene = _scene(default, i, split)
            assert len(scene.instances) == 1
            assert not np.array_equal(scene.image, _scene(CLUTTER_CONFIG, i, split).image)
            digest.update(scene.image.tobytes())
    assert digest.hexdigest() == DEFAULT_SCENES_SHA256


def test_registered_dataset_is_written_in_imagefolder_layout(tmp_path: Path) -> None:
    spec = DATASETS.get("synth_clutter")
    assert spec.synthetic and spec.num_classes == len(CLASSES)
    train = build_dataset("synth_clutter", "train", data_root=tmp_path, scale="micro")
    val = build_dataset("synth_clutter", "val", data_root=tmp_path, scale="micro")
    assert len(train) == CLUTTER_CONFIG.train_per_class * len(CLASSES)
    assert len(val) == CLUTTER_CONFIG.val_per_class * len(CLASSES)
    folder = dataset_folder("synth_clutter", tmp_path)
    for split, per_class in (("train", CLUTTER_CONFIG.train_per_class), ("val", CLUTTER_CONFIG.val_per_class)):
        for name in CLASSES:
            assert len(list((folder / split / name).glob("*.png"))) == per_class
    for i in (0, 7, 13):  # the files are the clutter scenes, not the default ones
        written = np.asarray(Image.open(folder / "train" / CLASSES[i % len(CLASSES)] / f"{i:06d}.png"))
        assert np.array_equal(written, _scene(CLUTTER_CONFIG, i).image)
    image, label, index = train[3]
    assert image.shape[-2:] == (CLUTTER_CONFIG.image_size,) * 2 and 0 <= label < len(CLASSES) and index == 3


def test_clutter_is_micro_only(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="synth_clutter"):
        build_dataset("synth_clutter", "train", data_root=tmp_path, scale="small", field="data.dataset")
