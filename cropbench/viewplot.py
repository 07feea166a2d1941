"""Every plot cropbench draws: ``cropbench views ENTRY`` (what an entry's views look like, and
per-pair view statistics) and the per-epoch curves methods declare (``SSLMethod.epoch_curves``).
Methods hold only data (views with provenance, epoch logs); this module draws them.

The entry's *micro* recipe builds the method and its dataset exactly as a run does; the method's
own ``make_views`` cuts the views, so the picture and the numbers come from the same code path as
training. Per image the figure shows the canvas with every view's crop box (and, for RegionCL's
composite, the swapped region and where the pasted content came from), then each view with its
region box or segment map. Statistics come from the views' provenance (``ViewProvenance``):

* ``iou`` / ``centre_dist``: IoU and centre distance (canvas-normalised) of the first two views;
* ``scale_v<k>``: crop area / canvas area of view k; ``flipped``: share of flipped views;
* ``region_area``: swapped region area / view area (RegionCL);
* ``segments``: segment ids per view (CYBORGS masks).

A video entry gets a strip per clip instead (``render_view_strip``): window frames with each view's
crop cube drawn, then each view's frames; its statistics are cube IoU and centre distance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cropbench.data import build_dataset
from cropbench.data.images import IMAGENET_MEAN, IMAGENET_STD, collate_images
from cropbench.methods.base import MethodContext
from cropbench.recipe import load_entry
from cropbench.types import EpochCurve, View
from cropbench.views.image import box_iou, centre_distance
from cropbench.views.video import cube_centre_distance, cube_iou
from cropbench.views.video_transforms import KINETICS_MEAN, KINETICS_STD

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")
MARKERS = ("o-", "s-", "^-", "d-", "v-")  # per series of an epoch curve


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def view_statistics(views: list[View]) -> dict[str, float]:
    """Per-pair and mean statistics of a batch of views (see the module doc)."""
    stats: dict[str, float] = {}
    v0 = views[0].prov
    per_pair: dict[str, Tensor] = {}
    if len(views) >= 2:
        v1 = views[1].prov
        per_pair["iou"] = box_iou(v0.boxes.float(), v1.boxes.float())
        per_pair["centre_dist"] = centre_distance(v0.boxes.float(), v1.boxes.float(), v0.source_size)
    canvas_area = v0.source_size[0] * v0.source_size[1]
    for k, v in enumerate(views):
        b = v.prov.boxes.float()
        per_pair[f"scale_v{k + 1}"] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / canvas_area
        extra = v.prov.extra
        if "region_box" in extra:
            r = extra["region_box"].float()
            view_area = v.prov.output_size[0] * v.prov.output_size[1]
            per_pair["region_area"] = (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]) / view_area
        if "mask" in extra:
            per_pair[f"segments_v{k + 1}"] = torch.tensor([float(m.unique().numel()) for m in extra["mask"]])
    for name, values in per_pair.items():
        stats[f"{name}_mean"] = float(values.mean())
    for i in range(len(views[0].tensor)):
        for name, values in per_pair.items():
            stats[f"pair{i}.{name}"] = float(values[i])
    stats["flipped"] = float(torch.cat([v.prov.flipped.float() for v in views]).mean())
    return stats


def to_rgb(x: Tensor) -> Tensor:
    """Normalised 3×h×w view -> h×w×3 in [0, 1] for imshow."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def _box(ax: Any, box: Tensor, colour: str, style: str = "-", label: str | None = None) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor=colour,
            linestyle=style,
            linewidth=1.5,
            label=label,
        )
    )


