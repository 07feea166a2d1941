"""View generators (``cropbench.views.generators`` and the mechanism modules' generators) against
hand-computed references, their selection from a recipe, and the method-class shape rules.

References: RegionCL's swap is the official ``RegionCLM.py`` cut-and-paste
[REPO Annbless/RegionCL@61bbcab RegionCLM.py] written here as a per-sample, per-pixel loop;
BYOL's asymmetry is its Table 6 (view 1: blur p 1, solarize p 0; view 2: blur 0.1, solarize 0.2)
[deepmind-research@3d8692e byol/utils/augmentations.py]; BraVe's aligned starts are the released
``brave/datasets/sampling.py`` [google-deepmind/brave@1ae5f0a] (the broad window starts where the
narrow clip starts).
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from cropbench.config import from_dict
from cropbench.data.images import IMAGENET_MEAN, IMAGENET_STD
from cropbench.dist import DistContext
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.methods.cyborgs import MaskedViews
from cropbench.methods.paramcrop import CubeConfig, CubeViews
from cropbench.methods.regioncl import RegionSwapViews
from cropbench.recipe import SCALES, Recipe, list_entries, load_entry
from cropbench.registry import BACKBONES, METHODS
from cropbench.runner import build_method, method_from_params, resolved_config
from cropbench.types import ImageBatch, VideoBatch
from cropbench.views.generators import (
    VIEW_GENERATORS,
    AsymmetricConfig,
    AsymmetricPair,
    BroadClip,
    ClipConfig,
    ClipViews,
    NarrowBroad,
    NarrowBroadConfig,
    PairViews,
    SingleView,
    build_views,
)
from cropbench.views.image import ViewConfig
from cropbench.views.video import VideoViewConfig

# identity geometry and colour: the view is the whole canvas, resized by 1 (size = canvas side)
PLAIN = ViewConfig(
    size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0
)


def _images(n: int = 4, side: int = 16, seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    return ImageBatch(images, torch.arange(n), torch.arange(n))


def _by_hand(images: torch.Tensor, solarized: bool = False) -> torch.Tensor:
    """x/255, optionally solarised (x >= 0.5 -> 1 - x), then ImageNet mean/std: per channel by hand."""
    x = images.double() / 255
    if solarized:
        x = torch.where(x >= 0.5, 1 - x, x)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.double).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.double).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


def test_pair_and_single_give_their_count_of_whole_canvas_views_by_hand() -> None:
    batch = _images()
    pair = PairViews(PLAIN)(batch, torch.Generator().manual_seed(0))
    (single,) = SingleView(PLAIN)(batch, torch.Generator().manual_seed(0))
    assert len(pair) == 2
    for v in (*pair, single):
        assert torch.equal(v.prov.boxes, torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(4, 4))
        torch.testing.assert_close(v.tensor, _by_hand(batch.images), atol=1e-5, rtol=0)


def test_pair_draws_its_views_one_after_the_other_from_one_generator() -> None:
    """Two views of a random-crop config differ, and the pair is reproducible from the seed."""
    cfg = ViewConfig(size=8)
    a = PairViews(cfg)(_images(), torch.Generator().manual_seed(3))
    b = PairViews(cfg)(_images(), torch.Generator().manual_seed(3))
    assert not torch.equal(a[0].prov.boxes, a[1].prov.boxes)
    assert all(torch.equal(x.tensor, y.tensor) for x, y in zip(a, b, strict=True))


def test_asymmetric_pair_solarises_only_the_view_byol_solarises() -> None:
    """BYOL Table 6 with blur off: (blur, solarize) = (0, 0) and (0, 1) -> plain and solarised views."""
    batch = _images()
    gen = AsymmetricPair(AsymmetricConfig(PLAIN, blur_p=(0.0, 0.0), solarize_p=(0.0, 1.0)))
    v1, v2 = gen(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v1.tensor, _by_hand(batch.images), atol=1e-5, rtol=0)
    torch.testing.assert_close(v2.tensor, _by_hand(batch.images, solarized=True), atol=1e-5, rtol=0)
    default = AsymmetricPair(AsymmetricConfig())
    assert [(c.blur_p, c.solarize_p) for c in default.configs] == [(1.0, 0.0), (0.1, 0.2)]
    with pytest.raises(ConfigError, match=r"views.blur_p and views.solarize_p: one value per view"):
        AsymmetricPair(AsymmetricConfig(blur_p=(1.0,), solarize_p=(0.0, 0.2)))


def _video(n: int = 3, window: int = 32, side: int = 24, seed: int = 0) -> VideoBatch:
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (n, 3, window, side, side), dtype=torch.uint8, generator=g)
    return VideoBatch(video, torch.arange(n), torch.arange(n), looped=torch.zeros(n, dtype=torch.bool))


def _start(prov) -> torch.Tensor:  # noqa: ANN001
    """Clip start frame from the time window: t0 = start + 0.5 - stride / 2 (frame_interval)."""
    return prov.extra["time"][:, 0]


def test_clip_pair_shared_start_gives_one_time_window_and_separate_starts_otherwise() -> None:
    clip = VideoViewConfig(frames=4, stride=2, image=ViewConfig(size=16, blur_p=0.0))
    batch = _video(n=16)
    q, k = ClipViews(ClipConfig(clip, shared_start=True))(batch, torch.Generator().manual_seed(0))
    assert torch.equal(q.prov.extra["time"], k.prov.extra["time"])
    q, k = ClipViews(ClipConfig(clip))(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(_start(q.prov), _start(k.prov))
    # every clip lies in the window: start in [0, window - span], span = (4 - 1) * 2 + 1 = 7
    for v in (q, k):
        start = _start(v.prov) - 0.5 + 1.0  # t0 = start + 0.5 - stride / 2
        assert start.min() >= 0 and start.max() <= 32 - 7 and v.tensor.shape == (16, 3, 4, 16, 16)
    gen = ClipViews(ClipConfig(clip, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)))
    assert [(c.image.blur_p, c.image.solarize_p) for c in gen.configs] == [(1.0, 0.0), (0.1, 0.2)]
    assert gen.span == 7 and gen.modality == "video"


def test_narrow_broad_views_start_together_and_a_diff_view_is_the_frame_difference() -> None:
    narrow = VideoViewConfig(frames=4, stride=2, image=ViewConfig(size=16, blur_p=0.0))
    broad = VideoViewConfig(frames=6, stride=3, image=ViewConfig(size=8, blur_p=0.0))
    rgb = NarrowBroad(NarrowBroadConfig(narrow, (BroadClip(broad),)))
    diff = NarrowBroad(NarrowBroadConfig(narrow, (BroadClip(broad, "diff"),)))
    assert diff.span == (7 - 1) * 3 + 1 and rgb.span == (6 - 1) * 3 + 1
    batch = _video(n=8, window=40)
    n_v, b_v = rgb(batch, torch.Generator().manual_seed(2))
    # same start frame: t0 + stride / 2 - 0.5 is the start of each clip
    torch.testing.assert_close(_start(n_v.prov) + 1 - 0.5, _start(b_v.prov) + 1.5 - 0.5)
    assert b_v.tensor.shape == (8, 3, 6, 8, 8) and n_v.tensor.shape == (8, 3, 4, 16, 16)
    _, d_v = diff(batch, torch.Generator().manual_seed(2))
    # the diff view: a 7-frame clip cut with the same draws, then x[t + 1] - x[t] frame by frame
    seven = NarrowBroad(NarrowBroadConfig(narrow, (BroadClip(VideoViewConfig(7, 3, broad.image)),)))
    _, full = seven(batch, torch.Generator().manual_seed(2))
    ref = torch.stack([full.tensor[:, :, t + 1] - full.tensor[:, :, t] for t in range(6)], dim=2)
    torch.testing.assert_close(d_v.tensor, ref)
    with pytest.raises(ConfigError, match="views.broad"):
        NarrowBroad(NarrowBroadConfig(narrow, ()))


def _naive_swap(x: torch.Tensor, box: list[int], partner: list[int]) -> torch.Tensor:
    """Per sample, per pixel: inside the box, image i takes image partner[i]'s pixel."""
    out = x.clone()
    x0, y0, x1, y1 = box
    for i, j in enumerate(partner):
        for yy in range(y0, y1):
            for xx in range(x0, x1):
                out[i, :, yy, xx] = x[j, :, yy, xx]
    return out


