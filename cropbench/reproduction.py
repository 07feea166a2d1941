"""The reproduction view: did it reproduce? Each entry's reported numbers beside ours, and its claims.

For every entry with ``references`` (``benchmarks/<entry>/entry.yaml``), one row per reference and
*protocol group*: the paper's number and its source, ours as mean ± 95 % t-interval over seeds (n),
the difference, the verdict against the reference's tolerance (as ``cropbench check``), and the
protocol used. A reference without records says ``not run``; it never vanishes. A claims table
evaluates each claim ("variant beats baseline by >= min_delta") with both sides shown.

Records share a cell only when they share a protocol group: the same scale and evaluation, the same
protocol hash (the resolved evaluation settings; ``provenance.protocol_hash``), the same weights
(our pretraining, or one external checkpoint: ``provenance.weights``) and the same ``--set``
overrides. Records from external weights are labelled ``external:<file>``; modified records are
shown but never given a verdict. The output is a pure function of the records and entries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cropbench.recipe import BENCHMARKS_DIR, Claim, Entry, Reference, list_entries, load_entry
from cropbench.records import Record

NOT_RUN = "not run"


@dataclass(frozen=True, order=True)
class Group:
    """What records must share to be aggregated into one cell."""

    scale: str
    eval: str
    protocol: str  # first 8 hex digits of the protocol hash
    weights: str  # "ours" or "external:<file name>@<sha256[:8]>"
    overrides: str  # "" or "k=v, ..." of --set

    @property
    def label(self) -> str:
        mod = f" (modified: {self.overrides})" if self.overrides else ""
        ext = "" if self.weights == "ours" else f" {self.weights}"
        return f"{self.scale}/{self.eval}#{self.protocol}{ext}{mod}"


def protocol_hash(rec: Record) -> str:
    """The record's protocol hash (``provenance.protocol_hash``), else a hash of the evaluation's
    settings as the recipe recorded them (older records: often ``{}``, i.e. the defaults)."""
    found = rec.provenance.get("protocol_hash")
    if found:
        return str(found)[:8]
    recipe = rec.provenance.get("recipe") or {}
    settings = (recipe.get("eval") or {}).get(rec.eval, {}) if isinstance(recipe, dict) else {}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def weights_label(rec: Record) -> str:
    """``ours`` for weights this suite pretrained (``cropbench run``, or ``cropbench eval`` of our
    own checkpoint), ``external:<file>@<sha8>`` for others (``provenance.external_weights``; in
    records without that flag, any ``provenance.weights`` counts as external)."""
    w = rec.provenance.get("weights")
    external = rec.provenance.get("external_weights")
    if not (bool(w) if external is None else bool(external)):
        return "ours"
    if isinstance(w, dict):
        name = Path(str(w.get("file") or "?")).name
        sha = str(w.get("sha256") or "")[:8]
        return f"external:{name}@{sha}" if sha else f"external:{name}"
    return f"external:{Path(str(w)).name}" if w else "external"


def group_of(rec: Record) -> Group:
    mods = ", ".join(f"{k}={v}" for k, v in sorted(rec.overrides.items()))
    return Group(rec.scale, rec.eval, protocol_hash(rec), weights_label(rec), mods)


def t_quantile(p: float, df: float) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (``math.inf``: the normal's).
    scipy comes with scikit-learn, a dependency."""
    from scipy.stats import t

    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t quantile: need 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    return float(t.ppf(p, df))


def t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    return t_quantile(0.975, df)


@dataclass(frozen=True)
class Estimate:
    mean: float
    half: float | None  # 95 % t-interval half-width; None for one seed
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Estimate:
        n = len(values)
        if n < 2:
            return cls(values[0], None, 1)
        return cls(statistics.fmean(values), t975(n - 1) * statistics.stdev(values) / math.sqrt(n), n)

    def text(self, bare_single: bool = False) -> str:
        """``mean ± half (n=N)``; one seed: ``mean (n=1)``, or the plain ``mean`` if ``bare_single``."""
        if self.half is None:
            return f"{self.mean:.2f}" if bare_single else f"{self.mean:.2f} (n={self.n})"
        return f"{self.mean:.2f} ± {self.half:.2f} (n={self.n})"


Cells = dict[tuple[str, str, str], dict[Group, dict[str, list[float]]]]  # (entry, variant, eval)


def cells(records: Iterable[Record]) -> Cells:
    """(entry, variant, eval) -> protocol group -> metric -> one value per seed."""
    out: Cells = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for rec in sorted(records, key=lambda r: r.key):
        for metric, value in sorted(rec.metrics.items()):
            out[(rec.entry, rec.variant, rec.eval)][group_of(rec)][metric].append(float(value))
    return out


def _verdict(group: Group, est: Estimate, expected: float, tol: float) -> str:
    if group.overrides:
        return "not compared (modified)"
    ok = abs(est.mean - expected) <= tol  # NaN -> outside
    return f"{'within' if ok else 'OUTSIDE'} ±{tol:g}"


