"""`cropbench check`: goldens, references and claims, against hand-computed misses."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cropbench.checks import Miss, check, load_tolerances
from cropbench.errors import ConfigError
from cropbench.records import Record, write_record

REPO = Path(__file__).resolve().parent.parent


def rec(
    entry: str = "simclr",
    variant: str = "default",
    ev: str = "knn",
    seed: int = 0,
    scale: str = "micro",
    top1: float = 60.0,
    loss_first: float = 5.0,
    loss_last: float = 2.0,
) -> Record:
    return Record(
        entry,
        variant,
        scale,
        ev,
        seed,
        {"top1": top1, "top5": 90.0},
        {"loss_first": loss_first, "loss_last": loss_last, "images_per_s": 50.0},
        1.0,
        {},
    )


def write_entry(root: Path, name: str, references: list | None = None, claims: list | None = None) -> None:
    data = {
        "name": name,
        "paper": {"title": name, "arxiv": "0000.00000"},
        "description": name,
        "variants": {"default": {}, "big": {}},
        "references": references or [],
        "claims": claims or [],
    }
    (root / name).mkdir(parents=True)
    (root / name / "entry.yaml").write_text(yaml.safe_dump(data))


TOLERANCES = """
default: {abs: 3.0, why: "test"}
metrics:
  top1: {abs: 3.0, why: "test"}
  top5: {abs: 10.0, why: "test"}
pretrain:
  loss_first: {rel: 1.0e-4, why: "test"}
  loss_last: {rel: 0.03, why: "test"}
"""


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(records, golden, entries); golden: two micro goldens and a tolerance file of the committed
    file's shape with fixed values (the committed values follow measured drift and may change)."""
    records, golden, entries = tmp_path / "records", tmp_path / "golden", tmp_path / "entries"
    golden.mkdir()
    entries.mkdir()
    (golden / "tolerances.yaml").write_text(TOLERANCES)
    for r in (rec(), rec(ev="linear", top1=70.0)):
        write_record(golden, r)
    return records, golden, entries


