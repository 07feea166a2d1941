"""Regression check: fresh records against golden records, paper references and claims.

1. The golden records (``results/golden/``, same layout as records) of each *job* (scale, entry,
   variant, evaluation; one recipe) hold one or several seeds. A fresh record of that job is
   compared, for each metric and each pretraining number of the tolerance file (``loss_last``):
   - with n >= 2 golden seeds, with their distribution, whatever its seed: mean m, sample std s,
     allowed deviation ``max(floor, t_{1-alpha/2, n-1} * s * sqrt(1 + 1/n))``, the half-width of the
     prediction interval for one new draw from a normal distribution estimated from n draws;
   - with one golden seed, with that seed's record under the fixed tolerances, as a re-run of the
     same seed (a fresh record of another seed has nothing to be compared with).
   The pretraining numbers named ``distribution.per_seed`` (``loss_first``: a pure function of the
   seed, the initialisation and the views) are compared exactly, with the same seed's golden only.
   Tolerances, ``alpha`` and the floors come from ``results/golden/tolerances.yaml``; a one-seed
   tolerance is looked up as the job's own (``jobs``: "entry/variant/eval/metric"), then
   "eval/metric", "metric", ``default``. The trace goldens (``results/golden/traces``, records of
   ``cropbench run --trace-epochs K``, evaluation ``trace``) are checked the same way, with their
   own tolerance file there.
2. Each entry's ``references`` against the mean over seeds of the records at that scale, if any,
   one comparison per protocol (resolved evaluation settings; external weights apart from ours).
3. Each entry's ``claims`` when both sides have records at that scale under the same protocol.

Every comparison is kept (``CheckReport.compared``); one that fails is also a ``Miss``.
``CheckReport.table()`` lists every comparison, pass or miss, then what was *not* compared: golden
jobs without a fresh record ("not run", one line per job with its seed count: information, a miss
only with ``require_all``, as CI asks), modified records (run with ``--set`` overrides), which are
never compared with a paper reference, a claim, or a golden of another recipe, and records of a
one-seed golden job run with another seed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
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
from cropbench.reproduction import group_of, t_quantile

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
class Floors:
    """The float-noise floor of a distribution comparison, per metric and pretraining number."""

    default: Tolerance  # for a metric not listed below
    metrics: dict[str, Tolerance] = field(default_factory=dict)  # "metric" or "eval/metric"
    pretrain: dict[str, Tolerance] = field(default_factory=dict)  # every distribution-compared pretrain key

    def for_metric(self, eval_name: str, metric: str) -> Tolerance:
        return self.metrics.get(f"{eval_name}/{metric}") or self.metrics.get(metric) or self.default


@dataclass(frozen=True)
class Distribution:
    """How a fresh record meets goldens of n >= 2 seeds: a prediction interval for one new draw."""

    alpha: float  # two-sided miss probability of one fresh draw from the golden distribution
    why: str  # why this alpha
    floor: Floors  # the allowed deviation never drops below this (all golden seeds may agree: s = 0)
    per_seed: tuple[str, ...] = ("loss_first",)  # pretrain keys compared with the same seed only

    def allowed(self, values: list[float], floor: Tolerance) -> float:
        """``max(floor, prediction_half_width(values, alpha))`` around the golden mean."""
        return max(floor.allowed(statistics.fmean(values)), prediction_half_width(values, self.alpha))


def prediction_half_width(values: list[float], alpha: float) -> float:
    """``t_{1-alpha/2, n-1} * s * sqrt(1 + 1/n)``: half-width of the 1 - alpha prediction interval
    for one new draw, from n >= 2 draws of mean m and sample std s (normal model)."""
    n = len(values)
    s = statistics.stdev(values)
    return t_quantile(1.0 - alpha / 2.0, n - 1) * s * math.sqrt(1.0 + 1.0 / n)


@dataclass(frozen=True)
class Tolerances:
    default: Tolerance  # for a metric not listed below
    metrics: dict[str, Tolerance] = field(default_factory=dict)  # "metric" or "eval/metric"
    pretrain: dict[str, Tolerance] = field(default_factory=dict)  # pretrain keys that are compared
    distribution: Distribution | None = None  # needed once a golden job has n >= 2 seeds
    # "entry/variant/eval/metric": one job's own tolerance, where float drift differs by job (traces)
    jobs: dict[str, Tolerance] = field(default_factory=dict)

    def for_metric(self, eval_name: str, metric: str, job: str = "") -> Tolerance:
        """The tolerance of ``metric``: the job's own (``job`` = "entry/variant"), else the
        evaluation's ("eval/metric"), else the metric's, else ``default``."""
        own = self.jobs.get(f"{job}/{eval_name}/{metric}") if job else None
        return own or self.metrics.get(f"{eval_name}/{metric}") or self.metrics.get(metric) or self.default


def _check_tolerance(path: Path, name: str, t: Tolerance) -> None:
    if (t.abs is None) == (t.rel is None):
        raise ConfigError(f"{path}: {name}: give exactly one of 'abs' or 'rel'")
    if (t.abs if t.abs is not None else t.rel) < 0 or not t.why.strip():
        raise ConfigError(f"{path}: {name}: the tolerance must be >= 0 and 'why' must say why")


def _check_distribution(path: Path, tol: Tolerances) -> None:
    d = tol.distribution
    if d is None:
        return
    if not 0.0 < d.alpha < 1.0 or not d.why.strip():
        raise ConfigError(f"{path}: distribution.alpha: expected 0 < alpha < 1 with a 'why', got {d.alpha!r}")
    for name in d.per_seed:
        if name not in tol.pretrain:
            raise ConfigError(f"{path}: distribution.per_seed: {name!r} is not a key of 'pretrain'")
    for name in sorted(set(tol.pretrain) - set(d.per_seed) - set(d.floor.pretrain)):
        raise ConfigError(f"{path}: distribution.floor.pretrain.{name}: missing (pretrain.{name} is compared)")
    floors = {"distribution.floor.default": d.floor.default}
    floors |= {f"distribution.floor.metrics.{k}": v for k, v in d.floor.metrics.items()}
    floors |= {f"distribution.floor.pretrain.{k}": v for k, v in d.floor.pretrain.items()}
    for name, t in floors.items():
        _check_tolerance(path, name, t)


def load_tolerances(path: Path) -> Tolerances:
    """Parse and validate the tolerance file: each tolerance has one of abs/rel (>= 0) and a why;
    ``distribution`` (optional) has 0 < alpha < 1 and a floor for every compared pretrain key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the tolerance file: {e}") from e
    dist = data.pop("distribution", None) if isinstance(data, dict) else None
    tol = from_dict(Tolerances, data, str(path))
    if dist is not None:  # parsed on its own, so that an error names the key inside it
        tol = dataclasses.replace(tol, distribution=from_dict(Distribution, dist, str(path), "distribution"))
    named = {
        "default": tol.default,
        **{f"metrics.{k}": v for k, v in tol.metrics.items()},
        **{f"pretrain.{k}": v for k, v in tol.pretrain.items()},
        **{f"jobs.{k}": v for k, v in tol.jobs.items()},
    }
    for k in tol.jobs:
        if len(k.split("/")) != 4 or not all(k.split("/")):
            want = "expected a key entry/variant/eval/metric, e.g. simclr/default/trace/loss"
            raise ConfigError(f"{path}: jobs.{k}: {want}")
    for name, t in named.items():
        _check_tolerance(path, name, t)
    _check_distribution(path, tol)
    return tol


