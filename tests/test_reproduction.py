"""The reproduction view (``cropbench leaderboard --view reproduction``): the paper's number beside
ours (mean ± 95 % t-interval, n), the difference and verdict, the protocol; the claims table.

Uses the real entries: RegionCL-M reports 69.4 linear top-1 (best epoch, tolerance 1.0) and claims
to beat MoCo v2 by >= 1.0 (benchmarks/regioncl/entry.yaml, README Annbless/RegionCL@61bbcab)."""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.recipe import list_entries, load_entry
from cropbench.records import Record, write_record
from cropbench.reproduction import Estimate, group_of, reproduction_tables, t975
from cropbench.tables import leaderboard

# Student's t, two-sided 95 %, from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


def rec(entry: str, variant: str, ev: str, seed: int, scale: str = "paper", **prov: object) -> Record:
    metric = {"linear": "top1_best", "coco": "bbox_AP"}.get(ev, "top1")
    value = float(prov.pop("value", 70.0))  # type: ignore[arg-type]
    return Record(entry, variant, scale, ev, seed, {metric: value}, {}, 1.0, {"recipe": {}, **prov})


def linear(entry: str, variant: str, values: list[float], **prov: object) -> list[Record]:
    return [rec(entry, variant, "linear", s, value=v, **prov) for s, v in enumerate(values)]


def rows_of(records: list[Record], title: str) -> list[list[str]]:
    return next(b for t, _, b in reproduction_tables(records) if t == title)


def regioncl_linear_m(rows: list[list[str]]) -> list[list[str]]:
    return [r for r in rows if r[:3] == ["m", "linear", "top1_best"]]


# ---- the interval ----


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df: int) -> None:
    assert t975(df) == pytest.approx(T_TABLE[df], abs=5e-4)


def test_interval_by_hand() -> None:
    """[69, 70, 71]: mean 70, s = 1, half-width t(2) / sqrt(3) = 4.303 / 1.732 = 2.484."""
    e = Estimate.of([69.0, 70.0, 71.0])
    assert (e.mean, e.n) == (70.0, 3)
    assert e.half == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert e.text() == "70.00 ± 2.48 (n=3)"
    assert Estimate.of([68.25]).text() == "68.25 (n=1)"  # one seed: no interval


def test_interval_covers_the_mean_95_percent_of_the_time() -> None:
    """Coverage of the t-interval on normal samples of 3: 95 % ± 3 sigma of 2000 trials (~1.5 %)."""
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        e = Estimate.of([rng.gauss(0.0, 1.0) for _ in range(3)])
        hits += abs(e.mean) <= e.half
    assert abs(hits / 2000 - 0.95) < 0.015, hits
    # a z-interval (1.96) would cover only ~80 % at n = 3: the test tells them apart
    assert 1.96 / t975(2) < 0.5


# ---- reference rows ----


def test_paper_vs_ours_within_and_outside() -> None:
    within = regioncl_linear_m(rows_of(linear("regioncl", "m", [69.0, 70.0, 71.0]), "reproduction · regioncl"))
    assert len(within) == 1
    variant, ev, metric, scale, paper, ours, diff, verdict, protocol, source = within[0]
    assert (scale, paper, ours, diff, verdict) == ("paper", "69.40", "70.00 ± 2.48 (n=3)", "+0.60", "within ±1")
    assert protocol.startswith("paper/linear#") and "external" not in protocol
    assert source.startswith("README Annbless/RegionCL@61bbcab")
    outside = regioncl_linear_m(rows_of(linear("regioncl", "m", [67.0, 68.0, 67.5]), "reproduction · regioncl"))
    assert outside[0][6:8] == ["-1.90", "OUTSIDE ±1"]


def test_every_reference_appears_and_unrun_ones_say_not_run() -> None:
    tables = {t: b for t, _, b in reproduction_tables(linear("regioncl", "m", [69.0]))}
    for name in list_entries():
        entry = load_entry(name)
        if not entry.references:
            continue
        body = tables[f"reproduction · {name}"]
        assert len(body) >= len(entry.references), name
        for ref in entry.references:
            assert any(r[:4] == [ref.variant, ref.eval, ref.metric, ref.scale] for r in body), (name, ref)
    coco = [r for r in tables["reproduction · regioncl"] if r[1] == "coco"]
    assert coco and all(r[5:8] == ["–", "–", "not run"] for r in coco)