def reference_rows(entry: Entry, ref: Reference, found: Cells) -> list[list[str]]:
    """One row per protocol group that has the reference's metric at its scale, else ``not run``."""
    head = [ref.variant, ref.eval, ref.metric, ref.scale, f"{ref.value:.2f}"]
    groups = found.get((entry.name, ref.variant, ref.eval), {})
    rows = []
    for g in sorted(groups):
        values = groups[g].get(ref.metric)
        if g.scale != ref.scale or not values:
            continue
        est = Estimate.of(values)
        diff = f"{est.mean - ref.value:+.2f}"
        rows.append([*head, est.text(), diff, _verdict(g, est, ref.value, ref.tolerance), g.label, ref.source])
    return rows or [[*head, "–", "–", NOT_RUN, "–", ref.source]]


REFERENCE_HEADERS = [
    "variant",
    "eval",
    "metric",
    "scale",
    "paper",
    "ours (95% CI)",
    "Δ",
    "verdict",
    "protocol",
    "source",
]


def _claim_sides(claim: Claim, entry: Entry, found: Cells) -> tuple[dict, dict]:
    base_entry, _, base_variant = claim.baseline.partition("/")
    ours = found.get((entry.name, claim.variant, claim.eval), {})
    base = found.get((base_entry, base_variant or "default", claim.eval), {})
    pick = lambda side: {g: v[claim.metric] for g, v in side.items() if g.scale == claim.scale and v.get(claim.metric)}
    return pick(ours), pick(base)


def claim_key(g: Group) -> tuple:
    """What both sides of a claim must share: scale, evaluation, protocol, overrides and the kind
    of weights (ours on both sides, or released weights on both: their files differ by nature)."""
    return (g.scale, g.eval, g.protocol, g.weights == "ours", g.overrides)


def claim_rows(entry: Entry, claim: Claim, found: Cells) -> list[list[str]]:
    """One row per pair of protocol groups the sides share (``claim_key``); a side without
    records, or no shared protocol, is said so."""
    ours, base = _claim_sides(claim, entry, found)
    head = [claim.text, f"{entry.name}/{claim.variant}", claim.baseline, f"{claim.eval}/{claim.metric}", claim.scale]
    pairs = [(ga, gb) for ga in sorted(ours) for gb in sorted(base) if claim_key(ga) == claim_key(gb)]
    if not pairs:
        missing = [n for n, side in ((f"{entry.name}/{claim.variant}", ours), (claim.baseline, base)) if not side]
        why = f"{NOT_RUN}: {', '.join(missing)}" if missing else "not compared: no shared protocol"
        return [[*head, "–", "–", "–", f"≥ {claim.min_delta:+.2f}", why, "–"]]
    rows = []
    for ga, gb in pairs:
        a, b = Estimate.of(ours[ga]), Estimate.of(base[gb])
        delta = a.mean - b.mean
        if ga.overrides:
            verdict = "not compared (modified)"
        else:
            verdict = "holds" if delta >= claim.min_delta else "FAILS"
        label = ga.label if ga == gb else f"{ga.label} vs {gb.weights}"
        rows.append([*head, a.text(), b.text(), f"{delta:+.2f}", f"≥ {claim.min_delta:+.2f}", verdict, label])
    return rows


CLAIM_HEADERS = [
    "claim",
    "entry/variant",
    "baseline",
    "eval/metric",
    "scale",
    "ours (95% CI)",
    "baseline (95% CI)",
    "Δ",
    "needs",
    "verdict",
    "protocol",
]


def entries(root: Path = BENCHMARKS_DIR) -> list[Entry]:
    """The entries under ``root``, parsed once per state of their files (name and mtime)."""
    root = Path(root)
    names = tuple(list_entries(root))
    stamp = tuple((n, (root / n / "entry.yaml").stat().st_mtime_ns) for n in names)
    return list(_entries(root, stamp))


@functools.lru_cache(maxsize=4)
def _entries(root: Path, stamp: tuple[tuple[str, int], ...]) -> tuple[Entry, ...]:
    return tuple(load_entry(name, root) for name, _ in stamp)


def reproduction_tables(
    records: Iterable[Record], root: Path = BENCHMARKS_DIR
) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, body) per entry with references or claims: its reference rows, then its
    claim rows; deterministic (entries by name, rows in entry.yaml order, groups sorted)."""
    found = cells(records)
    out = []
    for entry in entries(root):
        if entry.references:
            body = [row for ref in entry.references for row in reference_rows(entry, ref, found)]
            out.append((f"reproduction · {entry.name}", REFERENCE_HEADERS, body))
        if entry.claims:
            body = [row for claim in entry.claims for row in claim_rows(entry, claim, found)]
            out.append((f"claims · {entry.name}", CLAIM_HEADERS, body))
    return out


__all__ = ["Estimate", "Group", "group_of", "reproduction_tables", "t975", "t_quantile", "NOT_RUN"]
