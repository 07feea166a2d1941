"""Tables generated from records only (never edited by hand): the leaderboard and the per-run table.

``leaderboard`` prints one table per (scale, modality) group: rows are entry/variant, columns are
evaluation/metric as ``mean ± h (n=N)`` over N seeds, h the half-width of the 95 % t-interval of the
mean (``cropbench.reproduction.Estimate``, as the reproduction view; the plain value with one seed),
plus pretraining throughput and the number of seeds; a legend under each table says so. Rows
whose recipe has ``deviations`` carry a ``[n]`` marker and a footnote listing them; rows of
*modified* records (run with ``--set`` overrides, so not the entry's recipe) are labelled
``(modified)`` and their footnote lists the overrides first. The output is a
pure function of the records (sorted, fixed formats, no timestamps), so regenerating it gives
identical bytes. ``leaderboard(..., view=...)`` adds the reproduction view (``cropbench.reproduction``:
paper vs ours per entry, and the claims), after the results by default.
"""

from __future__ import annotations

import csv
import html
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tabulate import tabulate

from cropbench.errors import CropbenchError, UnknownNameError
from cropbench.io import write_text_atomic
from cropbench.records import Record

FORMATS = ("md", "csv", "latex", "html")
RANDOM_INIT = "+random_init"  # suffix of the runner's random-init baseline variant


def _fmt(x: float | None) -> str:
    return "–" if x is None else ("nan" if math.isnan(x) else f"{x:.2f}")


def _stat(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample std or None with a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float]) -> str:
    """``mean ± h (n=N)``, h the 95 % t-interval half-width over the N seeds; one seed: the value."""
    from cropbench.reproduction import Estimate

    return Estimate.of(values).text(bare_single=True)


LEGEND = "cells: mean ± 95 % t-interval half-width over seeds (n = seeds); a plain value is one seed"


def _eval_info(name: str) -> tuple[str, tuple[str, ...]]:
    """(modality, metric order) of a registered evaluation; ("other", ()) for an unknown name."""
    from cropbench.registry import EVALUATIONS

    try:
        ev = EVALUATIONS.get(name)
    except UnknownNameError:
        return "other", ()
    return ev.modality, tuple(ev.metrics)


@dataclass
class _Row:
    entry: str
    variant: str
    values: dict[tuple[str, str], list[float]]  # (eval, metric) -> one value per seed
    throughput: dict[int, float]  # seed -> pretrain images/s (one pretraining per seed)
    seeds: set[int]
    deviations: dict[str, str]
    overrides: dict[str, str] = field(default_factory=dict)  # key path -> value, any seed's
    weights: str = "ours"  # or "external:<file>@<sha8>" (records of cropbench eval on other weights)
    protocol_index: int = 0  # > 0: a second (third, ...) protocol of one of its evaluations
    protocols: dict[str, str] = field(default_factory=dict)  # eval -> protocol hash, where several

    @property
    def label(self) -> str:
        ext = "" if self.weights == "ours" else f" ({self.weights})"
        alt = f" (protocol {self.protocol_index + 1})" if self.protocol_index else ""
        return f"{self.entry}/{self.variant}{ext}{alt}"

    def notes(self) -> str:
        """Footnote text: the ``--set`` overrides (if any), the protocols of evaluations run under
        several (if any), then the recipe's deviations."""
        parts = [f"modified by --set {', '.join(f'{k}={v}' for k, v in sorted(self.overrides.items()))}"]
        parts = parts if self.overrides else []
        if self.protocols:
            parts.append("protocol " + ", ".join(f"{e}#{h}" for e, h in sorted(self.protocols.items())))
        return "; ".join(parts + [f"{k}: {v}" for k, v in sorted(self.deviations.items())])


