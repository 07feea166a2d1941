"""Regression check: fresh records against golden records, paper references and claims.

1. Every golden record (``results/golden/``, same layout as records) against the fresh record of the
   same key: each metric, and the deterministic pretraining numbers named in the tolerance file
   (``loss_first``, ``loss_last``). Tolerances come from ``results/golden/tolerances.yaml``.
2. Each entry's ``references`` against the mean over seeds of the records at that scale, if any.
3. Each entry's ``claims`` when both sides have records at that scale.

Every comparison that fails becomes a ``Miss``; ``CheckReport.table()`` lists them all.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tabulate import tabulate

from cropbench.config import from_dict
from cropbench.errors import ConfigError
from cropbench.recipe import BENCHMARKS_DIR, Claim, Entry, Reference, list_entries, load_entry
from cropbench.records import Record, load_records

TOLERANCES_FILE = "tolerances.yaml"


@dataclass(frozen=True)
class Tolerance:
    why: str  # one line: why this much, and what it still catches
    abs: float | None = None  # allowed |got - expected|, in the metric's units
    rel: float | None = None  # allowed |got - expected| / |expected|

    def allowed(self, expected: float) -> float:
        """The absolute deviation allowed around ``expected``."""
        return self.abs if self.abs is not None else self.rel * abs(expected)


@dataclass(frozen=True)
class Tolerances:
    default: Tolerance  # for a metric not listed below
    metrics: dict[str, Tolerance] = field(default_factory=dict)  # "metric" or "eval/metric"
    pretrain: dict[str, Tolerance] = field(default_factory=dict)  # pretrain keys that are compared

    def for_metric(self, eval_name: str, metric: str) -> Tolerance:
        return self.metrics.get(f"{eval_name}/{metric}") or self.metrics.get(metric) or self.default


def load_tolerances(path: Path) -> Tolerances:
    """Parse and validate the tolerance file: each tolerance has one of abs/rel (>= 0) and a why."""
    try:
        tol = from_dict(Tolerances, yaml.safe_load(Path(path).read_text()), str(path))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the tolerance file: {e}") from e
    named = {
        "default": tol.default,
        **{f"metrics.{k}": v for k, v in tol.metrics.items()},
        **{f"pretrain.{k}": v for k, v in tol.pretrain.items()},
    }
    for name, t in named.items():
        if (t.abs is None) == (t.rel is None):
            raise ConfigError(f"{path}: {name}: give exactly one of 'abs' or 'rel'")
        if (t.abs if t.abs is not None else t.rel) < 0 or not t.why.strip():
            raise ConfigError(f"{path}: {name}: the tolerance must be >= 0 and 'why' must say why")
    return tol


@dataclass(frozen=True)
class Miss:
    key: str  # scale/entry/variant/eval[/seedN]
    metric: str
    expected: float | None
    got: float | None
    tolerance: float | None  # absolute deviation allowed (None for claims and missing runs)
    reason: str


@dataclass
class CheckReport:
    misses: list[Miss] = field(default_factory=list)
    checked: int = 0  # comparisons made (a missing record counts as one)

    @property
    def passed(self) -> bool:
        return not self.misses

    def table(self) -> str:
        """Every miss as a table (sorted), then a one-line summary; deterministic text."""
        summary = f"{self.checked} comparisons, {len(self.misses)} misses\n"
        if self.passed:
            return "check passed: " + summary
        fmt = lambda x: "–" if x is None else f"{x:.6g}"
        rows = [
            [m.key, m.metric, fmt(m.expected), fmt(m.got), fmt(m.tolerance), m.reason]
            for m in sorted(self.misses, key=lambda m: (m.key, m.metric, m.reason))
        ]
        headers = ["key", "metric", "expected", "got", "tolerance", "reason"]
        return (
            tabulate(rows, headers, tablefmt="github", disable_numparse=True)
            + "\ncheck FAILED: "
            + summary
        )


def _compare(
    report: CheckReport,
    key: str,
    metric: str,
    expected: float,
    got: float | None,
    tol: Tolerance,
    reason: str,
) -> None:
    report.checked += 1
    allowed = tol.allowed(expected)
    if got is None:
        report.misses.append(
            Miss(key, metric, expected, None, allowed, f"{reason}: metric missing")
        )
    elif not abs(got - expected) <= allowed:  # also catches NaN
        report.misses.append(
            Miss(key, metric, expected, got, allowed, f"{reason}: off by {got - expected:+.6g}")
        )


def _check_goldens(
    report: CheckReport, goldens: list[Record], fresh: dict, tol: Tolerances, allow_missing: bool
) -> None:
    """1. each golden record against the fresh record of the same key."""
    for gold in goldens:
        key = str(gold.key)
        rec = fresh.get(gold.key)
        if rec is None:
            if not allow_missing:
                report.checked += 1
                report.misses.append(Miss(key, "*", None, None, None, "not run"))
            continue
        for metric, value in sorted(gold.metrics.items()):
            _compare(
                report,
                key,
                metric,
                value,
                rec.metrics.get(metric),
                tol.for_metric(gold.eval, metric),
                "golden",
            )
        for name, t in sorted(tol.pretrain.items()):
            if name in gold.pretrain:
                _compare(
                    report,
                    key,
                    f"pretrain.{name}",
                    gold.pretrain[name],
                    rec.pretrain.get(name),
                    t,
                    "golden",
                )


def _means(records: list[Record]) -> dict[tuple, dict[str, float]]:
    """(scale, entry, variant, eval) -> metric -> mean over seeds."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for metric, v in r.metrics.items():
            values[(r.scale, r.entry, r.variant, r.eval)][metric].append(v)
    return {k: {m: statistics.fmean(v) for m, v in ms.items()} for k, ms in values.items()}