def test_records_of_another_scale_do_not_answer_a_paper_reference() -> None:
    micro = [rec("regioncl", "m", "linear", s, scale="micro", value=69.4) for s in range(3)]
    assert regioncl_linear_m(rows_of(micro, "reproduction · regioncl"))[0][7] == "not run"


def test_different_protocols_never_share_a_cell() -> None:
    """Same entry/variant/eval/scale, two protocol hashes: two rows, each with its own seeds."""
    a = linear("regioncl", "m", [69.0, 70.0], protocol_hash="aaaaaaaa11")
    b = [replace(r, seed=r.seed + 10) for r in linear("regioncl", "m", [60.0], protocol_hash="bbbbbbbb22")]
    rows = regioncl_linear_m(rows_of(a + b, "reproduction · regioncl"))
    assert [(r[5], r[8]) for r in rows] == [
        ("69.50 ± 6.35 (n=2)", "paper/linear#aaaaaaaa"),
        ("60.00 (n=1)", "paper/linear#bbbbbbbb"),
    ]
    # the broken variant (one cell for both protocols) would give one row with n=3
    assert group_of(a[0]) != group_of(b[0])


def test_external_weights_are_labelled_and_kept_apart_from_ours() -> None:
    weights = {"file": "regionclm_released.pth", "sha256": "0123456789abcdef", "format": "openselfsup"}
    ours = linear("regioncl", "m", [69.0, 69.5])
    theirs = [replace(r, seed=r.seed + 5) for r in linear("regioncl", "m", [69.3], weights=weights)]
    rows = regioncl_linear_m(rows_of(ours + theirs, "reproduction · regioncl"))
    assert [r[8].split(" ", 1)[-1] if "external" in r[8] else "ours" for r in rows] == [
        "external:regionclm_released.pth@01234567",
        "ours",
    ]
    assert [r[5] for r in rows] == ["69.30 (n=1)", "69.25 ± 3.18 (n=2)"]
    # cropbench eval of our own checkpoint (external_weights False) is ours: same cell as cropbench run
    own = [replace(r, seed=9) for r in linear("regioncl", "m", [70.0], weights=weights, external_weights=False)]
    assert group_of(own[0]) == group_of(ours[0])
    flagged = linear("regioncl", "m", [70.0], weights=weights, external_weights=True)
    assert group_of(flagged[0]).weights == "external:regionclm_released.pth@01234567"


def test_modified_records_are_shown_but_get_no_verdict() -> None:
    mods = linear("regioncl", "m", [50.0], overrides={"train.epochs": 1})
    row = regioncl_linear_m(rows_of(mods, "reproduction · regioncl"))[0]
    assert row[7] == "not compared (modified)" and "(modified: train.epochs=1)" in row[8]


# ---- claims ----


def _claim_row(records: list[Record]) -> list[list[str]]:
    return [r for r in rows_of(records, "claims · regioncl") if r[1] == "regioncl/m"]


def test_claim_holds_fails_and_not_run() -> None:
    base = linear("mocov2", "default", [67.0, 67.6, 67.2])
    holds = _claim_row(linear("regioncl", "m", [69.0, 69.4]) + base)
    assert len(holds) == 1
    row = holds[0]
    assert row[5:10] == ["69.20 ± 2.54 (n=2)", "67.27 ± 0.76 (n=3)", "+1.93", "≥ +1.00", "holds"]
    expected_half = t975(2) * statistics.stdev([67.0, 67.6, 67.2]) / math.sqrt(3)
    assert f"{expected_half:.2f}" == "0.76"
    fails = _claim_row(linear("regioncl", "m", [68.0]) + base)[0]
    assert fails[7:10] == ["+0.73", "≥ +1.00", "FAILS"]
    missing = _claim_row(linear("regioncl", "m", [68.0]))[0]
    assert missing[9] == "not run: mocov2"