@dataclass(frozen=True)
class Miss:
    key: str  # scale/entry/variant/eval[/seedN]
    metric: str
    expected: float | None  # the golden value, or the golden seeds' mean
    got: float | None
    tolerance: float | None  # absolute deviation allowed (None for claims and missing runs)
    reason: str
    n: int | None = None  # golden seeds behind ``expected`` (None: not a golden, or one seed's value)
    spread: float | None = None  # sample std of the golden seeds (a distribution comparison)


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.6g}"


def _expected_text(m: Miss) -> str:
    """``m ± allowed (n=…, s=…)`` for a distribution, ``value (n=1)`` for one golden seed."""
    if m.spread is not None:
        return f"{_g(m.expected)} ± {m.tolerance:.3g} (n={m.n}, s={m.spread:.3g})"
    return f"{_g(m.expected)} (n={m.n})" if m.n is not None else _g(m.expected)


@dataclass
class CheckReport:
    misses: list[Miss] = field(default_factory=list)
    checked: int = 0  # comparisons made (with require_all, a missing record counts as one)
    compared: list[tuple[Miss, bool]] = field(default_factory=list)  # every comparison, passed?
    not_run: list[str] = field(default_factory=list)  # golden jobs without a fresh record
    golden_seeds: dict[str, int] = field(default_factory=dict)  # every golden job -> its number of seeds
    modified: dict[str, str] = field(default_factory=dict)  # record key -> its overrides, not compared
    unmatched: list[str] = field(default_factory=list)  # records of a one-seed golden job, other seed

    @property
    def passed(self) -> bool:
        return not self.misses

    def table(self) -> str:
        """Every comparison (sorted; status ok or MISS), then what was not compared, then a
        one-line summary; deterministic text."""
        rows = [
            [m.key, m.metric, _expected_text(m), _g(m.got), _g(m.tolerance), "ok" if ok else "MISS", m.reason]
            for m, ok in sorted(self.compared, key=lambda c: (c[0].key, c[0].metric, c[0].reason))
        ]
        headers = ["key", "metric", "expected", "got", "tolerance", "status", "reason"]
        out = tabulate(rows, headers, tablefmt="github", disable_numparse=True) + "\n" if rows else ""
        return out + self._not_compared() + self._seed_counts() + self._summary()

    def _not_compared(self) -> str:
        out = ""
        if self.not_run:
            n = len(self.not_run)
            out += f"not run ({n} golden jobs without a fresh record; --require-all makes them misses):\n"
            out += "".join(f"  {k} (n={self.golden_seeds.get(k, 1)})\n" for k in sorted(self.not_run))
        if self.modified:
            out += f"not compared ({len(self.modified)} modified records: run with --set overrides):\n"
            out += "".join(f"  {k}: {v}\n" for k, v in sorted(self.modified.items()))
        if self.unmatched:
            out += f"not compared ({len(self.unmatched)} records of a one-seed golden job, another seed):\n"
            out += "".join(f"  {k}\n" for k in sorted(self.unmatched))
        return out

    def _seed_counts(self) -> str:
        """``golden jobs: 34 (n=3: 30, n=5: 4)``: how many golden seeds the jobs have."""
        if not self.golden_seeds:
            return ""
        counts = sorted(collections.Counter(self.golden_seeds.values()).items())
        return f"golden jobs: {len(self.golden_seeds)} ({', '.join(f'n={n}: {c}' for n, c in counts)})\n"

    def _summary(self) -> str:
        summary = f"{self.checked} comparisons, {len(self.misses)} misses"
        extra = f", {len(self.not_run)} not run" if self.not_run else ""
        extra += f", {len(self.modified)} modified not compared" if self.modified else ""
        verdict = "check passed" if self.passed else "check FAILED"
        nothing = " (nothing was compared: no records match a golden, reference or claim)" if not self.compared else ""
        return f"{verdict}: {summary}{extra}{nothing}\n"