def draw_views(images: Tensor, views: list[View], names: list[str], out_png: Path) -> None:
    """Grid: per image, the canvas with all boxes, then every view (region box / mask overlaid)."""
    plt = _pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(views), figsize=(2.2 * (1 + len(views)), 2.2 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        ax.set_title(f"canvas {i}", fontsize=8)
        for k, v in enumerate(views):
            if "region_canvas_box" in v.prov.extra:  # a composite: cut like view 1, draw its region
                _box(ax, v.prov.extra["region_canvas_box"][i], "white", "--", "swapped region")
            else:
                _box(ax, v.prov.boxes[i], COLOURS[k % len(COLOURS)], label=names[k])
        for k, v in enumerate(views):
            _draw_view(axes[i, k + 1], v, i, names[k], COLOURS[k % len(COLOURS)])
    axes[0, 0].legend(fontsize=6, loc="lower left", framealpha=0.6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _draw_view(ax: Any, v: View, i: int, name: str, colour: str) -> None:
    ax.imshow(to_rgb(v.tensor[i]).numpy())
    flip = " (flipped)" if bool(v.prov.flipped[i]) else ""
    title = f"{name}{flip}"
    extra = v.prov.extra
    if "region_box" in extra:
        _box(ax, extra["region_box"][i], "white", "--")
        title += f"\npaste from canvas {int(extra['partner'][i])}"
    if "mask" in extra:
        ax.imshow(extra["mask"][i].cpu().numpy(), cmap="tab20", alpha=0.35, interpolation="nearest")
        title += f"\n{int(extra['mask'][i].unique().numel())} segments"
    for side in ax.spines.values():
        side.set_edgecolor(colour)
        side.set_linewidth(2)
    ax.set_title(title, fontsize=7)


def _view_names(views: list[View]) -> list[str]:
    names = [f"view {k + 1}" for k in range(len(views))]
    for k, v in enumerate(views):
        if "region_box" in v.prov.extra:
            names[k] = "composite (of view 1)"
    return names


def render_views(
    entry_name: str,
    variant: str,
    out_png: str | Path,
    n_images: int = 4,
    seed: int = 0,
    data_root: Path | None = None,
) -> dict[str, float]:
    """Draw ``n_images`` canvases of the micro dataset with their views; return view statistics."""
    from cropbench.runner import build_method

    entry = load_entry(entry_name)
    recipe = entry.recipe(variant, "micro")
    data = recipe.data  # cache=False: decode only the n_images shown, not the whole split
    dataset = build_dataset(data.dataset, data.train_split, data_root, image_size=data.image_size, cache=False)
    if n_images < 1 or n_images > len(dataset):
        raise ValueError(f"--n-images must be between 1 and {len(dataset)}, got {n_images}")
    method = build_method(recipe, MethodContext(batch_size=n_images), f"{entry.path} (variant {variant!r})")
    # spread over the split: class-sorted layouts (ImageFolder, UCF101) then show different classes
    subset = torch.utils.data.Subset(dataset, [i * len(dataset) // n_images for i in range(n_images)])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = method.prepare_dataset(subset, Path(tmp))  # e.g. CYBORGS computes its masks
        collate = getattr(prepared, "collate", None) or getattr(dataset, "collate", collate_images)
        batch = collate([prepared[i] for i in range(n_images)])
    with torch.no_grad():
        views = method.make_views(batch, torch.Generator().manual_seed(seed))
    if entry.modality == "video":
        return render_view_strip(batch.video, views, str(out_png), n_samples=n_images)
    draw_views(batch.images, views, _view_names(views), Path(out_png))
    return view_statistics(views)


# ---------------------------------------------------------------- video views


def _frame_rgb(frame: Tensor) -> Tensor:
    """3×h×w normalised frame -> h×w×3 in [0, 1] for display (min-max when not an RGB view)."""
    mean, std = torch.tensor(KINETICS_MEAN).view(3, 1, 1), torch.tensor(KINETICS_STD).view(3, 1, 1)
    x = frame.detach().float().cpu() * std + mean
    if x.min() < -0.05 or x.max() > 1.05:  # frame differences, random convolutions
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-6)
    return x.clamp(0, 1).permute(1, 2, 0)


def render_view_strip(
    video: Tensor,
    views: list[View],
    out_png: str,
    n_samples: int = 2,
    n_frames: int = 8,
    names: list[str] | None = None,
) -> dict[str, float]:
    """PNG: per sample, a strip of window frames with each view's crop cube drawn (its box on the
    frames inside its time interval), then a strip of frames per view. Returns the mean cube IoU
    and centre distance of views 0 and 1 (when there are two views with time provenance)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    names = names or [f"view {i + 1}" for i in range(len(views))]
    n_samples = min(n_samples, video.shape[0])
    window = video.shape[2]
    rows = n_samples * (1 + len(views))
    fig, axes = plt.subplots(rows, n_frames, figsize=(1.3 * n_frames, 1.4 * rows), squeeze=False)
    for s in range(n_samples):
        base = s * (1 + len(views))
        picks = torch.linspace(0, window - 1, n_frames).round().long()
        for col, f in enumerate(picks.tolist()):
            ax = axes[base, col]
            ax.imshow(video[s, :, f].permute(1, 2, 0).cpu().numpy())
            ax.set_title(f"frame {f}", fontsize=6)
            for view, c in zip(views, COLOURS * len(views), strict=False):
                t0, t1 = view.prov.extra["time"][s].tolist()
                if t0 <= f + 0.5 < t1:
                    x0, y0, x1, y1 = view.prov.boxes[s].tolist()
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=c, lw=1.2))
        for v, view in enumerate(views):
            t = view.tensor.shape[2]
            for col in range(n_frames):
                ax = axes[base + 1 + v, col]
                if col < t:
                    k = col if t <= n_frames else int(round(col * (t - 1) / (n_frames - 1)))
                    ax.imshow(_frame_rgb(view.tensor[s, :, k]).numpy())
                    t0, t1 = view.prov.extra["time"][s].tolist()
                    frame_at = t0 + (k + 0.5) * (t1 - t0) / t - 0.5
                    ax.set_title(f"{names[v]} @{frame_at:.0f}", fontsize=6, color=COLOURS[v % len(COLOURS)])
        axes[base, 0].set_ylabel(f"clip {s}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    stats: dict[str, float] = {}
    if len(views) >= 2:
        stats = {
            "iou": float(cube_iou(views[0].prov, views[1].prov).mean()),
            "centre_distance": float(cube_centre_distance(views[0].prov, views[1].prov).mean()),
        }
        fig.suptitle(
            f"{names[0]} vs {names[1]}: cube IoU {stats['iou']:.2f}, centre distance {stats['centre_distance']:.2f}",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return stats


# ---------------------------------------------------------------- per-epoch curves


def curve_points(history: list[dict[str, Any]], curve: EpochCurve) -> tuple[list[int], dict[str, list[float]]]:
    """The epochs and each series' values of ``curve``: the rows of ``history`` (the trainer's
    metrics rows) that hold every key of the curve, in epoch order; the last row of an epoch wins."""
    keys = [key for key, _ in curve.series]
    rows = {r["epoch"]: r for r in history if all(k in r for k in keys)}
    epochs = sorted(rows)
    return epochs, {k: [float(rows[e][k]) for e in epochs] for k in keys}


def draw_epoch_curves(run_dir: Path, history: list[dict[str, Any]], curves: tuple[EpochCurve, ...]) -> list[Path]:
    """Each curve's PNG in ``run_dir``, from ``history`` (a checkpoint carries it, so a curve
    survives ``--resume``). A curve with no epoch row yet is skipped. Returns the files written."""
    written = []
    for curve in curves:
        epochs, values = curve_points(history, curve)
        if epochs:
            written.append(_draw_curve(Path(run_dir) / curve.file, curve, epochs, values))
    return written


def _draw_curve(out: Path, curve: EpochCurve, epochs: list[int], values: dict[str, list[float]]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (key, label) in enumerate(curve.series):
        ax.plot(epochs, values[key], MARKERS[i % len(MARKERS)], label=label)
    ax.set_xlabel("epoch")
    ax.set_title(curve.title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
