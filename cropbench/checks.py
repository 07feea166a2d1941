"""Regression check: fresh records against golden records, paper references and claims.

1. Every golden record (``results/golden/``, same layout as records) against the fresh record of the
   same key: each metric, and the deterministic pretraining numbers named in the tolerance file
   (``loss_first``, ``loss_last``). Tolerances come from ``results/golden/tolerances.yaml``.
2. Each entry's ``references`` against the mean over seeds of the records at that scale, if any,
   one comparison per protocol (resolved evaluation settings; external weights apart from ours).
3. Each entry's ``claims`` when both sides have records at that scale under the same protocol.

Every comparison is kept (``CheckReport.compared``); one that fails is also a ``Miss``.
``CheckReport.table()`` lists every comparison, pass or miss, then what was *not* compared: goldens
without a fresh record ("not run": information, a miss only with ``require_all``, as CI asks) and
modified records (run with ``--set`` overrides), which are never compared with a paper reference,
a claim, or a golden of another recipe.
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
from cropbench.reproduction import group_of

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
    checked: int = 0  # comparisons made (with require_all, a missing record counts as one)
    compared: list[tuple[Miss, bool]] = field(default_factory=list)  # every comparison, passed?
    not_run: list[str] = field(default_factory=list)  # golden keys without a fresh record
    modified: dict[str, str] = field(default_factory=dict)  # record key -> its overrides, not compared

    @property
    def passed(self) -> bool:
        return not self.misses

    def table(self) -> str:
        """Every comparison (sorted; status ok or MISS), then what was not compared, then a
        one-line summary; deterministic text."""
        fmt = lambda x: "–" if x is None else f"{x:.6g}"
        rows = [
            [m.key, m.metric, fmt(m.expected), fmt(m.got), fmt(m.tolerance), "ok" if ok else "MISS", m.reason]
            for m, ok in sorted(self.compared, key=lambda c: (c[0].key, c[0].metric, c[0].reason))
        ]
        headers = ["key", "metric", "expected", "got", "tolerance", "status", "reason"]
        out = tabulate(rows, headers, tablefmt="github", disable_numparse=True) + "\n" if rows else ""
        if self.not_run:
            out += f"not run ({len(self.not_run)} goldens without a fresh record; --require-all makes them misses):\n"
            out += "".join(f"  {k}\n" for k in sorted(self.not_run))
        if self.modified:
            out += f"not compared ({len(self.modified)} modified records: run with --set overrides):\n"
            out += "".join(f"  {k}: {v}\n" for k, v in sorted(self.modified.items()))
        summary = f"{self.checked} comparisons, {len(self.misses)} misses"
        extra = f", {len(self.not_run)} not run" if self.not_run else ""
        extra += f", {len(self.modified)} modified not compared" if self.modified else ""
        verdict = "check passed" if self.passed else "check FAILED"
        nothing = " (nothing was compared: no records match a golden, reference or claim)" if not self.compared else ""
        return f"{out}{verdict}: {summary}{extra}{nothing}\n"


def _compare(
    report: CheckReport,
    key: str,
    metric: str,
    expected: float,
    got: float | None,
    tol: Tolerance,
    reason: str,
) -> None:
    allowed = tol.allowed(expected)
    if got is None:
        _add(report, Miss(key, metric, expected, None, allowed, f"{reason}: metric missing"), False)
    else:  # the NaN test fails for a NaN: a miss
        ok = abs(got - expected) <= allowed
        _add(report, Miss(key, metric, expected, got, allowed, f"{reason}: off by {got - expected:+.6g}"), ok)


def _add(report: CheckReport, m: Miss, ok: bool) -> None:
    report.checked += 1
    report.compared.append((m, ok))
    if not ok:
        report.misses.append(m)


def _overrides_text(rec: Record) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(rec.overrides.items()))


def _check_goldens(report: CheckReport, goldens: list[Record], fresh: dict, tol: Tolerances, require_all: bool) -> None:
    """1. each golden record against the fresh record of the same key and the same overrides."""
    for gold in goldens:
        key = str(gold.key)
        rec = fresh.get(gold.key)
        if rec is not None and rec.overrides != gold.overrides:
            report.modified[key] = f"{_overrides_text(rec) or 'none'} (golden: {_overrides_text(gold) or 'none'})"
            rec = None
        if rec is None:
            if key not in report.modified:
                report.not_run.append(key)
            if require_all:
                _add(report, Miss(key, "*", None, None, None, "not run"), False)
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


Means = dict[tuple, dict[tuple[str, str], dict[str, float]]]


def _means(records: list[Record]) -> Means:
    """(scale, entry, variant, eval) -> (protocol hash, weights) -> metric -> mean over seeds (pass
    unmodified records only). Records of different evaluation protocols, or of external weights and
    ours, are never averaged together (``cropbench.reproduction.group_of``)."""
    values: dict[tuple, dict[tuple[str, str], dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        g = group_of(r)
        for metric, v in r.metrics.items():
            values[(r.scale, r.entry, r.variant, r.eval)][(g.protocol, g.weights)][metric].append(v)
    return {
        k: {pg: {m: statistics.fmean(v) for m, v in ms.items()} for pg, ms in gs.items()} for k, gs in values.items()
    }


def _label(key: str, pg: tuple[str, str], groups: int) -> str:
    """``key``, plus the protocol when several share it, plus the weights when external."""
    protocol, weights = pg
    suffix = f" #{protocol}" if groups > 1 else ""
    return key + suffix + ("" if weights == "ours" else f" [{weights}]")


def _check_reference(report: CheckReport, entry: Entry, ref: Reference, means: Means) -> None:
    """2. a reported number against the mean of the records at its scale, per protocol, if any."""
    groups = means.get((ref.scale, entry.name, ref.variant, ref.eval), {})
    key = f"{ref.scale}/{entry.name}/{ref.variant}/{ref.eval}"
    for pg in sorted(groups):
        _compare(
            report,
            _label(key, pg, len(groups)),
            ref.metric,
            ref.value,
            groups[pg].get(ref.metric),
            Tolerance(f"reference {ref.source}", abs=ref.tolerance),
            f"reference ({ref.source})",
        )


def _check_claim(report: CheckReport, entry: Entry, claim: Claim, means: Means) -> None:
    """3. 'variant beats baseline by >= min_delta' when both sides have records at its scale under
    the same protocol (each shared protocol is one comparison)."""
    base_entry, _, base_variant = claim.baseline.partition("/")
    ours = means.get((claim.scale, entry.name, claim.variant, claim.eval), {})
    base = means.get((claim.scale, base_entry, base_variant or "default", claim.eval), {})
    kind = lambda pg: (pg[0], pg[1] == "ours")  # released weights on both sides differ by file
    pairs = [
        (pa, pb)
        for pa in sorted(p for p in ours if claim.metric in ours[p])
        for pb in sorted(p for p in base if claim.metric in base[p])
        if kind(pa) == kind(pb)
    ]
    key = f"{claim.scale}/{entry.name}/{claim.variant}/{claim.eval}"
    for pg, pb in pairs:
        a, b = ours[pg][claim.metric], base[pb][claim.metric]
        delta = a - b
        ok = delta >= claim.min_delta
        sign = ">=" if ok else "<"
        why = f"claim: {claim.text} (Δ {delta:+.2f} vs {claim.baseline} {sign} {claim.min_delta:+.2f})"
        _add(report, Miss(_label(key, pg, len(pairs)), claim.metric, b + claim.min_delta, a, None, why), ok)


def check(
    records_root: Path,
    golden_root: Path,
    entries_root: Path = BENCHMARKS_DIR,
    scale: str | None = None,
    require_all: bool = False,
) -> CheckReport:
    """Compare fresh records with goldens, entry references and claims (one scale or all).
    Modified records (``--set`` overrides) meet only goldens of the same overrides."""
    golden_root = Path(golden_root)
    keep = lambda recs: [r for r in recs if scale is None or r.scale == scale]
    records = keep(load_records(Path(records_root)))
    goldens = keep(load_records(golden_root))
    report = CheckReport()
    if goldens:
        tol = load_tolerances(golden_root / TOLERANCES_FILE)
        _check_goldens(report, goldens, {r.key: r for r in records}, tol, require_all)
    golden_keys = {g.key for g in goldens}
    for r in records:
        if r.overrides and r.key not in golden_keys:
            report.modified[str(r.key)] = _overrides_text(r)
    means = _means([r for r in records if not r.overrides])
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