def _compare(
    report: CheckReport,
    key: str,
    metric: str,
    expected: float,
    got: float | None,
    tol: Tolerance,
    reason: str,
    n: int | None = None,
) -> None:
    allowed = tol.allowed(expected)
    if got is None:
        _add(report, Miss(key, metric, expected, None, allowed, f"{reason}: metric missing", n), False)
    else:  # the NaN test fails for a NaN: a miss
        ok = abs(got - expected) <= allowed
        _add(report, Miss(key, metric, expected, got, allowed, f"{reason}: off by {got - expected:+.6g}", n), ok)


def _compare_distribution(
    report: CheckReport,
    key: str,
    metric: str,
    values: list[float],
    got: float | None,
    dist: Distribution,
    floor: Tolerance,
) -> None:
    """One fresh value against the golden seeds' ``values`` (n >= 2); the reason says by how many
    sample stds it is off."""
    n, m, s = len(values), statistics.fmean(values), statistics.stdev(values)
    allowed = dist.allowed(values, floor)
    why = f"golden distribution (m={m:.4g}, s={s:.3g}, n={n})"
    if got is None:
        _add(report, Miss(key, metric, m, None, allowed, f"{why}: metric missing", n, s), False)
        return
    d = got - m
    away = f"{d / s:+.1f} s" if s > 0 else "s = 0"
    floor_note = ", floor" if allowed > prediction_half_width(values, dist.alpha) else ""
    ok = abs(d) <= allowed  # NaN: a miss
    _add(report, Miss(key, metric, m, got, allowed, f"{why}: off by {d:+.4g} = {away}{floor_note}", n, s), ok)