def _check_reference(report: CheckReport, entry: Entry, ref: Reference, means: dict) -> None:
    """2. a reported number against the mean of the records at its scale, if there are any."""
    got = means.get((ref.scale, entry.name, ref.variant, ref.eval))
    if got is None:
        return
    key = f"{ref.scale}/{entry.name}/{ref.variant}/{ref.eval}"
    _compare(
        report,
        key,
        ref.metric,
        ref.value,
        got.get(ref.metric),
        Tolerance(f"reference {ref.source}", abs=ref.tolerance),
        f"reference ({ref.source})",
    )


def _check_claim(report: CheckReport, entry: Entry, claim: Claim, means: dict) -> None:
    """3. 'variant beats baseline by >= min_delta' when both sides have records at its scale."""
    base_entry, _, base_variant = claim.baseline.partition("/")
    ours = means.get((claim.scale, entry.name, claim.variant, claim.eval), {}).get(claim.metric)
    base = means.get((claim.scale, base_entry, base_variant or "default", claim.eval), {}).get(
        claim.metric
    )
    if ours is None or base is None:
        return
    report.checked += 1
    delta = ours - base
    if not delta >= claim.min_delta:
        key = f"{claim.scale}/{entry.name}/{claim.variant}/{claim.eval}"
        report.misses.append(
            Miss(
                key,
                claim.metric,
                base + claim.min_delta,
                ours,
                None,
                f"claim: {claim.text} (Δ {delta:+.2f} vs {claim.baseline} "
                f"< {claim.min_delta:+.2f})",
            )
        )


def check(
    records_root: Path,
    golden_root: Path,
    entries_root: Path = BENCHMARKS_DIR,
    scale: str | None = None,
    allow_missing: bool = False,
) -> CheckReport:
    """Compare fresh records with goldens, entry references and claims (one scale or all)."""
    golden_root = Path(golden_root)
    keep = lambda recs: [r for r in recs if scale is None or r.scale == scale]
    records = keep(load_records(Path(records_root)))
    goldens = keep(load_records(golden_root))
    report = CheckReport()
    if goldens:
        tol = load_tolerances(golden_root / TOLERANCES_FILE)
        _check_goldens(report, goldens, {r.key: r for r in records}, tol, allow_missing)
    means = _means(records)
    for name in list_entries(Path(entries_root)):
        entry = load_entry(name, Path(entries_root))
        for ref in entry.references:
            if scale is None or ref.scale == scale:
                _check_reference(report, entry, ref, means)
        for claim in entry.claims:
            if scale is None or claim.scale == scale:
                _check_claim(report, entry, claim, means)
    return report


__all__ = ["check", "CheckReport", "Miss", "Tolerance", "Tolerances", "load_tolerances"]