@pytest.mark.parametrize("n", [4, 5])
def test_region_swap_wraps_its_pair_and_pastes_the_partners_box_per_sample(n: int) -> None:
    stride, cells = 4, (1, 3)
    inner = PairViews(ViewConfig(size=16, blur_p=0.0))
    batch = _images(n=n, side=24)
    v1, v2, mix = RegionSwapViews(inner, stride, cells)(batch, torch.Generator().manual_seed(5))
    r1, r2 = inner(batch, torch.Generator().manual_seed(5))  # the wrapped pair comes first
    assert torch.equal(v1.tensor, r1.tensor) and torch.equal(v2.tensor, r2.tensor)
    box = mix.prov.extra["region_box"][0].tolist()
    partner = mix.prov.extra["partner"].tolist()
    # official partner: the reversed batch; odd B: cyclic shift (no image is its own partner)
    assert partner == (list(range(n - 1, -1, -1)) if n % 2 == 0 else [(i + 1) % n for i in range(n)])
    w, h = box[2] - box[0], box[3] - box[1]
    assert all(c % stride == 0 for c in box) and stride * cells[0] <= min(w, h) and max(w, h) < stride * cells[1]
    assert torch.equal(mix.tensor, _naive_swap(v1.tensor, box, partner))
    assert not torch.equal(mix.tensor, _naive_swap(v1.tensor, box, list(range(n))))  # the check can fail