def _add(report: CheckReport, m: Miss, ok: bool) -> None:
    report.checked += 1
    report.compared.append((m, ok))
    if not ok:
        report.misses.append(m)


def _overrides_text(rec: Record) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(rec.overrides.items()))


def _job(rec: Record) -> str:
    """The golden job of a record: scale/entry/variant/eval (its key without the seed)."""
    return f"{rec.scale}/{rec.entry}/{rec.variant}/{rec.eval}"


Goldens = dict[tuple[str, str], dict[int, Record]]  # (job, overrides text) -> seed -> golden record


def _group_goldens(goldens: list[Record]) -> Goldens:
    out: Goldens = defaultdict(dict)
    for g in goldens:
        out[(_job(g), _overrides_text(g))][g.seed] = g
    return dict(out)


def _compare_number(
    report: CheckReport,
    rec: Record,
    name: str,
    values: dict[int, float],
    got: float | None,
    fixed: Tolerance,
    floor: tuple[Distribution, Tolerance] | None,
    cpu_note: str = "",
) -> None:
    """``got``, the number ``name`` of ``rec``, against its golden ``values`` (seed -> value): their
    distribution when n >= 2 (``floor``: the distribution settings and this number's floor), else
    the same seed's value under the ``fixed`` tolerance (``cpu_note``: :func:`_cpu_note`)."""
    if len(values) >= 2 and floor is not None:
        _compare_distribution(report, str(rec.key), name, list(values.values()), got, *floor)
    elif len(values) == 1 and rec.seed in values:
        _compare(report, str(rec.key), name, values[rec.seed], got, fixed, "golden" + cpu_note, n=1)


def _cpu_text(cpu: dict) -> str:
    return f"{cpu.get('model', '?')}, {cpu.get('capability', '?')}, {cpu.get('threads', '?')} threads"


def _cpu_note(rec: Record, golden: Record | None) -> str:
    """`` (ran on <cpu>; golden on <cpu>)`` when the record and the same seed's golden name
    different CPU arithmetic (``provenance.cpu``: model, vector capability, threads), else "": on
    the golden's CPU a run is the golden bit for bit, on another it is a new draw of its rounding,
    which a one-seed tolerance must allow for."""
    mine = rec.provenance.get("cpu")
    theirs = golden.provenance.get("cpu") if golden is not None else None
    if not isinstance(mine, dict) or mine == theirs:
        return ""
    return f" (ran on {_cpu_text(mine)}; golden on {_cpu_text(theirs) if isinstance(theirs, dict) else 'unrecorded'})"