def _row_key(records: list[Record]) -> Callable[[Record], tuple]:
    """Record -> its row: entry, variant, weights (ours first), overrides, and the index of its
    protocol among those its entry/variant/weights/evaluation was run under; records of different
    protocols never share a cell (``cropbench.reproduction.group_of``)."""
    from cropbench.reproduction import group_of

    protos: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        g = group_of(r)
        protos[(r.entry, r.variant, g.weights, g.overrides, r.eval)].add(g.protocol)

    def key(r: Record) -> tuple:
        g = group_of(r)
        ps = sorted(protos[(r.entry, r.variant, g.weights, g.overrides, r.eval)])
        return (r.entry, r.variant, g.weights != "ours", g.weights, g.overrides, ps.index(g.protocol), len(ps) > 1)

    return key


def _rows(records: Iterable[Record]) -> list[_Row]:
    records = sorted(records, key=lambda r: r.key)
    row_key = _row_key(records)
    rows: dict[tuple, _Row] = {}
    for rec in records:
        key = row_key(rec)
        entry, variant, _, weights, _, index, several = key
        row = rows.setdefault(
            key[:-1], _Row(entry, variant, defaultdict(list), {}, set(), {}, weights=weights, protocol_index=index)
        )
        for metric, value in sorted(rec.metrics.items()):
            row.values[(rec.eval, metric)].append(float(value))
        if "images_per_s" in rec.pretrain:
            row.throughput[rec.seed] = float(rec.pretrain["images_per_s"])
        row.seeds.add(rec.seed)
        row.deviations.update(rec.deviations)
        row.overrides.update({k: str(v) for k, v in rec.overrides.items()})
        if several:
            from cropbench.reproduction import protocol_hash

            row.protocols[rec.eval] = protocol_hash(rec)
    return [rows[k] for k in sorted(rows)]


def _columns(rows: list[_Row]) -> list[tuple[str, str]]:
    present = {c for r in rows for c in r.values}
    cols = []
    for ev in sorted({e for e, _ in present}):
        order = _eval_info(ev)[1]
        metrics = sorted(
            {m for e, m in present if e == ev},
            key=lambda m: (m not in order, order.index(m) if m in order else 0, m),
        )
        cols += [(ev, m) for m in metrics]
    return cols


def _groups(records: Iterable[Record]) -> dict[tuple[str, str], list[Record]]:
    out: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for rec in records:
        out[(rec.scale, _eval_info(rec.eval)[0])].append(rec)
    return {k: out[k] for k in sorted(out)}


@dataclass
class _Table:
    title: str
    headers: list[str]
    body: list[list[str]]
    notes: list[str]  # deviation footnotes, "[n] entry/variant: key: why; ..."


def _footnotes(rows: list[_Row]) -> tuple[dict[int, int], list[str]]:
    """Number each distinct deviation list (rows that share one, e.g. a variant and its random-init
    baseline, share the number): -> (id(row) -> number, footnote lines)."""
    numbers: dict[int, int] = {}  # id(row) -> footnote number (two rows may share a label)
    texts: dict[str, list[str]] = {}  # deviation text -> labels, in row order
    for r in rows:
        if r.deviations or r.overrides or r.protocols:
            text = r.notes()
            texts.setdefault(text, []).append(r.label)
            numbers[id(r)] = list(texts).index(text) + 1
    notes = [f"[{i}] {', '.join(who)}: {text}" for i, (text, who) in enumerate(texts.items(), 1)]
    return numbers, notes


# which epoch a metric reports, named under every table that shows it (evaluations/linear.py)
SELECTION_RULES = {
    ("linear", "top1"): "last epoch",
    ("linear", "top5"): "last epoch",
    ("linear", "top1_best"): "best epoch on the validation set (MoCo main_lincls best_acc1)",
}


def _table(scale: str, group: str, records: list[Record]) -> _Table:
    rows = _rows(records)
    cols = _columns(rows)
    numbers, notes = _footnotes(rows)
    body = []
    for r in rows:
        label = f"{r.label} (modified)" if r.overrides else r.label
        label = f"{label} [{numbers[id(r)]}]" if id(r) in numbers else label
        cells = [_cell(r.values[c]) if c in r.values else "–" for c in cols]
        tput = f"{statistics.fmean(r.throughput.values()):.1f}" if r.throughput else "–"
        body.append([label, *cells, tput, str(len(r.seeds))])
    headers = ["entry/variant", *(f"{e}/{m}" for e, m in cols), "img/s", "seeds"]
    rules = [f"{e}/{m}: {SELECTION_RULES[(e, m)]}" for e, m in cols if (e, m) in SELECTION_RULES]
    selection = ["selection: " + "; ".join(rules)] if rules else []
    return _Table(f"{scale} · {group}", headers, body, [LEGEND, *selection, *notes])


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
}


