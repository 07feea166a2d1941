"""ParamCrop (Qing et al., arXiv 2108.10501): a learned, differentiable cubic crop, trained
adversarially against the video encoder, on top of SimCLR / MoCo / BYOL.

A small MLP maps a noise vector to the two views' cubes (per view: a scale and a centre on each
of the t, y, x axes). Scales are squashed into ``[min, max]`` and centres into
``[scale/2, 1 − scale/2]``, so every cube stays inside the decoded window. The cube is cut by
trilinear 3-D affine sampling (``cube_sample``), so the contrastive loss is differentiable in
the crop parameters; a gradient-reversal layer between the parameters and the sampler makes the
crop MLP *maximise* the loss the encoder minimises (harder views), bounded by the scale limits.
Each epoch logs the mean 3-D IoU and centre distance of the two views and redraws their curve
(``paramcrop_views.png`` in the run folder): the quantities the paper shows evolving.

Everything about the MLP (noise size, depth, one generator for both views) and the bounds is
[UNVERIFIED] (no code was released; papers.md §1.2) and recorded as deviations in the entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cropbench.data.video_transforms import cube_sample, normalize_video
from cropbench.dist import all_reduce_mean
from cropbench.methods.base import MethodContext, VideoBatch, View, ViewProvenance
from cropbench.methods.video_views import cube_centre_distance, cube_iou, photometric
from cropbench.methods.views import hflip
from cropbench.methods.vssl import VideoBYOL, VideoMoCoV2, VideoSimCLR
from cropbench.registry import METHODS


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """Identity forward; backward multiplies the gradient by −``weight`` (Ganin & Lempitsky)."""
    return _GradReverse.apply(x, weight)


def params_to_cubes(
    p: Tensor,
    spatial: tuple[float, float],
    temporal: tuple[float, float],
    window: int,
    size: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """B×6 parameters in (0, 1): (scale t, y, x; position t, y, x) -> boxes B×4 (x0, y0, x1, y1)
    in canvas pixels and times B×2 (t0, t1) in window frames, always inside the window."""
    lo = p.new_tensor([temporal[0], spatial[0], spatial[0]])
    hi = p.new_tensor([temporal[1], spatial[1], spatial[1]])
    scale = lo + (hi - lo) * p[:, :3]  # fraction of the extent per axis
    centre = scale / 2 + (1 - scale) * p[:, 3:]
    first, last = centre - scale / 2, centre + scale / 2  # B×3 (t, y, x), in [0, 1]
    h, w = size
    boxes = torch.stack([first[:, 2] * w, first[:, 1] * h, last[:, 2] * w, last[:, 1] * h], dim=1)
    return boxes, torch.stack([first[:, 0], last[:, 0]], dim=1) * window


class CubeGenerator(nn.Module):
    """noise B×noise_dim -> MLP -> sigmoid -> B×views×6 crop parameters in (0, 1)."""

    def __init__(self, noise_dim: int, hidden: int, views: int = 2):
        super().__init__()
        self.noise_dim, self.views = noise_dim, views
        self.net = nn.Sequential(nn.Linear(noise_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 6 * views))

    def forward(self, noise: Tensor) -> Tensor:
        return torch.sigmoid(self.net(noise)).view(noise.shape[0], self.views, 6)


@dataclass(frozen=True)
class ParamCropFields:
    """ParamCrop's own settings, added to the framework's Config ([UNVERIFIED], module doc)."""

    noise_dim: int = 16  # noise vector per sample
    crop_hidden: int = 64  # crop MLP width
    spatial_scale: tuple[float, float] = (0.35, 1.0)  # crop side / canvas side
    temporal_scale: tuple[float, float] = (0.5, 1.0)  # cube length / window length
    grl_weight: float = 1.0  # gradient-reversal strength


class ParamCropViews:
    """Mixin replacing the framework's random views by the learned cubes (host: a vssl method)."""

    view_names = ["query cube", "key cube"]

    def _init_paramcrop(self) -> None:
        self.cube_generator = CubeGenerator(self.cfg.noise_dim, self.cfg.crop_hidden)
        self._stats: dict[str, Tensor] = {}

    def make_views(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        video, cfg = batch.video, self.cfg
        n, _, window, h, w = video.shape
        dev, size = video.device, cfg.views.image.size
        noise = torch.randn(n, cfg.noise_dim, generator=generator, device=generator.device).to(dev)
        params = grad_reverse(self.cube_generator(noise), cfg.grl_weight)  # B×2×6
        source = video.float() / 255
        views = []
        for v in range(2):
            boxes, times = params_to_cubes(params[:, v], cfg.spatial_scale, cfg.temporal_scale, window, (h, w))
            x = cube_sample(source, boxes, times, (cfg.views.frames, size, size))
            image = self.view_configs[v].image  # the framework's per-view photometric part
            flipped = torch.rand(n, generator=generator, device=generator.device).to(dev) < image.flip_p
            x = normalize_video(photometric(hflip(x, flipped), image, generator))
            extra = {"time": times.detach(), "window": torch.full((n,), float(window), device=dev)}
            if batch.looped is not None:
                extra["looped"] = batch.looped
            views.append(View(x, ViewProvenance(boxes.detach(), flipped, (h, w), (size, size), extra)))
        self._accumulate(views)
        return views

    def _accumulate(self, views: list[View]) -> None:
        """Sum this step's IoU / centre distance on the device (no host sync inside the step)."""
        iou = cube_iou(views[0].prov, views[1].prov).sum()
        dist = cube_centre_distance(views[0].prov, views[1].prov).sum()
        count = torch.tensor(float(len(views[0].tensor)), device=iou.device)
        for k, v in (("iou", iou), ("dist", dist), ("n", count)):
            self._stats[k] = self._stats.get(k, torch.zeros_like(v)) + v

    def on_epoch_end(self, epoch: int, trainer: Any) -> dict[str, float]:
        """Mean cube IoU and centre distance of this epoch's views; redraws the curve PNG."""
        if not self._stats:
            return {}
        s = {k: all_reduce_mean(v, self.ctx.dist) for k, v in self._stats.items()}
        self._stats = {}
        out = {
            "view_iou": float(s["iou"] / s["n"]),
            "view_centre_distance": float(s["dist"] / s["n"]),
        }
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None and self.ctx.dist.is_main:
            plot_view_statistics(Path(run_dir), epoch + 1, out)
        return out


def plot_view_statistics(run_dir: Path, epoch: int, current: dict[str, float]) -> Path:
    """``paramcrop_views.png``: IoU and centre distance per epoch, from ``metrics.jsonl`` (earlier
    epochs, so the curve survives ``--resume``) plus this epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if "view_iou" in r and r["epoch"] < epoch:
                rows[r["epoch"]] = (r["view_iou"], r["view_centre_distance"])
    rows[epoch] = (current["view_iou"], current["view_centre_distance"])
    epochs = sorted(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [rows[e][0] for e in epochs], "o-", label="3-D IoU")
    ax.plot(epochs, [rows[e][1] for e in epochs], "s-", label="centre distance")
    ax.set_xlabel("epoch")
    ax.set_title("ParamCrop: disparity between the two views")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "paramcrop_views.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@METHODS.register("paramcrop_simclr")
class ParamCropSimCLR(ParamCropViews, VideoSimCLR):
    @dataclass(frozen=True)
    class Config(ParamCropFields, VideoSimCLR.Config):
        pass

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self._init_paramcrop()


@METHODS.register("paramcrop_moco")
class ParamCropMoCo(ParamCropViews, VideoMoCoV2):
    """The key cube gets no gradient (the key encoder runs without one); it shares the MLP."""

    @dataclass(frozen=True)
    class Config(ParamCropFields, VideoMoCoV2.Config):
        pass

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self._init_paramcrop()


@METHODS.register("paramcrop_byol")
class ParamCropBYOL(ParamCropViews, VideoBYOL):
    @dataclass(frozen=True)
    class Config(ParamCropFields, VideoBYOL.Config):
        pass

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        self._init_paramcrop()
