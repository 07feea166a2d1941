"""Per-entry seed summary of micro records: kNN / linear mean ± std over seeds, beside the same
encoders at random init and beside the entry's base method, plus each loss component's first and
last value (mean over seeds).

    python scripts/seed_report.py RECORDS_DIR [--scale micro] [--out FILE.md]

RECORDS_DIR is what `cropbench run ... --seed 0 --seed 1 --seed 2 --random-init --out RECORDS_DIR`
wrote (records/<scale>/<entry>/<variant>/<eval>/seed<N>.json). `scripts/seed_sweep.sh` makes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

# The method each paper builds on, as its like-for-like micro row: the MoCo-family entries keep
# mocov2/asymmetric's loss, recipe and views (README, "What the micro scale can show").
BASE = {
    ("densecl", "default"): ("mocov2", "asymmetric"),
    ("houghcl", "default"): ("densecl", "default"),
    ("regioncl", "m"): ("mocov2", "asymmetric"),
    ("regioncl", "d"): ("densecl", "default"),
    ("regioncl", "s"): ("simsiam", "default"),
    ("cyborgs", "default"): ("byol", "default"),
}
METRICS = (("knn", "top1"), ("linear", "top1"))
RANDOM = "+random_init"


def load(root: Path, scale: str) -> dict[tuple[str, str], dict]:
    """(entry, variant) -> {"metrics": {(eval, metric): {seed: value}}, "pretrain": {seed: dict}}."""
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"metrics": defaultdict(dict), "pretrain": {}})
    for path in sorted((root / scale).glob("*/*/*/seed*.json")):
        rec = json.loads(path.read_text())
        row = rows[(rec["entry"], rec["variant"])]
        for metric, value in rec["metrics"].items():
            row["metrics"][(rec["eval"], metric)][rec["seed"]] = float(value)
        if rec.get("pretrain"):
            row["pretrain"][rec["seed"]] = rec["pretrain"]
    return rows


def stat(values: dict[int, float] | None) -> str:
    if not values:
        return "–"
    v = list(values.values())
    if len(v) == 1:
        return f"{v[0]:.1f} (n=1)"
    return f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f} (n={len(v)})"


def mean(values: dict[int, float] | None) -> float | None:
    return statistics.fmean(values.values()) if values else None


def components(pretrain: dict[int, dict]) -> str:
    """'name first→last' for every loss component, means over seeds."""
    if not pretrain:
        return "–"
    names = sorted({k[: -len("_first")] for p in pretrain.values() for k in p if k.endswith("_first")})
    parts = []
    for name in names:
        first = [p[f"{name}_first"] for p in pretrain.values() if f"{name}_first" in p]
        last = [p[f"{name}_last"] for p in pretrain.values() if f"{name}_last" in p]
        if first and last:
            parts.append(f"{name} {statistics.fmean(first):.3f}→{statistics.fmean(last):.3f}")
    return "; ".join(parts) or "–"


def report(rows: dict[tuple[str, str], dict]) -> str:
    head = ["entry/variant"]
    for e, m in METRICS:
        head += [f"{e} {m}", "random init", "Δ vs random", "base", "Δ vs base"]
    head.append("loss components (first→last)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (entry, variant), row in sorted(rows.items()):
        if variant.endswith(RANDOM) or not any(k in row["metrics"] for k in METRICS):
            continue
        cells = [f"{entry}/{variant}"]
        rand = rows.get((entry, variant + RANDOM), {"metrics": {}})["metrics"]
        base_key = BASE.get((entry, variant))
        base = rows.get(base_key, {"metrics": {}})["metrics"] if base_key else {}
        for key in METRICS:
            ours, r, b = row["metrics"].get(key), rand.get(key), base.get(key)
            cells += [
                stat(ours),
                stat(r),
                _delta(ours, r),
                f"{base_key[0]}/{base_key[1]}: {stat(b)}" if base_key else "–",
            ]
            cells.append(_delta(ours, b) if base_key else "–")
        cells.append(components(row["pretrain"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _delta(a: dict[int, float] | None, b: dict[int, float] | None) -> str:
    ma, mb = mean(a), mean(b)
    return "–" if ma is None or mb is None else f"{ma - mb:+.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--scale", default="micro")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.records / args.scale).is_dir():
        raise SystemExit(f"error: {args.records / args.scale} is not a folder of records")
    text = report(load(args.records, args.scale))
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
