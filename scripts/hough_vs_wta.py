"""Hough voting vs winner-takes-all: dense matching accuracy under clutter and outliers.

HoughCL's point [Lee et al., arXiv 2111.10794]: DenseCL's winner-takes-all positives are fooled by
background clutter (many equally similar cells) and outliers (distractor cells), while Hough
voting over match offsets keeps the geometrically consistent ones. On pairs of 7×7 dense feature
maps with a known shift (``cropbench.methods.houghcl.synthetic_shift_pairs``) this prints the
share of query cells matched to their true key cell, for a grid of clutter and outlier rates,
and writes the same numbers as a figure.

The pairs differ by a pure shift, the case a translation-only Hough space models exactly; real
RandomResizedCrop pairs also differ in scale (the training log's ``match_acc`` measures matchers
on those, against the geometric truth from the views' provenance).

    python scripts/hough_vs_wta.py [--pairs 256] [--out hough_vs_wta.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cropbench.methods.houghcl import compare_matchers, synthetic_shift_pairs

CLUTTER = (0.0, 0.25, 0.5, 0.75)
OUTLIERS = (0.0, 0.2, 0.4)


def measure(pairs: int, seed: int) -> dict[tuple[float, float], dict[str, float]]:
    """Accuracy of both matchers for every (clutter, outlier) setting, same pairs for both."""
    out = {}
    for clutter in CLUTTER:
        for outliers in OUTLIERS:
            g = torch.Generator().manual_seed(seed)
            p = synthetic_shift_pairs(pairs, clutter=clutter, outliers=outliers, generator=g)
            out[(clutter, outliers)] = compare_matchers(p)
    return out


def plot(results: dict[tuple[float, float], dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OUTLIERS), figsize=(4 * len(OUTLIERS), 3.2), sharey=True)
    for ax, outliers in zip(axes, OUTLIERS, strict=True):
        for name, style in (("wta", "o--"), ("hough", "s-")):
            ys = [100 * results[(c, outliers)][name] for c in CLUTTER]
            label = "winner-takes-all (DenseCL)" if name == "wta" else "Hough voting (HoughCL)"
            ax.plot(CLUTTER, ys, style, label=label)
        ax.set_title(f"outlier cells: {outliers:.0%}")
        ax.set_xlabel("background clutter (share of repeated cells)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("true matches (% of query cells)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256, help="feature-map pairs per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("hough_vs_wta.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = measure(args.pairs, args.seed)
    print(f"{'clutter':>8} {'outliers':>9} {'WTA %':>7} {'Hough %':>8}")
    for (clutter, outliers), acc in results.items():
        print(f"{clutter:8.2f} {outliers:9.2f} {100 * acc['wta']:7.1f} {100 * acc['hough']:8.1f}")
    plot(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
