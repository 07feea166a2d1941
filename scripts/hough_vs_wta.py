"""Hough voting vs winner-takes-all: dense matching accuracy under clutter and outliers.

HoughCL's point [Lee et al., arXiv 2111.10794]: DenseCL's winner-takes-all positives are fooled by
background clutter (many equally similar cells) and outliers (distractor cells), while Hough
voting over match offsets keeps the geometrically consistent ones. For a grid of clutter and
outlier rates this prints and plots the share of query cells matched to their true key cell by
four matchers on the same pairs: the identity map (same grid cell), DenseCL's WTA, HoughCL's
voting with each offset bin's mass normalised by its number of candidate matches (the default),
and the unnormalised vote sum (which favours the zero offset: it holds S² matches, a corner 1).

Two kinds of pairs of 4×4 dense feature maps (``cropbench.methods.houghcl``):

* ``shift``: two windows of one feature scene related by a known integer shift, the case a
  translation-only Hough space models exactly;
* ``crop``: two RandomResizedCrop views of one feature canvas drawn independently by the project's
  view generator (scale, aspect, flip), truth from the views' provenance (``geometric_truth``).

``--micro-init N`` also measures the matchers on N real micro view pairs at initialisation (the
houghcl entry's micro encoder on the embedded data), with the same-cell rate of each.

    python scripts/hough_vs_wta.py [--pairs 256] [--out hough_vs_wta.png] [--micro-init 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cropbench.methods.houghcl import compare_matchers, synthetic_crop_pairs, synthetic_shift_pairs

CLUTTER = (0.0, 0.25, 0.5, 0.75)
OUTLIERS = (0.0, 0.2, 0.4)
KINDS = {
    "shift": lambda n, c, o, g: synthetic_shift_pairs(n, size=4, clutter=c, outliers=o, generator=g),
    "crop": lambda n, c, o, g: synthetic_crop_pairs(n, clutter=c, outliers=o, generator=g),
}
STYLE = {
    "identity": ("identity (same grid cell)", ":", "grey"),
    "wta": ("winner-takes-all (DenseCL)", "--", "tab:blue"),
    "hough": ("Hough voting, normalised (HoughCL)", "-", "tab:red"),
    "hough_sum": ("Hough voting, unnormalised sum", "-.", "tab:orange"),
}
Results = dict[tuple[str, float, float], dict[str, float]]


def measure(pairs: int, seed: int) -> Results:
    """Accuracy of every matcher for each (kind, clutter, outliers), same pairs for all."""
    out = {}
    for kind, make in KINDS.items():
        for clutter in CLUTTER:
            for outliers in OUTLIERS:
                g = torch.Generator().manual_seed(seed)
                out[(kind, clutter, outliers)] = compare_matchers(make(pairs, clutter, outliers, g))
    return out


def micro_init(pairs: int, seed: int) -> dict[str, float]:
    """The matchers on real micro views at initialisation, against the provenance truth."""
    from cropbench.data.images import collate_images
    from cropbench.methods.base import MethodContext
    from cropbench.methods.dense import geometric_truth
    from cropbench.methods.houghcl import CropPairs
    from cropbench.recipe import load_entry
    from cropbench.runner import build_method, build_train_set

    recipe = load_entry("houghcl").recipe("default", "micro")
    dataset = build_train_set(recipe, None)
    method = build_method(recipe, MethodContext()).train()
    batch = collate_images([dataset[i] for i in range(pairs)])
    with torch.no_grad():
        v_q, v_k = method.make_views(batch, torch.Generator().manual_seed(seed))
        c5_q = method.backbone.forward_stages(v_q.tensor)[-1]
        c5_k = method.key_backbone.forward_stages(v_k.tensor)[-1]
    truth = geometric_truth(v_q.prov, v_k.prov, tuple(c5_q.shape[2:]))
    return compare_matchers(CropPairs(c5_q, c5_k, truth, v_q.prov, v_k.prov))


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(KINDS), len(OUTLIERS), figsize=(4 * len(OUTLIERS), 3.2 * len(KINDS)), sharey=True)
    for row, kind in zip(axes, KINDS, strict=True):
        for ax, outliers in zip(row, OUTLIERS, strict=True):
            for name, (label, style, colour) in STYLE.items():
                ys = [100 * results[(kind, c, outliers)][name] for c in CLUTTER]
                ax.plot(CLUTTER, ys, style, marker="o", ms=3, color=colour, label=label)
            what = "shifted windows" if kind == "shift" else "RandomResizedCrop views"
            ax.set_title(f"{what}, outlier cells {outliers:.0%}", fontsize=9)
            ax.set_xlabel("background clutter (share of repeated features)")
            ax.set_ylim(0, 102)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("true matches (% of query cells)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(results: Results) -> None:
    names = list(STYLE)
    print(f"{'pairs':>6} {'clutter':>8} {'outliers':>9} " + " ".join(f"{n:>10}" for n in names))
    for (kind, clutter, outliers), acc in results.items():
        cells = " ".join(f"{100 * acc[n]:10.1f}" for n in names)
        print(f"{kind:>6} {clutter:8.2f} {outliers:9.2f} {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256, help="feature-map pairs per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("hough_vs_wta.png"))
    ap.add_argument("--micro-init", type=int, default=0, help="also measure N real micro pairs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = measure(args.pairs, args.seed)
    _print(results)
    plot(results, args.out)
    print(f"wrote {args.out}")
    if args.micro_init:
        acc = micro_init(args.micro_init, args.seed)
        print(f"micro views at init ({args.micro_init} pairs): accuracy / same-cell rate")
        for name in STYLE:
            print(f"  {name:>10}: {acc[name]:.3f} / {acc[name + '_same']:.2f}")


if __name__ == "__main__":
    main()