def test_region_swap_needs_a_stride_from_the_recipe() -> None:
    with pytest.raises(ConfigError, match="region_swap needs a backbone with an output stride"):
        build_views({"generator": "region_swap"}, stride=None)
    gen = build_views({"generator": "region_swap", "views": {"size": 32}, "cells": [1, 3]}, stride=8)
    assert isinstance(gen, RegionSwapViews) and gen.stride == 8 and gen.cells == (1, 3)


def test_cyborgs_masks_are_data_cut_with_each_views_geometry() -> None:
    batch = _images(n=2)
    gen = MaskedViews(AsymmetricPair(AsymmetricConfig(PLAIN, (0.0, 0.0), (0.0, 0.0))))
    assert all("mask" not in v.prov.extra for v in gen(batch, torch.Generator().manual_seed(0)))
    masks = torch.arange(16).view(1, 1, 16).expand(2, 16, 16).clone()  # id = column
    batch.masks = masks
    for v in gen(batch, torch.Generator().manual_seed(0)):  # whole-canvas views: the mask itself
        assert torch.equal(v.prov.extra["mask"], masks)


def test_paramcrop_cube_is_a_module_the_method_optimises_and_logs_per_epoch() -> None:
    cube = CubeViews(from_dict(CubeConfig, {"clip": {"image": {"size": 16}}, "noise_dim": 4, "crop_hidden": 8}))
    assert sum(p.numel() for p in cube.parameters()) == (4 * 8 + 8) + (8 * 12 + 12)  # noise->hidden->2×6
    q, k = cube(_video(n=4), torch.Generator().manual_seed(0))
    assert q.tensor.shape == (4, 3, 8, 16, 16) and q.prov.boxes.requires_grad is False
    logs = cube.epoch_logs(DistContext())
    assert set(logs) == {"view_iou", "view_centre_distance"} and cube.epoch_logs(DistContext()) == {}
    assert cube.epoch_curves[0].file == "paramcrop_views.png"


# ------------------------------------------------------------------------ recipe selection