def _latex_escape(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in s)


def _render(t: _Table, fmt: str) -> str:
    if fmt == "md":
        notes = "".join(f"- {n}\n" for n in t.notes)
        table = tabulate(t.body, t.headers, tablefmt="github", disable_numparse=True)
        return f"## {t.title}\n\n{table}\n" + (f"\n{notes}" if notes else "")
    if fmt == "latex":
        notes = "".join(f"\\noindent {_latex_escape(n)}\\\\\n" for n in t.notes)
        table = tabulate(t.body, t.headers, tablefmt="latex_booktabs", disable_numparse=True)
        return f"\\subsection*{{{_latex_escape(t.title)}}}\n{table}\n{notes}"
    notes = "".join(f"<li>{html.escape(n)}</li>\n" for n in t.notes)
    table = tabulate(t.body, t.headers, tablefmt="html", disable_numparse=True)
    return f"<h2>{html.escape(t.title)}</h2>\n{table}\n" + (f'<ul class="deviations">\n{notes}</ul>\n' if notes else "")


def _csv_cells(values: list[float] | None) -> list[str]:
    """mean, 95 % t-interval half-width, n, sample std of one cell ('' where there is none)."""
    from cropbench.reproduction import Estimate

    if not values:
        return ["", "", "", ""]
    est, (_, std) = Estimate.of(values), _stat(values)
    num = lambda v: "" if v is None else f"{v:.4f}"
    return [num(est.mean), num(est.half), str(est.n), num(std)]


def _csv(records: list[Record]) -> str:
    """One wide CSV: scale, group, entry, variant, then per eval/metric the mean over seeds, the
    95 % t-interval half-width (empty with one seed), the number of seeds and the sample std."""
    groups = _groups(records)
    cols = sorted({c for recs in groups.values() for r in _rows(recs) for c in r.values})
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "scale",
            "group",
            "entry",
            "variant",
            *(f"{e}/{m}{s}" for e, m in cols for s in ("", ":ci95", ":n", ":std")),
            "images_per_s",
            "seeds",
            "deviations",
            "modified_by",
            "weights",
            "protocols",
        ]
    )
    for (scale, group), recs in groups.items():
        for r in _rows(recs):
            vals = [v for c in cols for v in _csv_cells(r.values.get(c))]
            tput = f"{statistics.fmean(r.throughput.values()):.1f}" if r.throughput else ""
            devs = "; ".join(f"{k}: {v}" for k, v in sorted(r.deviations.items()))
            mods = "; ".join(f"{k}={v}" for k, v in sorted(r.overrides.items()))
            protos = "; ".join(f"{e}#{h}" for e, h in sorted(r.protocols.items()))
            row = [scale, group, r.entry, r.variant, *vals, tput, len(r.seeds), devs, mods, r.weights, protos]
            w.writerow(row)
    return out.getvalue()


def _results(records: list[Record], fmt: str) -> str:
    if fmt == "csv":
        return _csv(records)
    if not records:
        return "(no records)\n"
    return "\n".join(_render(_table(s, g, recs), fmt) for (s, g), recs in _groups(records).items())


REPRODUCTION_NOTE = (
    "ours: mean ± 95% t-interval over seeds (n); Δ = ours − paper; verdict against the reference's "
    "tolerance; protocol: scale/eval#hash of the resolved evaluation settings, external:<file> for "
    "weights not pretrained here; only records of one protocol share a cell"
)