def test_claim_sides_must_share_a_protocol() -> None:
    ours = linear("regioncl", "m", [70.0], protocol_hash="11111111")
    base = linear("mocov2", "default", [60.0], protocol_hash="22222222")
    assert _claim_row(ours + base)[0][9] == "not compared: no shared protocol"
    ext = linear("mocov2", "default", [60.0], weights={"file": "moco_v2_200ep.pth.tar", "sha256": "ff" * 32})
    assert _claim_row(linear("regioncl", "m", [70.0]) + ext)[0][9] == "not compared: no shared protocol"
    # released weights on both sides (different files by nature) do compare
    ext_m = linear("regioncl", "m", [69.4], weights={"file": "regionclm.pth", "sha256": "aa" * 32})
    row = _claim_row(ext_m + ext)[0]
    assert row[7:10] == ["+9.40", "≥ +1.00", "holds"]
    assert row[10].endswith("external:regionclm.pth@aaaaaaaa vs external:moco_v2_200ep.pth.tar@ffffffff")


# ---- rendering ----


def _records() -> list[Record]:
    return (
        linear("regioncl", "m", [69.0, 70.0, 71.0])
        + linear("mocov2", "default", [67.0, 67.6])
        + [replace(r, seed=r.seed + 7) for r in linear("regioncl", "m", [67.4], weights={"file": "x.pth"})]
        + [rec("simclr", "default", "knn", 0, scale="micro")]
    )


def test_every_format_is_byte_stable_and_order_independent() -> None:
    recs = _records()
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    for fmt in ("md", "csv", "latex", "html"):
        for view in ("all", "reproduction"):
            first = leaderboard(recs, fmt, view)
            assert first == leaderboard(recs, fmt, view) == leaderboard(shuffled, fmt, view), (fmt, view)


def test_default_markdown_has_the_results_then_the_reproduction_section() -> None:
    md = leaderboard(_records(), "md")
    assert md.index("## micro · image") < md.index("# Reproduction") < md.index("## reproduction · regioncl")
    assert "| m         | linear | top1_best | paper   | 69.40   | 70.00 ± 2.48 (n=3) |" in md
    assert leaderboard(_records(), "md", "results") + "\n" + leaderboard(_records(), "md", "reproduction") == md
    assert leaderboard(_records(), "csv") == leaderboard(_records(), "csv", "results")


def test_csv_latex_html_carry_the_same_rows() -> None:
    rows = list(csv.DictReader(io.StringIO(leaderboard(_records(), "csv", "reproduction"))))
    m, ext = (
        next(r for r in rows if r["entry"] == "regioncl" and r["variant"] == "m" and r["protocol"].endswith(tail))
        for tail in ("#" + group_of(_records()[0]).protocol, "external:x.pth")
    )
    assert (ext["ours (95% CI)"], ext["verdict"]) == ("67.40 (n=1)", "OUTSIDE ±1")
    assert (m["table"], m["paper"], m["ours (95% CI)"], m["verdict"]) == (
        "reproduction",
        "69.40",
        "70.00 ± 2.48 (n=3)",
        "within ±1",
    )
    claim = next(r for r in rows if r["table"] == "claims" and r["entry/variant"] == "regioncl/m")
    assert claim["verdict"] == "holds" and claim["Δ"] == "+2.70"
    latex = leaderboard(_records(), "latex", "reproduction")
    assert r"\subsection*{reproduction · regioncl}" in latex and r"top1\_best" in latex
    html = leaderboard(_records(), "html", "reproduction")
    assert "<h2>claims · regioncl</h2>" in html and "external:x.pth" in html


def test_cli_view_twice_gives_identical_files(tmp_path: Path) -> None:
    from cropbench.cli import cli

    for r in _records():
        write_record(tmp_path / "records", r)
    outs = []
    for i in range(2):
        out = tmp_path / f"repro{i}.html"
        args = ["leaderboard", "--records", str(tmp_path / "records"), "--view", "reproduction", "--format", "html"]
        res = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and b"reproduction \xc2\xb7 regioncl" in outs[0]
    bad = CliRunner().invoke(cli, ["leaderboard", "--records", str(tmp_path / "records"), "--view", "nope"])
    assert bad.exit_code == 2 and "'nope' is not one of" in bad.output