def _compare_with_golden(report: CheckReport, rec: Record, golden: dict[int, Record], tol: Tolerances) -> None:
    """Every golden metric and compared pretraining number of ``rec``'s job (``golden``: seed ->
    record); the ``per_seed`` pretraining numbers against the same seed's golden only."""
    dist = tol.distribution
    note = _cpu_note(rec, golden.get(rec.seed))
    for metric in sorted({m for g in golden.values() for m in g.metrics}):
        values = {s: g.metrics[metric] for s, g in sorted(golden.items()) if metric in g.metrics}
        floor = (dist, dist.floor.for_metric(rec.eval, metric)) if dist else None
        fixed = tol.for_metric(rec.eval, metric, f"{rec.entry}/{rec.variant}")
        _compare_number(report, rec, metric, values, rec.metrics.get(metric), fixed, floor, note)
    for name, t in sorted(tol.pretrain.items()):
        values = {s: g.pretrain[name] for s, g in sorted(golden.items()) if name in g.pretrain}
        got = rec.pretrain.get(name)
        if dist is not None and name in dist.per_seed:
            if rec.seed in values:  # exact, against the same seed's golden only
                why = f"golden seed {rec.seed}{note}"
                _compare(report, str(rec.key), f"pretrain.{name}", values[rec.seed], got, t, why)
        else:
            floor = (dist, dist.floor.pretrain[name]) if dist else None
            _compare_number(report, rec, f"pretrain.{name}", values, got, t, floor, note)


def _job_label(job: str, overrides: str) -> str:
    return f"{job} (--set {overrides})" if overrides else job


def _check_goldens(
    report: CheckReport, goldens: Goldens, records: list[Record], tol: Tolerances, require_all: bool
) -> None:
    """1. each fresh record against the goldens of its job and overrides; then list the golden
    jobs that no fresh record met (one line per job, whatever its number of seeds)."""
    jobs = {job for job, _ in goldens}
    met: set[tuple[str, str]] = set()
    for rec in sorted(records, key=lambda r: r.key):
        job, overrides = _job(rec), _overrides_text(rec)
        if job not in jobs:
            continue
        golden = goldens.get((job, overrides))
        if golden is None:
            others = sorted(o or "none" for j, o in goldens if j == job)
            report.modified[str(rec.key)] = f"{overrides or 'none'} (golden: {'; '.join(others)})"
        elif len(golden) == 1 and rec.seed not in golden:
            report.unmatched.append(f"{rec.key} (golden: seed {next(iter(golden))} only)")
        else:
            met.add((job, overrides))
            _compare_with_golden(report, rec, golden, tol)
    report.golden_seeds = {_job_label(*k): len(seeds) for k, seeds in sorted(goldens.items())}
    modified_jobs = {k.rsplit("/", 1)[0] for k in report.modified}
    for job, overrides in sorted(set(goldens) - met):
        if job not in modified_jobs:
            report.not_run.append(_job_label(job, overrides))
        if require_all:
            _add(report, Miss(_job_label(job, overrides), "*", None, None, None, "not run"), False)


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


def _require_distribution(path: Path, tol: Tolerances, goldens: Goldens) -> None:
    """Goldens of several seeds need the tolerance file's ``distribution`` section."""
    several = sorted(job for (job, _), seeds in goldens.items() if len(seeds) >= 2)
    if several and tol.distribution is None:
        raise ConfigError(
            f"{path}: distribution: missing (alpha, why, floor); the goldens of {several[0]} have "
            f"{len(goldens[next(k for k in goldens if k[0] == several[0])])} seeds"
        )


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
        grouped = _group_goldens(goldens)
        _require_distribution(golden_root / TOLERANCES_FILE, tol, grouped)
        _check_goldens(report, grouped, records, tol, require_all)
    golden_jobs = {_job(g) for g in goldens}
    for r in records:
        if r.overrides and _job(r) not in golden_jobs:
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


__all__ = [
    "check",
    "CheckReport",
    "Distribution",
    "Floors",
    "Miss",
    "Tolerance",
    "Tolerances",
    "load_tolerances",
    "prediction_half_width",
]