def test_matching_records_pass(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    write_record(records, rec())
    write_record(records, rec(ev="linear", top1=70.0 + 1.9, loss_first=5.0 * (1 + 5e-5), loss_last=2.05))
    report = check(records, golden, entries)
    assert report.passed, report.table()
    assert report.checked == 2 * (2 + 2)  # 2 goldens × (top1, top5, loss_first, loss_last)
    table = report.table()
    assert table.endswith("check passed: 8 comparisons, 0 misses\n")
    rows = [ln for ln in table.splitlines() if ln.startswith("| micro/")]
    assert len(rows) == 8 and all("| ok " in r for r in rows)  # the passes are shown too


def test_moved_metric_and_loss_are_misses_with_the_numbers(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    write_record(records, rec(top1=63.5, loss_first=5.002))  # +3.5 points; loss_first +4e-4 rel
    write_record(records, rec(ev="linear", top1=70.0, loss_last=float("nan")))
    report = check(records, golden, entries)
    got = {(m.key, m.metric): m for m in report.misses}
    assert set(got) == {
        ("micro/simclr/default/knn/seed0", "top1"),
        ("micro/simclr/default/knn/seed0", "pretrain.loss_first"),
        ("micro/simclr/default/linear/seed0", "pretrain.loss_last"),
    }
    top1 = got[("micro/simclr/default/knn/seed0", "top1")]
    assert (top1.expected, top1.got, top1.tolerance) == (
        60.0,
        63.5,
        3.0,
    ) and "golden" in top1.reason
    lf = got[("micro/simclr/default/knn/seed0", "pretrain.loss_first")]
    assert lf.expected == 5.0 and lf.got == 5.002 and lf.tolerance == pytest.approx(5e-4)
    assert math.isnan(got[("micro/simclr/default/linear/seed0", "pretrain.loss_last")].got)
    assert not report.passed


def test_missing_record_is_not_run_information_unless_required(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    write_record(records, rec())
    report = check(records, golden, entries)
    assert report.passed and report.checked == 4 and report.not_run == ["micro/simclr/default/linear"]
    assert "not run (1 golden jobs" in report.table() and "  micro/simclr/default/linear (n=1)\n" in report.table()
    strict = check(records, golden, entries, require_all=True)
    assert strict.misses == [Miss("micro/simclr/default/linear", "*", None, None, None, "not run")]
    assert check(records, golden, entries, scale="small").checked == 0  # no goldens at that scale


def test_references_at_their_scale(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    ref = {
        "eval": "linear",
        "metric": "top1",
        "value": 67.5,
        "source": "moco README",
        "scale": "small",
        "tolerance": 1.0,
    }
    write_entry(entries, "simclr", references=[ref, {**ref, "scale": "paper"}])  # no paper records: skipped
    for seed, top1 in ((0, 65.0), (1, 67.0)):  # mean 66.0: 1.5 below the reference
        write_record(records, rec(scale="small", ev="linear", seed=seed, top1=top1))
    report = check(records, golden, entries, scale="small")
    assert report.checked == 1
    assert report.misses == [
        Miss(
            "small/simclr/default/linear",
            "top1",
            67.5,
            66.0,
            1.0,
            "reference (moco README): off by -1.5",
        )
    ]


def test_claims(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    claim = {
        "text": "big beats simclr by >= 2",
        "eval": "knn",
        "metric": "top1",
        "baseline": "simclr",
        "variant": "big",
        "min_delta": 2.0,
        "scale": "small",
    }
    write_entry(entries, "simclr", claims=[claim, {**claim, "eval": "linear"}])  # linear: no records, skipped
    write_record(records, rec(scale="small", top1=60.0))
    write_record(records, rec(scale="small", variant="big", top1=61.5))
    report = check(records, golden, entries, scale="small")
    assert report.checked == 1
    [miss] = report.misses
    assert (miss.key, miss.metric, miss.expected, miss.got) == (
        "small/simclr/big/knn",
        "top1",
        62.0,
        61.5,
    )
    assert miss.reason.startswith("claim: big beats simclr by >= 2 (Δ +1.50")
    write_record(records, rec(scale="small", variant="big", top1=62.5))
    assert check(records, golden, entries, scale="small").passed


def test_table_lists_every_miss_deterministically(roots: tuple[Path, Path, Path]) -> None:
    records, golden, entries = roots
    write_record(records, rec(top1=55.0))
    a, b = check(records, golden, entries).table(), check(records, golden, entries).table()
    assert a == b
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in a.splitlines() if ln.startswith("|")]
    assert rows[0] == ["key", "metric", "expected", "got", "tolerance", "status", "reason"]
    assert rows[2:] == [
        ["micro/simclr/default/knn/seed0", "pretrain.loss_first", "5 (n=1)", "5", "0.0005", "ok", "golden: off by +0"],
        ["micro/simclr/default/knn/seed0", "pretrain.loss_last", "2 (n=1)", "2", "0.06", "ok", "golden: off by +0"],
        ["micro/simclr/default/knn/seed0", "top1", "60 (n=1)", "55", "3", "MISS", "golden: off by -5"],
        ["micro/simclr/default/knn/seed0", "top5", "90 (n=1)", "90", "10", "ok", "golden: off by +0"],
    ]
    assert "golden jobs: 2 (n=1: 2)\n" in a  # the seed count of the golden jobs
    assert a.splitlines()[-1] == "check FAILED: 4 comparisons, 1 misses, 1 not run"
    b = check(records, golden, entries, require_all=True).table()
    b_rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in b.splitlines() if ln.startswith("|")]
    assert ["micro/simclr/default/linear", "*", "–", "–", "–", "MISS", "not run"] in b_rows
    assert b.splitlines()[-1] == "check FAILED: 5 comparisons, 2 misses, 1 not run"


def test_tolerance_file_is_validated(tmp_path: Path) -> None:
    tol = load_tolerances(REPO / "results" / "golden" / "tolerances.yaml")  # the committed file is valid
    assert tol.for_metric("knn", "top1").abs is not None and tol.pretrain["loss_first"].rel is not None
    bad = tmp_path / "tolerances.yaml"
    bad.write_text("default: {abs: 1.0, rel: 0.1, why: both}\n")
    with pytest.raises(ConfigError, match=f"{bad}: default: give exactly one of 'abs' or 'rel'"):
        load_tolerances(bad)
    bad.write_text("default: {abs: 1.0, why: ok}\nmetrics: {top1: {abs: 1.0, wy: typo}}\n")
    with pytest.raises(ConfigError, match=r"metrics\.top1\.wy: unknown key"):
        load_tolerances(bad)


def test_one_seed_golden_meets_only_its_own_seed(roots: tuple[Path, Path, Path]) -> None:
    """A golden of one seed is a re-run check (fixed tolerances): another seed has nothing to be
    compared with, so its job is not run, and the record is listed as not compared."""
    records, golden, entries = roots
    write_record(records, replace(rec(), seed=1))
    write_record(records, rec(ev="linear", top1=70.0))
    report = check(records, golden, entries, require_all=True)
    assert [m.key for m in report.misses] == ["micro/simclr/default/knn"]
    assert report.unmatched == ["micro/simclr/default/knn/seed1 (golden: seed 0 only)"]
    assert "not compared (1 records of a one-seed golden job, another seed):\n" in report.table()


def test_modified_records_meet_no_reference_claim_or_other_golden(roots: tuple[Path, Path, Path]) -> None:
    """A record run with ``--set`` overrides (``provenance.overrides``) is never compared with a
    paper reference or claim, nor with a golden of another recipe; it is listed as not compared."""
    records, golden, entries = roots
    ref = {"eval": "knn", "metric": "top1", "value": 69.1, "source": "paper", "scale": "paper", "tolerance": 1.0}
    claim = {"text": "big beats simclr", "eval": "knn", "metric": "top1", "baseline": "simclr", "variant": "big"}
    write_entry(entries, "simclr", references=[ref], claims=[claim])
    one_epoch = {"train.epochs": 1}
    write_record(records, replace(rec(scale="paper", top1=69.0), provenance={"overrides": one_epoch}))
    write_record(records, replace(rec(scale="paper", variant="big", top1=75.0), provenance={"overrides": one_epoch}))
    write_record(records, replace(rec(top1=10.0), provenance={"overrides": one_epoch}))  # micro golden key
    report = check(records, golden, entries)
    assert report.checked == 0 and report.passed  # 69.0 would pass the reference: it is not compared
    assert set(report.modified) == {
        "paper/simclr/default/knn/seed0",
        "paper/simclr/big/knn/seed0",
        "micro/simclr/default/knn/seed0",
    }
    table = report.table()
    assert "not compared (3 modified records" in table and "paper/simclr/default/knn/seed0: train.epochs=1" in table
    assert "(golden: none)" in table
    write_record(records, rec(scale="paper", top1=66.0))  # the unmodified run is compared, and misses
    [miss] = check(records, golden, entries, scale="paper").misses
    assert (miss.key, miss.expected, miss.got) == ("paper/simclr/default/knn", 69.1, 66.0)


def test_references_and_claims_are_checked_per_protocol(roots: tuple[Path, Path, Path]) -> None:
    """Records of different evaluation protocols (``provenance.protocol_hash``), and external
    weights (``provenance.external_weights``), are never averaged together: one comparison each."""
    records, golden, entries = roots
    ref = {"eval": "linear", "metric": "top1", "value": 67.5, "source": "moco README", "scale": "small"}
    claim = {"text": "big beats simclr", "eval": "linear", "metric": "top1", "baseline": "simclr"}
    write_entry(entries, "simclr", references=[ref], claims=[{**claim, "variant": "big", "scale": "small"}])

    def put(variant: str, seed: int, top1: float, **prov: object) -> None:
        write_record(
            records, replace(rec(variant=variant, scale="small", ev="linear", seed=seed, top1=top1), provenance=prov)
        )

    put("default", 0, 67.0, protocol_hash="aaaa1111bbbb2222")
    put("default", 1, 60.0, protocol_hash="cccc3333dddd4444")  # averaged with the first: 63.5, a miss
    put(
        "default",
        2,
        67.9,
        protocol_hash="aaaa1111bbbb2222",
        weights={"file": "r.pth", "sha256": "ee" * 32},
        external_weights=True,
    )
    put("big", 0, 69.0, protocol_hash="aaaa1111bbbb2222")
    report = check(records, golden, entries, scale="small")
    got = sorted((m.key, m.got, ok) for m, ok in report.compared)
    assert got == [
        ("small/simclr/big/linear", 69.0, True),  # the claim: the one protocol both sides share
        ("small/simclr/default/linear #aaaa1111", 67.0, True),
        ("small/simclr/default/linear #aaaa1111 [external:r.pth@eeeeeeee]", 67.9, True),
        ("small/simclr/default/linear #cccc3333", 60.0, False),
    ]


def test_one_seed_miss_names_both_cpus(roots: tuple[Path, Path, Path]) -> None:
    """A record from other CPU arithmetic than its golden's (model, vector capability, threads) is a
    new draw of the rounding, not the golden bit for bit: the reason says so, on every comparison
    of that record; the same CPU (or none recorded in the record) adds nothing."""
    records, golden, entries = roots
    here = {"model": "AMD EPYC", "capability": "AVX512", "threads": 2}
    there = {"model": "Intel Xeon", "capability": "AVX2", "threads": 2}
    g = replace(rec(), provenance={"cpu": here})
    write_record(golden, g)
    write_record(records, replace(rec(top1=55.0), provenance={"cpu": there}))
    report = check(records, golden, entries)
    [miss] = report.misses
    assert miss.reason == (
        "golden (ran on Intel Xeon, AVX2, 2 threads; golden on AMD EPYC, AVX512, 2 threads): off by -5"
    )
    write_record(records, replace(rec(top1=55.0), provenance={"cpu": here}))
    assert check(records, golden, entries).misses[0].reason == "golden: off by -5"
    write_record(records, rec(top1=55.0))  # no cpu in the record (made before it was recorded)
    assert check(records, golden, entries).misses[0].reason == "golden: off by -5"
    write_record(golden, rec())  # a golden made before cpu was recorded, a record that has it
    write_record(records, replace(rec(top1=55.0), provenance={"cpu": there}))
    assert check(records, golden, entries).misses[0].reason == (
        "golden (ran on Intel Xeon, AVX2, 2 threads; golden on unrecorded): off by -5"
    )
