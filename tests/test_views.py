"""View generator: crop boxes against hand-computed coordinates and torchvision's sampling rule,
photometric ops against torchvision.transforms.v2.functional applied per sample, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.nn import functional as F
from torchvision.ops import box_iou as tv_box_iou

from cropbench.data.images import normalize
from cropbench.errors import ConfigError
from cropbench.methods import views as V
from cropbench.methods.base import ViewProvenance


def _images(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- geometry


def _marker_canvas() -> torch.Tensor:
    """1×3×20×24 canvas, zero except two markers with distinct values per channel."""
    c = torch.zeros(1, 3, 20, 24)
    c[0, :, 6, 7] = torch.tensor([1.0, 0.5, 0.25])  # row 6, col 7
    c[0, :, 9, 12] = torch.tensor([0.2, 0.4, 0.8])  # row 9, col 12
    return c


def test_crop_at_native_size_is_an_exact_copy_and_markers_land_where_computed() -> None:
    canvas = _marker_canvas()
    box = torch.tensor([[5.0, 3.0, 13.0, 11.0]])  # x0, y0, x1, y1: 8×8 pixels, cols 5..12, rows 3..10
    view = V.crop_resize(canvas, box, (8, 8))
    torch.testing.assert_close(view, canvas[:, :, 3:11, 5:13])
    # marker (row 6, col 7) -> view (6 - 3, 7 - 5) = (3, 2); marker (9, 12) -> (6, 7)
    assert view[0, :, 3, 2].tolist() == [1.0, 0.5, 0.25]
    assert view[0, :, 6, 7].tolist() == pytest.approx([0.2, 0.4, 0.8])
    flipped = V.hflip(view, torch.tensor([True]))  # column c -> 8 - 1 - c
    assert flipped[0, :, 3, 5].tolist() == [1.0, 0.5, 0.25]
    assert flipped[0, :, 6, 0].tolist() == pytest.approx([0.2, 0.4, 0.8])
    assert flipped[0].sum() == view[0].sum()


def test_crop_downscale_by_two_averages_2x2_blocks() -> None:
    canvas = _marker_canvas()
    box = torch.tensor([[3.0, 2.0, 19.0, 18.0]])  # 16×16 -> 8×8
    view = V.crop_resize(canvas, box, (8, 8))
    torch.testing.assert_close(view, F.avg_pool2d(canvas[:, :, 2:18, 3:19], 2))
    # marker (row 6, col 7) -> view ((6 - 2) // 2, (7 - 3) // 2) = (2, 2), a quarter of its value
    torch.testing.assert_close(view[0, :, 2, 2], torch.tensor([1.0, 0.5, 0.25]) / 4)


def test_crop_upscale_matches_bilinear_resized_crop_inside_the_box() -> None:
    img = _images(1, 16)
    box = torch.tensor([[4.0, 6.0, 8.0, 10.0]])  # 4×4 at top 6, left 4 -> 8×8
    view = V.crop_resize(img, box, (8, 8))
    ref = TF.resized_crop(img, top=6, left=4, height=4, width=4, size=[8, 8], antialias=False)
    # border rows/cols sample half a pixel outside the box (canvas content vs torchvision's clamp)
    torch.testing.assert_close(view[..., 1:7, 1:7], ref[..., 1:7, 1:7])


def test_sample_boxes_fallback_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    # aspect >= 2 at full area never fits a 10×10 canvas -> centre crop with ratio clamped to 2
    boxes = V.sample_boxes(4, 10, 10, (1.0, 1.0), (2.0, 3.0), g)
    top, left, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 10), [1.0, 1.0], [2.0, 3.0])
    assert (top, left, h, w) == (2, 0, 5, 10)
    assert boxes.tolist() == [[0.0, 2.0, 10.0, 7.0]] * 4


def test_sample_boxes_follow_torchvision_distribution() -> None:
    n, size, scale, ratio = 3000, 64, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = V.sample_boxes(n, size, size, scale, ratio, torch.Generator().manual_seed(1))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes == boxes.round()).all() and boxes.min() >= 0 and boxes[:, 2:].max() <= size
    assert (w * h / size**2).min() >= scale[0] - 0.01
    torch.manual_seed(1)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.zeros(1, size, size), list(scale), list(ratio)) for _ in range(n)],
        dtype=torch.float,
    )  # top, left, h, w
    area, ref_area = (w * h).mean() / size**2, (ref[:, 2] * ref[:, 3]).mean() / size**2
    assert abs(area - ref_area) < 0.02
    assert abs(torch.log(w / h).mean() - torch.log(ref[:, 3] / ref[:, 2]).mean()) < 0.02
    cx, ref_cx = (boxes[:, 0] + boxes[:, 2]).mean() / 2, (ref[:, 1] + ref[:, 3] / 2).mean()
    assert abs(cx - ref_cx) < 1.0


def test_grid_centres_map_back_through_box_and_flip() -> None:
    prov = ViewProvenance(
        boxes=torch.tensor([[8.0, 4.0, 24.0, 12.0]] * 2),
        flipped=torch.tensor([False, True]),
        source_size=(32, 32),
        output_size=(16, 16),
    )
    c = V.grid_centres(prov, (2, 4))  # cells of 4×2 canvas px... box 16 wide / 4 cols = 4 px, 8 tall / 2 rows
    assert c.shape == (2, 8, 2)
    assert c[0, 0].tolist() == [10.0, 6.0]  # x0 + 0.5·4, y0 + 0.5·4
    assert c[0, 5].tolist() == [14.0, 10.0]  # row 1, col 1
    assert c[1, 0].tolist() == [22.0, 6.0]  # flipped: view column 0 shows the box's right edge
    assert c[1, 7].tolist() == [10.0, 10.0]


def test_box_iou_and_centre_distance() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 8.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [10.0, 10.0, 12.0, 12.0], [2.0, 2.0, 6.0, 8.0]])
    torch.testing.assert_close(V.box_iou(a, b), tv_box_iou(a, b).diagonal())
    assert V.box_iou(a, b).tolist() == pytest.approx([50 / 150, 0.0, 1.0])
    d = V.centre_distance(a, b, (20, 40))  # dx / W, dy / H
    assert d.tolist() == pytest.approx([5 / 40, math.hypot(9 / 40, 9 / 20), 0.0])


# ---------------------------------------------------------------- photometric ops


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (V.adjust_brightness, TF.adjust_brightness, [0.3, 0.9, 1.0, 1.4, 1.8, 0.0]),
        (V.adjust_contrast, TF.adjust_contrast, [0.3, 0.9, 1.0, 1.4, 1.8, 0.0]),
        (V.adjust_saturation, TF.adjust_saturation, [0.3, 0.9, 1.0, 1.4, 1.8, 0.0]),
        (V.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.3, 0.5]),
    ],
)
def test_photometric_op_matches_torchvision_per_sample(ours, theirs, factors) -> None:  # noqa: ANN001
    x = _images()
    x[0, :, :3] = 0.5  # grey pixels (zero saturation) and black ones exercise the HSV edge cases
    x[1, :, :3] = 0.0
    f = torch.tensor(factors)
    ref = torch.stack([theirs(x[i], float(f[i])) for i in range(len(x))])
    torch.testing.assert_close(ours(x, f), ref, atol=2e-6, rtol=0)


def test_grayscale_blur_solarize_match_torchvision() -> None:
    x = _images()
    torch.testing.assert_close(V.to_gray(x), TF.rgb_to_grayscale(x))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(V.gaussian_blur(x, sigma, 5), ref, atol=1e-6, rtol=0)
    apply = torch.tensor([True, False, True, True, False, True])
    ref = torch.stack([TF.solarize(x[i], 0.5) if a else x[i] for i, a in enumerate(apply)])
    torch.testing.assert_close(V.solarize(x, apply), ref)


def test_color_jitter_random_order_matches_sequential_torchvision() -> None:
    x = _images(8)
    g = torch.Generator().manual_seed(3)
    cfg = V.ViewConfig(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.75)
    factors, order = V.sample_jitter(8, cfg, g, torch.device("cpu"))
    assert sorted(order[0].tolist()) == [0, 1, 2, 3]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    ref = []
    for i in range(8):
        xi = x[i]
        for k in order[i].tolist():
            xi = ops[k](xi, float(factors[i, k]))
        ref.append(xi)
    torch.testing.assert_close(V.color_jitter(x, factors, order), torch.stack(ref), atol=2e-6, rtol=0)
    fixed = torch.stack(
        [
            TF.adjust_hue(
                TF.adjust_saturation(
                    TF.adjust_contrast(TF.adjust_brightness(x[i], float(factors[i, 0])), float(factors[i, 1])),
                    float(factors[i, 2]),
                ),
                float(factors[i, 3]),
            )
            for i in range(8)
        ]
    )
    torch.testing.assert_close(V.color_jitter(x, factors, None), fixed, atol=2e-6, rtol=0)


# ---------------------------------------------------------------- the pipeline


def _canvases(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


def test_view_is_the_recorded_crop_when_photometric_ops_are_off() -> None:
    cfg = V.ViewConfig(size=16, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.5)
    imgs = _canvases()
    view = V.make_view(imgs, cfg, torch.Generator().manual_seed(0))
    assert view.prov.source_size == (32, 32) and view.prov.output_size == (16, 16)
    expected = V.hflip(V.crop_resize(imgs.float() / 255, view.prov.boxes, (16, 16)), view.prov.flipped)
    torch.testing.assert_close(view.tensor, normalize(expected * 255))


def test_views_are_deterministic_given_the_generator_only() -> None:
    cfg = V.ViewConfig(size=16, blur_p=0.5, solarize_p=0.5)
    imgs = _canvases()
    torch.manual_seed(0)
    a = V.make_view(imgs, cfg, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = V.make_view(imgs, cfg, torch.Generator().manual_seed(7))
    c = V.make_view(imgs, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.tensor, b.tensor) and torch.equal(a.prov.boxes, b.prov.boxes)
    assert not torch.equal(a.tensor, c.tensor)


def test_probabilities_zero_and_one() -> None:
    imgs = _canvases(16)
    g = torch.Generator().manual_seed(0)
    gray = V.make_view(imgs, V.ViewConfig(size=16, gray_p=1.0, flip_p=1.0, blur_p=0.0), g)
    assert gray.prov.flipped.all()
    rgb = gray.tensor * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
    plain = V.make_view(imgs, V.ViewConfig(size=16, flip_p=0.0), g)
    assert not plain.prov.flipped.any()


def test_view_config_rules_and_errors() -> None:
    assert V.ViewConfig(size=224).kernel_size == 23  # BYOL's 23-px kernel
    assert V.ViewConfig(size=32).kernel_size == 3
    with pytest.raises(ConfigError, match=r"ViewConfig.scale: expected 0 < min <= max <= 1"):
        V.ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match=r"ViewConfig.blur_p: expected a probability"):
        V.ViewConfig(blur_p=1.5)
    with pytest.raises(ValueError, match=r"expected B×3×H×W canvases"):
        V.make_view(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), V.ViewConfig(size=4), torch.Generator())