def test_unknown_generator_or_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml: params.views.generator: unknown view generator 'pairs'"):
        build_views({"generator": "pairs"}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: params.views.sise: unknown key"):
        build_views({"generator": "pair", "sise": 32}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"params.views.blur_pp: unknown key"):
        build_views({"generator": "asymmetric_pair", "blur_pp": [1, 1]})
    with pytest.raises(ConfigError, match="a 'generator' key"):
        build_views({"size": 32})
    assert {"pair", "single", "asymmetric_pair", "clip_pair", "narrow_broad", "region_swap"} <= set(
        VIEW_GENERATORS.names()
    )
    assert {"paramcrop_cube", "cyborgs_masks"} <= set(VIEW_GENERATORS.names())


TINY = {
    "method": "simclr",
    "backbone": "resnet_micro",
    "backbone_args": {"widths": [8, 8, 16, 16]},
    "params": {"hidden_dim": 16, "out_dim": 8},
}


def test_a_recipe_that_names_a_generator_gets_it_and_records_it() -> None:
    views = {"generator": "asymmetric_pair", "views": {"size": 16}, "blur_p": [0.0, 1.0], "solarize_p": [0.0, 0.0]}
    recipe = from_dict(Recipe, {**TINY, "params": {**TINY["params"], "views": views}})
    method = build_method(recipe, MethodContext(), "t.yaml")
    assert isinstance(method.views, AsymmetricPair) and method.views.configs[1].blur_p == 1.0
    config = resolved_config(recipe, "t.yaml")
    assert config["views"]["generator"] == "asymmetric_pair" and config["views"]["views"]["size"] == 16
    assert config["temperature"] == 0.1  # the method's own Config, defaults filled in
    plain = from_dict(Recipe, {**TINY, "params": {**TINY["params"], "views": {"size": 16}}})
    assert isinstance(build_method(plain, MethodContext()).views, PairViews)  # the method's default_views
    bad = from_dict(Recipe, {**TINY, "params": {**TINY["params"], "views": {"generator": "nope"}}})
    with pytest.raises(ConfigError, match=r"t.yaml: params.views.generator: unknown view generator 'nope'"):
        build_method(bad, MethodContext(), "t.yaml")


def test_a_learned_generator_from_the_recipe_is_trained_with_the_method() -> None:
    views = {"generator": "paramcrop_cube", "clip": {"image": {"size": 16}}}
    recipe = from_dict(
        Recipe,
        {"method": "vsimclr", "backbone": "r3d_micro", "backbone_args": {"widths": [8, 8, 16, 16]},
         "params": {"hidden_dim": 16, "out_dim": 8, "views": views}},
    )  # fmt: skip
    method = build_method(recipe, MethodContext())
    cube = {id(p) for p in method.views.parameters()}
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert cube and cube <= trained and method.epoch_curves == CubeViews.epoch_curves


# ------------------------------------------------------------------------ method-class shape


def _project_classes(cls: type) -> list[type]:
    return [k for k in cls.__mro__ if k.__module__.startswith("cropbench.")]


def test_no_method_class_is_more_than_three_project_classes_deep() -> None:
    """SSLMethod counts: e.g. HoughCL -> MoCoV2 -> SSLMethod (DenseCL's dense part is composed)."""
    deep = {n: [k.__name__ for k in _project_classes(METHODS.get(n))] for n in METHODS.names()}
    assert {n: chain for n, chain in deep.items() if len(chain) > 3} == {}
    assert deep["houghcl"] == ["HoughCL", "MoCoV2", "SSLMethod"]


def test_no_method_overrides_view_making_and_none_has_a_mixin() -> None:
    for name in METHODS.names():
        for k in _project_classes(METHODS.get(name)):
            assert k is SSLMethod or "make_views" not in vars(k), (name, k.__name__)
            assert issubclass(k, SSLMethod), f"{name}: {k.__name__} is a mixin"


BRAVE_TINY = {  # BraVe's generator has no default broad view: one, with its backbone
    "views": {"broad": [{"view": {"frames": 4, "stride": 2, "image": {"size": 16}}}]},
    "broad_backbones": [{"backbone_args": {"widths": [8, 8, 16, 16]}}],
}


def test_every_registered_method_builds_with_its_default_generator_name() -> None:
    """A recipe whose ``params.views`` names no generator gets the method's ``default_views``."""
    for name in METHODS.names():
        cls = METHODS.get(name)
        video = cls.modality == "video"
        backbone = BACKBONES.get("r3d_micro" if video else "resnet_micro")(widths=(8, 8, 16, 16))
        params = BRAVE_TINY if name == "brave" else {}
        params |= {"drop": 2} if name == "videomoco" else {}  # its default drops 8 of 32 frames
        m = method_from_params(name, params, backbone, MethodContext())
        assert m.views is VIEW_GENERATORS.get(cls.default_views) or isinstance(
            m.views, VIEW_GENERATORS.get(cls.default_views)
        ), name
        assert m.views.modality == cls.modality, name


VIEW_FIELDS = {"views", "blur_p", "solarize_p", "region", "narrow", "broad", "cells", "same_clip", "clip"}


def _view_fields(cfg_cls: type, seen: frozenset[type] = frozenset()) -> set[str]:
    """Field names of a Config, and of the dataclasses it nests, that are view settings."""
    found = set()
    for name, hint in typing.get_type_hints(cfg_cls).items():
        if name in VIEW_FIELDS:
            found.add(name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and hint not in seen:
            found |= {f"{name}.{n}" for n in _view_fields(hint, seen | {cfg_cls})}
    return found


def test_no_method_config_holds_view_settings() -> None:
    """Views are the generator's (``params.views``): no method Config field (nested ones included)
    is a view setting, and a method's view helper like ``ViewConfig`` appears in none."""
    held = {n: _view_fields(METHODS.get(n).Config) for n in METHODS.names()}
    assert {n: f for n, f in held.items() if f} == {}
    for name in METHODS.names():
        hints = typing.get_type_hints(METHODS.get(name).Config)
        assert not any("ViewConfig" in repr(h) for h in hints.values()), name
    # the check can fail: a Config with a views field is caught
    Bad = dataclasses.make_dataclass("Bad", [("views", ViewConfig, dataclasses.field(default_factory=ViewConfig))])
    assert _view_fields(Bad) == {"views", "views.blur_p", "views.solarize_p"}


def test_every_entry_names_its_generator_in_every_recipe() -> None:
    for entry_name in list_entries():
        entry = load_entry(entry_name)
        for variant in entry.variant_names():
            for scale in SCALES:
                recipe = entry.recipe(variant, scale)
                views = recipe.params.get("views", {})
                where = f"{entry_name}/{variant}/{scale}"
                assert isinstance(views, dict) and views.get("generator") in VIEW_GENERATORS, where
                gen = VIEW_GENERATORS.get(views["generator"])
                assert gen.modality == METHODS.get(recipe.method).modality, where


def test_a_learned_generator_draws_its_weights_after_the_method() -> None:
    """``build_method`` builds the generator first (the method may read it) but the cube's weights
    are drawn after the method's heads: the same as building the cube after the method."""
    views = {"generator": "paramcrop_cube", "clip": {"image": {"size": 16}}}
    recipe = from_dict(
        Recipe,
        {"method": "vsimclr", "backbone": "r3d_micro", "backbone_args": {"widths": [8, 8, 16, 16]},
         "params": {"hidden_dim": 16, "out_dim": 8, "views": views}},
    )  # fmt: skip
    built = build_method(recipe, MethodContext())
    torch.manual_seed(recipe.train.seed)
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    cls = METHODS.get("vsimclr")
    ref = cls(
        from_dict(cls.Config, {"hidden_dim": 16, "out_dim": 8}), backbone, MethodContext(), ClipViews(ClipConfig())
    )
    cube = CubeViews(from_dict(CubeConfig, {"clip": {"image": {"size": 16}}}))  # drawn after the heads
    assert torch.equal(next(built.projector.parameters()), next(ref.projector.parameters()))
    for a, b in zip(built.views.parameters(), cube.parameters(), strict=True):
        assert torch.equal(a, b)
    early = CubeViews(from_dict(CubeConfig, {"clip": {"image": {"size": 16}}}))  # drawn later: differs
    assert not torch.equal(next(early.parameters()), next(cube.parameters()))


def test_a_method_that_reads_its_generator_rejects_a_wrong_one_naming_the_field() -> None:
    """BraVe sizes its broad backbones from the generator, VideoMoCo its frame scorer."""
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    two = {**BRAVE_TINY, "broad_backbones": BRAVE_TINY["broad_backbones"] * 2}
    with pytest.raises(ConfigError, match=r"params.broad_backbones: one per broad view, got 2 for 1 views"):
        method_from_params("brave", two, backbone, MethodContext())
    with pytest.raises(ConfigError, match=r"params.views: BraVe needs the narrow_broad generator, got ClipViews"):
        method_from_params("brave", {**BRAVE_TINY, "views": {"generator": "clip_pair"}}, backbone, MethodContext())
    clip = {"generator": "clip_pair", "clip": {"frames": 4}}
    with pytest.raises(ValueError, match=r"params.drop: expected 1..3 frames \(params.views.clip.frames\), got 4"):
        method_from_params("videomoco", {"views": clip, "drop": 4}, backbone, MethodContext())
    broad = {**BRAVE_TINY["views"], "generator": "narrow_broad"}
    with pytest.raises(ConfigError, match=r"params.views: VideoMoCo needs a clip generator \(clip_pair\)"):
        method_from_params("videomoco", {"views": broad, "drop": 2}, backbone, MethodContext())
    assert method_from_params("videomoco", {"views": clip, "drop": 3}, backbone, MethodContext()).generator.frames == 4
