"""``cropbench views``: statistics from provenance against hand computations, and readable PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from cropbench.types import EpochCurve, View, ViewProvenance
from cropbench.viewplot import curve_points, draw_epoch_curves, render_views, view_statistics


def _view(boxes: list[list[float]], flipped: list[bool], extra: dict | None = None) -> View:
    prov = ViewProvenance(torch.tensor(boxes), torch.tensor(flipped), (64, 64), (32, 32), extra or {})
    return View(torch.zeros(len(boxes), 3, 32, 32), prov)


def test_view_statistics_against_hand_computed_iou_centre_distance_and_areas():
    v1 = _view([[0, 0, 32, 32], [0, 0, 64, 64]], [False, True])
    region = torch.tensor([[8, 8, 24, 32], [8, 8, 24, 32]])
    v2 = _view([[16, 16, 48, 48], [0, 0, 64, 64]], [False, False], {"region_box": region})
    s = view_statistics([v1, v2])
    # pair 0: intersection 16×16 = 256, union 1024 + 1024 - 256; centres (16,16) and (32,32)
    assert math.isclose(s["pair0.iou"], 256 / 1792, rel_tol=1e-6)
    assert math.isclose(s["pair0.centre_dist"], math.hypot(16 / 64, 16 / 64), rel_tol=1e-6)
    assert math.isclose(s["pair1.iou"], 1.0) and s["pair1.centre_dist"] == 0.0
    assert math.isclose(s["iou_mean"], (256 / 1792 + 1) / 2, rel_tol=1e-6)
    assert math.isclose(s["pair0.scale_v1"], 0.25) and math.isclose(s["pair1.scale_v2"], 1.0)
    assert math.isclose(s["region_area_mean"], 16 * 24 / (32 * 32))
    assert s["flipped"] == 0.25


def _png_ok(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 300
        assert len(set(img.convert("L").getdata())) > 50  # a picture, not a blank canvas


def test_render_regioncl_views_draws_the_composite_and_reports_region_statistics(tmp_path, data_root):
    out = tmp_path / "regioncl.png"
    stats = render_views("regioncl", "m", out, n_images=3, seed=1, data_root=data_root)
    _png_ok(out)
    assert {"iou_mean", "centre_dist_mean", "region_area_mean", "pair2.region_area"} <= set(stats)
    assert stats["region_area_mean"] in {a * b / 16 for a in (2, 3) for b in (2, 3)}  # 2-3 cells of 4
    assert 0 <= stats["iou_mean"] <= 1


@pytest.mark.parametrize(("entry", "variant"), [("cyborgs", "default"), ("houghcl", "default"), ("mocov2", "default")])
def test_render_views_of_other_entries(entry, variant, tmp_path, data_root):
    out = tmp_path / f"{entry}.png"
    stats = render_views(entry, variant, out, n_images=2, data_root=data_root)
    _png_ok(out)
    if entry == "cyborgs":
        assert stats["segments_v1_mean"] >= 1 and stats["segments_v2_mean"] >= 1
    assert "pair1.iou" in stats


def test_render_views_rejects_a_bad_image_count(tmp_path, data_root):
    with pytest.raises(ValueError, match="--n-images must be between 1 and"):
        render_views("regioncl", "m", tmp_path / "x.png", n_images=0, data_root=data_root)


def test_render_views_dispatches_video_entries_to_the_view_strip(tmp_path, data_root):
    out = tmp_path / "video.png"
    stats = render_views("vsimclr", "default", out, n_images=1, data_root=data_root)
    _png_ok(out)
    assert 0 <= stats["iou"] <= 1


CURVE = EpochCurve("c.png", "t", (("view_iou", "IoU"), ("view_centre_distance", "distance")))


def test_epoch_curve_points_are_the_epoch_rows_that_hold_every_series():
    """Step rows (no series key) and rows with only some keys are skipped; epochs come out sorted
    and a repeated epoch (a resumed run's re-logged epoch) takes its last row."""
    history = [
        {"epoch": 1, "step": 4, "loss": 3.0},
        {"epoch": 2, "view_iou": 0.5, "view_centre_distance": 0.2, "epoch_loss": 2.0},
        {"epoch": 1, "view_iou": 0.9, "view_centre_distance": 0.1},
        {"epoch": 3, "view_iou": 0.4},
        {"epoch": 2, "view_iou": 0.6, "view_centre_distance": 0.3},
    ]
    assert curve_points(history, CURVE) == ([1, 2], {"view_iou": [0.9, 0.6], "view_centre_distance": [0.1, 0.3]})
    assert curve_points(history[:1], CURVE) == ([], {"view_iou": [], "view_centre_distance": []})


def test_draw_epoch_curves_writes_a_png_only_once_there_are_points(tmp_path):
    assert draw_epoch_curves(tmp_path, [{"epoch": 1, "step": 1, "loss": 1.0}], (CURVE,)) == []
    assert list(tmp_path.iterdir()) == []
    rows = [{"epoch": e, "view_iou": 1 / e, "view_centre_distance": e / 10} for e in (1, 2, 3)]
    assert draw_epoch_curves(tmp_path, rows, (CURVE,)) == [tmp_path / "c.png"]
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.size == (550, 352)  # 5×3.2 in at 110 dpi