def _reproduction(records: list[Record], fmt: str, entries_root: Path | None) -> str:
    """The reproduction view (cropbench.reproduction): per entry, paper vs ours, and its claims."""
    from cropbench.reproduction import reproduction_tables

    tables = reproduction_tables(records, *([entries_root] if entries_root is not None else []))
    if fmt == "csv":
        return _reproduction_csv(tables)
    title = "# Reproduction: the papers' numbers beside ours"
    head = {"md": f"{title}\n\n{REPRODUCTION_NOTE}\n", "latex": "", "html": ""}[fmt]
    head = head or _render(_Table(title.removeprefix("# "), [], [], [REPRODUCTION_NOTE]), fmt)
    return head + "".join("\n" + _render(_Table(t, h, b, []), fmt) for t, h, b in tables)


def _reproduction_csv(tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    """One CSV for every reproduction and claims table: ``table``, ``entry``, then each column."""
    cols: list[str] = []
    for _, headers, _ in tables:
        cols += [h for h in headers if h not in cols]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["table", "entry", *cols])
    for title, headers, body in tables:
        kind, _, entry = title.partition(" · ")
        for row in body:
            cell = dict(zip(headers, row, strict=True))
            w.writerow([kind, entry, *(cell.get(c, "") for c in cols)])
    return out.getvalue()


VIEWS = ("all", "results", "reproduction")


def leaderboard(records: Iterable[Record], fmt: str = "md", view: str = "all", entries_root: Path | None = None) -> str:
    """Records as tables in ``fmt`` (md, csv, latex, html); same records -> same bytes.

    ``view``: ``results`` (one table per scale and modality), ``reproduction`` (paper vs ours per
    entry, and claims; entries from ``entries_root``, default ``benchmarks/``) or ``all`` (both;
    for CSV, which holds one table, ``all`` is ``results``)."""
    if fmt not in FORMATS:
        raise CropbenchError(f"leaderboard format {fmt!r} is not one of {', '.join(FORMATS)}")
    if view not in VIEWS:
        raise CropbenchError(f"leaderboard view {view!r} is not one of {', '.join(VIEWS)}")
    records = sorted(records, key=lambda r: r.key)
    if view == "reproduction":
        return _reproduction(records, fmt, entries_root)
    if view == "results" or fmt == "csv":
        return _results(records, fmt)
    return _results(records, fmt) + "\n" + _reproduction(records, fmt, entries_root)


def write_leaderboard(
    records: Iterable[Record], path: Path, fmt: str = "md", view: str = "all", entries_root: Path | None = None
) -> Path:
    """Write ``leaderboard(records, fmt, view)`` to ``path`` atomically."""
    return write_text_atomic(Path(path), leaderboard(records, fmt, view, entries_root))


def run_table(records: Iterable[Record]) -> str:
    """What the CLI prints after a run: each metric, pretrained next to its random-init baseline."""
    records = sorted(records, key=lambda r: r.key)
    baselines = {
        (r.scale, r.entry, r.variant[: -len(RANDOM_INIT)], r.eval, r.seed): r
        for r in records
        if r.variant.endswith(RANDOM_INIT)
    }
    body = []
    for r in records:
        if r.variant.endswith(RANDOM_INIT):
            continue
        base = baselines.pop((r.scale, r.entry, r.variant, r.eval, r.seed), None)
        for metric, value in sorted(r.metrics.items()):
            ref = base.metrics.get(metric) if base else None
            delta = f"{value - ref:+.2f}" if ref is not None else "–"
            body.append(
                [
                    f"{r.entry}/{r.variant}",
                    r.scale,
                    r.eval,
                    r.seed,
                    metric,
                    _fmt(value),
                    _fmt(ref),
                    delta,
                ]
            )
    for r in baselines.values():  # random-init records whose pretrained twin is not in this set
        body += [
            [f"{r.entry}/{r.variant}", r.scale, r.eval, r.seed, m, "–", _fmt(v), "–"]
            for m, v in sorted(r.metrics.items())
        ]
    headers = ["entry/variant", "scale", "eval", "seed", "metric", "pretrained", "random init", "Δ"]
    return tabulate(body, headers, tablefmt="simple", disable_numparse=True) + "\n"
