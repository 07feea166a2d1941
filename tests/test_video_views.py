"""Video view operators vs hand-computed coordinates, a naive trilinear loop and torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.nn import functional as F

from cropbench.types import ViewProvenance
from cropbench.viewplot import render_view_strip
from cropbench.views.image import (
    ViewConfig,
    _jitter_around_hue,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    sample_jitter,
)
from cropbench.views.video import (
    VideoViewConfig,
    cube_centre_distance,
    cube_iou,
    make_video_view,
    photometric,
    random_convolution,
)
from cropbench.views.video_transforms import (
    cube_sample,
    eval_views,
    frame_interval,
    normalize_video,
    spatial_crops,
)


def _coords(b: int = 1, t: int = 6, h: int = 5, w: int = 7) -> torch.Tensor:
    """B×1×T×H×W video whose voxel value encodes its coordinates: 100·t + 10·y + x."""
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return (100.0 * tt + 10.0 * yy + xx).expand(b, 1, t, h, w).clone()


def _naive_trilinear(
    video: torch.Tensor, box: list[float], times: list[float], out: tuple[int, int, int]
) -> torch.Tensor:
    """Per output voxel: the bin centre in source coordinates, minus 0.5, clamped, interpolated."""
    _, t, h, w = video.shape
    x0, y0, x1, y1 = box
    t0, t1 = times
    res = torch.zeros(video.shape[0], *out, dtype=video.dtype)
    for k in range(out[0]):
        for r in range(out[1]):
            for c in range(out[2]):
                p = [
                    t0 + (k + 0.5) * (t1 - t0) / out[0] - 0.5,
                    y0 + (r + 0.5) * (y1 - y0) / out[1] - 0.5,
                    x0 + (c + 0.5) * (x1 - x0) / out[2] - 0.5,
                ]
                p = [min(max(v, 0.0), n - 1.0) for v, n in zip(p, (t, h, w), strict=True)]
                lo = [math.floor(v) for v in p]
                acc = 0.0
                for dt in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            i = [
                                min(lo[0] + dt, t - 1),
                                min(lo[1] + dy, h - 1),
                                min(lo[2] + dx, w - 1),
                            ]
                            wgt = (
                                (1 - abs(p[0] - lo[0] - dt))
                                * (1 - abs(p[1] - lo[1] - dy))
                                * (1 - abs(p[2] - lo[2] - dx))
                            )
                            acc = acc + wgt * video[:, i[0], i[1], i[2]]
                res[:, k, r, c] = acc
    return res


def test_cube_sample_copies_an_integer_cube_voxel_for_voxel():
    video = _coords()
    box = torch.tensor([[2.0, 1.0, 6.0, 4.0]])  # x 2..5, y 1..3
    times = frame_interval(torch.tensor([1]), frames=3, stride=2)  # frames 1, 3, 5
    assert times.tolist() == [[0.5, 6.5]]  # bins of 2 frames centred on frames 1, 3, 5
    out = cube_sample(video, box, times, (3, 3, 4))
    expected = torch.tensor([[[100 * t + 10 * y + x for x in range(2, 6)] for y in range(1, 4)] for t in (1, 3, 5)])
    assert torch.allclose(out[0, 0], expected.float(), atol=1e-3)
    flipped = cube_sample(video, box, times, (3, 3, 4), flipped=torch.tensor([True]))
    assert torch.allclose(flipped[0, 0], expected.flip(-1).float(), atol=1e-3)


def test_cube_sample_matches_a_naive_trilinear_loop():
    torch.manual_seed(0)
    video = torch.rand(2, 3, 5, 6, 7)
    boxes = torch.tensor([[0.7, 1.2, 5.9, 5.1], [-0.5, 0.0, 3.3, 2.4]])
    times = torch.tensor([[0.3, 4.1], [1.0, 5.0]])
    out = cube_sample(video, boxes, times, (3, 4, 5))
    for i in range(2):
        ref = _naive_trilinear(video[i], boxes[i].tolist(), times[i].tolist(), (3, 4, 5))
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_cube_sample_is_differentiable_in_the_cube():
    video = torch.rand(1, 1, 4, 5, 5, dtype=torch.float64)
    boxes = torch.tensor([[0.6, 0.8, 3.7, 4.1]], dtype=torch.float64, requires_grad=True)
    times = torch.tensor([[0.4, 3.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, t: cube_sample(video, b, t, (2, 3, 3)), (boxes, times))


def test_photometric_ops_are_per_clip_and_match_torchvision_per_frame():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 6, 6)
    factors = torch.tensor([[1.3, 1.0, 0.6, 0.1], [0.7, 1.0, 1.4, -0.2]])  # b, c (identity), s, h
    out = color_jitter(x, factors, None)
    for i in range(2):
        for t in range(4):
            ref = TF.adjust_brightness(x[i, :, t], float(factors[i, 0]))
            ref = TF.adjust_saturation(ref, float(factors[i, 2]))
            ref = TF.adjust_hue(ref, float(factors[i, 3]))
            assert torch.allclose(out[i, :, t], ref, atol=1e-4)
    contrast = color_jitter(x, torch.tensor([[1.0, 0.5, 1.0, 0.0]] * 2), None)
    grey = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2, 3))  # one level per clip
    ref = (0.5 * x + 0.5 * grey.view(2, 1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(contrast, ref, atol=1e-6)


@pytest.mark.parametrize("impl", [color_jitter, _jitter_around_hue])
def test_random_order_jitter_on_clips_equals_a_naive_per_clip_loop(impl) -> None:  # noqa: ANN001
    """Each clip gets each op once, in its own order, the same on every frame (contrast: the
    clip's mean grey level). Measured max |diff| 0; bound 1e-6 (threaded mean)."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(7, 3, 3, 6, 6, generator=g)
    factors, order = sample_jitter(7, ViewConfig(jitter=(0.8, 0.8, 0.8, 0.4)), g, torch.device("cpu"))
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    ref = []
    for i in range(7):
        xi = x[i : i + 1]
        for k in order[i].tolist():
            xi = ops[k](xi, factors[i : i + 1, k])
        ref.append(xi)
    assert (impl(x, factors, order) - torch.cat(ref)).abs().max() <= 1e-6


def test_photometric_equals_a_per_clip_replay_of_its_draws() -> None:
    """photometric vs each clip on its own, replaying its draws (jitter, grey, sigma, blur,
    solarize): grey / blur / solarize reach only their clips; blur is torchvision's per frame.
    Measured max |diff| 1.8e-7 (torchvision's blur); bound 1e-6."""
    n, cfg = 8, ViewConfig(size=8, gray_p=0.4, blur_p=0.5, blur_kernel=0.4, solarize_p=0.4)
    x = torch.rand(n, 3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    out = photometric(x, cfg, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    factors, order = sample_jitter(n, cfg, g, torch.device("cpu"))
    gray = torch.rand(n, generator=g) < cfg.gray_p
    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * torch.rand(n, generator=g)
    blur, solar = torch.rand(n, generator=g) < cfg.blur_p, torch.rand(n, generator=g) < cfg.solarize_p
    assert gray.any() and not gray.all() and blur.any() and not blur.all() and solar.any() and not solar.all()
    for i in range(n):
        clip = color_jitter(x[i : i + 1], factors[i : i + 1], order[i : i + 1])[0]  # 3×T×h×w
        frames = clip.unbind(1)
        frames = [TF.rgb_to_grayscale(f, 3) if gray[i] else f for f in frames]
        frames = [TF.gaussian_blur(f, [3, 3], [float(sigma[i])] * 2) if blur[i] else f for f in frames]
        frames = [TF.solarize(f, 0.5) if solar[i] else f for f in frames]
        assert (out[i] - torch.stack(frames, 1)).abs().max() <= 1e-6


def test_a_view_is_the_cube_its_provenance_records():
    torch.manual_seed(2)
    video = torch.randint(0, 256, (3, 3, 20, 24, 24), dtype=torch.uint8)
    plain = ViewConfig(size=16, scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.5)
    cfg = VideoViewConfig(frames=4, stride=3, image=plain)
    looped = torch.tensor([False, True, False])
    view = make_video_view(video, cfg, torch.Generator().manual_seed(0), looped=looped)
    p = view.prov
    assert view.tensor.shape == (3, 3, 4, 16, 16) and p.extra["looped"].tolist() == [
        False,
        True,
        False,
    ]
    assert torch.all(p.extra["time"][:, 1] - p.extra["time"][:, 0] == 12)  # frames x stride
    assert torch.all(p.extra["time"][:, 0] >= -1) and torch.all(p.extra["time"][:, 1] <= 21)
    again = normalize_video(cube_sample(video.float() / 255, p.boxes, p.extra["time"], (4, 16, 16), p.flipped))
    assert torch.allclose(view.tensor, again, atol=1e-5)
    with pytest.raises(Exception, match="needs 28 window frames, the batch has 20"):
        make_video_view(video, VideoViewConfig(frames=10, stride=3, image=plain), torch.Generator())


def test_photometric_leaves_frames_of_a_clip_consistent():
    x = torch.rand(4, 3, 1, 8, 8).expand(4, 3, 5, 8, 8).clone()  # five identical frames per clip
    out = photometric(x, ViewConfig(size=8, blur_p=1.0, solarize_p=0.5), torch.Generator().manual_seed(0))
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6)  # same op on every frame


def test_cube_iou_and_centre_distance_by_hand():
    def prov(box: list[float], time: list[float]) -> ViewProvenance:
        return ViewProvenance(
            torch.tensor([box]),
            torch.tensor([False]),
            (10, 20),
            (8, 8),
            {"time": torch.tensor([time]), "window": torch.tensor([16.0])},
        )

    a, b = prov([0, 0, 10, 10], [0, 8]), prov([5, 0, 15, 10], [4, 12])
    inter, vol = 5 * 10 * 4, 10 * 10 * 8
    assert cube_iou(a, b).item() == pytest.approx(inter / (2 * vol - inter))
    assert cube_centre_distance(a, b).item() == pytest.approx(math.hypot(5 / 20, 4 / 16))
    assert cube_iou(a, a).item() == pytest.approx(1.0)


def test_random_convolution_applies_each_clips_own_kernel():
    torch.manual_seed(3)
    x = torch.rand(3, 3, 2, 12, 12)
    apply = torch.tensor([True, True, False])
    out = random_convolution(x, apply, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws: kernel sides, then weights
    k = 2 * torch.randint(0, 6, (3,), generator=g) + 1
    w = torch.randn(3, 3, 3, 11, 11, generator=g) * torch.sqrt(2.0 / (3 * k.float() ** 2)).view(3, 1, 1, 1, 1)
    for i in range(2):
        c = 5 - int(k[i]) // 2
        kern = w[i, :, :, c : c + int(k[i]), c : c + int(k[i])]
        ref = F.conv2d(x[i].transpose(0, 1), kern, padding=int(k[i]) // 2).transpose(0, 1)
        assert torch.allclose(out[i], ref, atol=1e-5)
    assert torch.equal(out[2], x[2])


def test_test_time_crops_and_views():
    assert spatial_crops(40, 32, 3) == [(0, 4, 32, 36), (4, 4, 36, 36), (8, 4, 40, 36)]
    assert spatial_crops(40, 32, 1) == [(4, 4, 36, 36)]
    clips = torch.randint(0, 256, (2, 3, 4, 10, 10), dtype=torch.uint8)
    views = eval_views(clips, spatial_crops(10, 8, 3), 8)
    assert views.shape == (6, 3, 4, 8, 8)
    right = normalize_video(clips[1:2, :, :, 1:9, 2:10].float() / 255)
    assert torch.allclose(views[5:6], right, atol=1e-5)  # clip 1, right crop (clip-major order)


def test_render_view_strip_writes_a_png(tmp_path):
    video = torch.randint(0, 256, (2, 3, 12, 20, 20), dtype=torch.uint8)
    cfg = VideoViewConfig(frames=4, stride=2, image=ViewConfig(size=16, blur_p=0.0))
    g = torch.Generator().manual_seed(0)
    views = [make_video_view(video, cfg, g) for _ in range(2)]
    stats = render_view_strip(video, views, str(tmp_path / "strip.png"), n_samples=2, n_frames=6)
    assert (tmp_path / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["iou"] == pytest.approx(cube_iou(views[0].prov, views[1].prov).mean().item())
