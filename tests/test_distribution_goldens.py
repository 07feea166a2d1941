"""Goldens of several seeds (issue 13, part 3): ``cropbench check`` compares a fresh run with the
golden seeds' distribution, ``max(floor, t_{1-alpha/2, n-1} * s * sqrt(1 + 1/n))`` around their mean
(the prediction interval for one new draw), ``loss_first`` with the same seed's golden only, and one
golden seed with the fixed tolerances; tables print ``mean ± h (n=N)``; ``scripts/regression.sh``
runs each job's seeds when updating and seed 0 in CI.

Every expected number is worked out here by hand from the formula (with printed t quantiles), not
with the code under test. Records are synthetic, written with ``cropbench.records.write_record``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cropbench.checks import CheckReport, check, load_tolerances, prediction_half_width
from cropbench.errors import ConfigError
from cropbench.recipe import load_entry
from cropbench.records import Record, write_record
from cropbench.reproduction import t_quantile
from cropbench.tables import leaderboard
from tests.test_checks import TOLERANCES as FIXED_TOLERANCES

REPO = Path(__file__).resolve().parent.parent
COMMITTED_TOLERANCES = REPO / "results" / "golden" / "tolerances.yaml"

# alpha 0.05 so that the printed t_{0.975, df} applies; the floors are round numbers to read.
TOLERANCES = (
    FIXED_TOLERANCES
    + """distribution:
  alpha: 0.05
  why: "test"
  per_seed: [loss_first]
  floor:
    default: {abs: 1.0, why: "test"}
    metrics:
      top5: {abs: 1.0, why: "test"}
    pretrain:
      loss_last: {rel: 0.01, why: "test"}
"""
)
T975_2 = 4.303  # Student's t, two-sided 95 %, 2 degrees of freedom (NIST/SEMATECH e-Handbook 1.3.6.7.2)
T995_4 = 4.604  # two-sided 99 %, 4 degrees of freedom (same table)


def rec(
    seed: int = 0,
    top1: float = 70.0,
    top5: float = 95.0,
    loss_first: float = 5.0,
    loss_last: float = 2.0,
    entry: str = "simclr",
    ev: str = "knn",
) -> Record:
    pretrain = {"loss_first": loss_first, "loss_last": loss_last, "images_per_s": 50.0}
    return Record(entry, "default", "micro", ev, seed, {"top1": top1, "top5": top5}, pretrain, 1.0, {})


def golden_root(tmp_path: Path, goldens: list[Record], tolerances: str = TOLERANCES) -> tuple[Path, Path, Path]:
    """(records, golden, entries) with the given golden records and tolerance text."""
    records, golden, entries = tmp_path / "records", tmp_path / "golden", tmp_path / "entries"
    golden.mkdir(parents=True)
    entries.mkdir()
    (golden / "tolerances.yaml").write_text(tolerances)
    for g in goldens:
        write_record(golden, g)
    return records, golden, entries


def run_check(tmp_path: Path, goldens: list[Record], fresh: list[Record], **kw: object) -> CheckReport:
    records, golden, entries = golden_root(tmp_path, goldens, kw.pop("tolerances", TOLERANCES))  # type: ignore[arg-type]
    records.mkdir(exist_ok=True)
    for r in fresh:
        write_record(records, r)
    return check(records, golden, entries, **kw)  # type: ignore[arg-type]


def by_metric(report: CheckReport) -> dict[tuple[str, str], tuple[bool, object]]:
    return {(m.key, m.metric): (ok, m) for m, ok in report.compared}


# ---- the t quantile and the interval ----


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [(0.975, 2, T975_2), (0.995, 4, T995_4), (0.975, 1, 12.706), (0.975, math.inf, 1.960)],
)
def test_t_quantile_against_printed_values(p: float, df: float, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_rejects_bad_input() -> None:
    for p, df in ((1.0, 3), (0.0, 3), (0.975, 0)):
        with pytest.raises(ValueError, match="need 0 < p < 1 and df > 0"):
            t_quantile(p, df)


def test_prediction_half_width_by_hand() -> None:
    """[68, 70, 72]: m = 70, s = 2 (sum of squares 8 over n - 1 = 2), n = 3:
    4.303 * 2 * sqrt(4/3) = 9.937; not t*s (8.61), nor the mean's t*s/sqrt(n) (4.97)."""
    assert prediction_half_width([68.0, 70.0, 72.0], 0.05) == pytest.approx(T975_2 * 2 * math.sqrt(4 / 3), abs=2e-3)
    assert prediction_half_width([68.0, 70.0, 72.0], 0.05) == pytest.approx(9.937, abs=2e-3)


# ---- check: distribution goldens ----

THREE = [rec(0, top1=68.0), rec(1, top1=70.0), rec(2, top1=72.0)]  # m 70, s 2: allowed 9.937 (alpha 0.05)


def test_inside_the_prediction_interval_passes_outside_misses_naming_m_s_n(tmp_path: Path) -> None:
    """+9.5 is inside 9.937 but outside t*s = 8.61 and t*s/sqrt(n) = 4.97 (an interval for the
    mean), and outside 7.35 with n degrees of freedom instead of n - 1: those broken formulas miss
    it. +10.2 is outside."""
    ok = run_check(tmp_path / "a", THREE, [rec(7, top1=79.5)])
    (passed, m) = by_metric(ok)[("micro/simclr/default/knn/seed7", "top1")]
    assert passed and m.expected == 70.0 and m.tolerance == pytest.approx(9.937, abs=2e-3)
    miss = run_check(tmp_path / "b", THREE, [rec(7, top1=80.2)])
    [m] = miss.misses
    assert (m.key, m.metric, m.got, m.n, m.spread) == ("micro/simclr/default/knn/seed7", "top1", 80.2, 3, 2.0)
    assert m.reason == "golden distribution (m=70, s=2, n=3): off by +10.2 = +5.1 s"
    row = next([c.strip() for c in ln.strip("|").split("|")] for ln in miss.table().splitlines() if "| top1 " in ln)
    assert row[2:6] == ["70 ± 9.94 (n=3, s=2)", "80.2", "9.93655", "MISS"]


def test_stopped_learning_misses_float_noise_passes(tmp_path: Path) -> None:
    """The committed tolerance file: goldens 70 ± 2 over 5 seeds ([68, 68, 70, 72, 72], s = 2),
    alpha 0.01: allowed 4.604 * 2 * sqrt(6/5) = 10.09. A run that stopped learning (kNN 18, random
    init's level; last loss stuck at the first) misses by 26 s; float noise (71, loss +0.5 %) passes."""
    tol = COMMITTED_TOLERANCES.read_text()
    assert load_tolerances(COMMITTED_TOLERANCES).distribution.alpha == 0.01  # the numbers below assume it
    tops, losses = [68.0, 68.0, 70.0, 72.0, 72.0], [2.0, 2.1, 1.9, 2.05, 1.95]
    goldens = [
        rec(s, top1=t, loss_last=v, top5=99.0 + s / 10) for s, (t, v) in enumerate(zip(tops, losses, strict=True))
    ]
    stopped = run_check(tmp_path / "a", goldens, [rec(0, top1=18.0, loss_last=4.9, top5=99.2)], tolerances=tol)
    got = {m.metric: m for m in stopped.misses}
    assert set(got) == {"top1", "pretrain.loss_last"}
    assert got["top1"].tolerance == pytest.approx(T995_4 * 2 * math.sqrt(6 / 5), abs=3e-3)
    assert got["top1"].reason == "golden distribution (m=70, s=2, n=5): off by -52 = -26.0 s"
    noise = run_check(tmp_path / "b", goldens, [rec(0, top1=71.0, loss_last=2.01, top5=99.2)], tolerances=tol)
    assert noise.passed and noise.checked == 4, noise.table()  # top1, top5, loss_last; loss_first seed 0


def test_one_golden_seed_falls_back_to_the_fixed_tolerance(tmp_path: Path) -> None:
    """n = 1: the fixed ``top1`` tolerance (abs 3), as a re-run of that seed; 2.9 off passes and
    3.1 off misses (a distribution with s undefined must not be used)."""
    ok = run_check(tmp_path / "a", [rec(0)], [rec(0, top1=72.9)])
    assert ok.passed and by_metric(ok)[("micro/simclr/default/knn/seed0", "top1")][1].tolerance == 3.0
    [m] = run_check(tmp_path / "b", [rec(0)], [rec(0, top1=73.1)]).misses
    assert (m.metric, m.expected, m.tolerance, m.n, m.spread) == ("top1", 70.0, 3.0, 1, None)
    assert m.reason == "golden: off by +3.1"


def test_floor_applies_when_the_golden_seeds_agree(tmp_path: Path) -> None:
    """top5 = 100 on every golden seed: s = 0, the allowed deviation is the floor (abs 1.0)."""
    goldens = [rec(s, top5=100.0, top1=t) for s, t in enumerate((68.0, 70.0, 72.0))]
    ok = run_check(tmp_path / "a", goldens, [rec(3, top5=99.1)])
    passed, m = by_metric(ok)[("micro/simclr/default/knn/seed3", "top5")]
    assert passed and m.tolerance == 1.0 and m.spread == 0.0 and m.reason.endswith("off by -0.9 = s = 0, floor")
    miss = run_check(tmp_path / "b", goldens, [rec(3, top5=98.9)])
    assert [(m.metric, m.tolerance) for m in miss.misses] == [("top5", 1.0)]


def test_loss_first_is_compared_with_the_same_seed_only(tmp_path: Path) -> None:
    """loss_first is a pure function of the seed: seed 1 must give seed 1's 5.1 (rel 1e-4), not
    any value of the distribution (seed 0's 5.0 is a miss); a seed without a golden file has no
    loss_first comparison, but its metrics and loss_last still meet the distribution."""
    goldens = [rec(s, top1=t, loss_first=lf) for s, t, lf in ((0, 68.0, 5.0), (1, 70.0, 5.1), (2, 72.0, 5.2))]
    ok = run_check(tmp_path / "a", goldens, [rec(1, loss_first=5.1)])
    lf = [m for m, _ in ok.compared if m.metric == "pretrain.loss_first"]
    assert ok.passed and [(m.expected, m.reason) for m in lf] == [(5.1, "golden seed 1: off by +0")]
    [m] = run_check(tmp_path / "b", goldens, [rec(1, loss_first=5.0)]).misses
    assert (m.metric, m.expected) == ("pretrain.loss_first", 5.1)
    other = run_check(tmp_path / "c", goldens, [rec(9, loss_first=4.0)])
    assert other.passed and sorted(m.metric for m, _ in other.compared) == ["pretrain.loss_last", "top1", "top5"]


def test_a_seed_with_a_golden_file_meets_the_distribution_not_its_own_seed(tmp_path: Path) -> None:
    """Goldens [60, 70, 80] (s = 10): fresh seed 0 at 75 is 15 off its own seed's 60 (a miss under
    the fixed tolerance 3) but inside the distribution; metrics are never compared per seed."""
    goldens = [rec(s, top1=t) for s, t in enumerate((60.0, 70.0, 80.0))]
    report = run_check(tmp_path, goldens, [rec(0, top1=75.0)])
    assert report.passed, report.table()
    _, m = by_metric(report)[("micro/simclr/default/knn/seed0", "top1")]
    assert (m.expected, m.n, m.spread) == (70.0, 3, 10.0)


def test_a_job_with_some_seeds_run_is_run_one_line_per_job(tmp_path: Path) -> None:
    """CI runs seed 0 only: a 3-seed job with a fresh seed 0 is compared, not 'not run'; a job with
    no fresh record is one 'not run' line (with its seed count) and one --require-all miss."""
    linear = [rec(s, ev="linear", top1=t) for s, t in enumerate((68.0, 70.0, 72.0))]
    report = run_check(tmp_path, [*THREE, *linear], [rec(0)], require_all=True)
    assert report.not_run == ["micro/simclr/default/linear"]
    assert [(m.key, m.metric, m.reason) for m in report.misses] == [("micro/simclr/default/linear", "*", "not run")]
    table = report.table()
    assert "not run (1 golden jobs without a fresh record; --require-all makes them misses):\n" in table
    assert "  micro/simclr/default/linear (n=3)\n" in table and "golden jobs: 2 (n=3: 2)\n" in table
    assert table.count("micro/simclr/default/linear") == 2  # the miss row and the not-run line


def test_several_golden_seeds_need_the_distribution_section(tmp_path: Path) -> None:
    fixed_only = TOLERANCES[: TOLERANCES.index("distribution:")]
    with pytest.raises(ConfigError, match=r"tolerances.yaml: distribution: missing .* micro/simclr/default/knn"):
        run_check(tmp_path, THREE, [rec(0)], tolerances=fixed_only)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("alpha: 0.05", "alpha: 1.5"), r"distribution.alpha: expected 0 < alpha < 1"),
        (
            ("      loss_last: {rel: 0.01", "      loss_lost: {rel: 0.01"),
            r"distribution.floor.pretrain.loss_last: missing",
        ),
        (("per_seed: [loss_first]", "per_seed: [loss_frist]"), r"distribution.per_seed: 'loss_frist' is not a key"),
        (("top5: {abs: 1.0", "top5: {abs: -1.0"), r"distribution.floor.metrics.top5: the tolerance must be >= 0"),
        (("alpha: 0.05", "alpha: 0.05\n  alfa: 1"), r"distribution.alfa: unknown key"),
    ],
)
def test_distribution_section_is_validated(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    bad = tmp_path / "tolerances.yaml"
    bad.write_text(TOLERANCES.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        load_tolerances(bad)


def test_committed_tolerance_file_has_a_distribution_section() -> None:
    dist = load_tolerances(COMMITTED_TOLERANCES).distribution
    assert dist is not None and 0 < dist.alpha <= 0.05 and dist.per_seed == ("loss_first",)
    assert dist.floor.pretrain["loss_last"].rel is not None and dist.floor.for_metric("knn", "top1").abs is not None


# ---- tables: mean ± h (n) ----


def test_leaderboard_cells_are_mean_and_t_interval_with_n() -> None:
    """kNN [69, 70, 71]: 70 ± 4.303 * 1 / sqrt(3) = 2.48 (n=3); linear, one seed: the plain value."""
    recs = [rec(s, top1=t, top5=90.0) for s, t in enumerate((69.0, 70.0, 71.0))] + [rec(0, ev="linear", top1=68.25)]
    md = leaderboard(recs, "md", "results")
    row = next(ln for ln in md.splitlines() if ln.startswith("| simclr/default "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["70.00 ± 2.48 (n=3)", "90.00 ± 0.00 (n=3)"]
    assert cells[3] == "68.25" and cells[-1] == "3"
    assert "- cells: mean ± 95 % t-interval half-width over seeds (n = seeds); a plain value is one seed" in md


# ---- scripts/regression.sh: which seeds each mode runs ----

JOBS = """# a comment
simclr default knn,linear random-init seeds=5
mocov2 default knn random-init trace=4

vsimclr default ucf101,hmdb51 seeds=2
"""


def dry_run(tmp_path: Path, jobs: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = {**os.environ, "REGRESSION_DRY_RUN": "1"}
    if jobs is not None:
        (tmp_path / "jobs.txt").write_text(jobs)
        env["REGRESSION_JOBS"] = str(tmp_path / "jobs.txt")
    work = str(tmp_path / "work")
    cmd = ["bash", str(REPO / "scripts" / "regression.sh"), work, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def run_lines(out: str) -> list[str]:
    return [ln.split(" --quiet")[0] for ln in out.splitlines() if ln.startswith("cropbench run ")]


def writes_goldens(out: str) -> list[str]:
    """The dry run's lines that would remove or write committed goldens (their last word: the target)."""
    return [ln for ln in out.splitlines() if ln.startswith(("rm ", "cp ")) and ln.split()[-1].startswith("results/")]


def test_regression_ci_mode_runs_seed_0_whole_or_traced(tmp_path: Path) -> None:
    """CI: seed 0 of each job without trace=K whole, the first K epochs of the others; each kind is
    checked against its own goldens (the whole jobs' only, every one of them required)."""
    proc = dry_run(tmp_path, JOBS)
    assert proc.returncode == 0, proc.stderr
    assert run_lines(proc.stdout) == [
        "cropbench run simclr --variant default --eval knn --eval linear --random-init --seed 0",
        "cropbench run mocov2 --variant default --trace-epochs 4 --seed 0",
        "cropbench run vsimclr --variant default --eval ucf101 --eval hmdb51 --seed 0",
    ]
    work = tmp_path / "work"
    lines = proc.stdout.splitlines()
    assert f"cp -r results/golden/micro/simclr/default {work}/golden-whole/micro/simclr/" in lines
    assert f"cp -r results/golden/micro/simclr/default+random_init {work}/golden-whole/micro/simclr/" in lines
    assert f"cp -r results/golden/micro/vsimclr/default {work}/golden-whole/micro/vsimclr/" in lines
    assert not any("micro/mocov2" in ln for ln in lines if ln.startswith("cp "))  # traced: not required whole
    assert lines[-2:] == [
        f"cropbench check --scale micro --require-all --records {work}/records --golden {work}/golden-whole",
        f"cropbench check --scale micro --require-all --records {work}/traces --golden results/golden/traces",
    ]
    assert not writes_goldens(proc.stdout) and not work.exists()  # a dry run writes nothing


def test_regression_all_runs_every_job_whole_and_every_trace(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, JOBS, "--all")
    assert proc.returncode == 0, proc.stderr
    assert run_lines(proc.stdout) == [
        "cropbench run simclr --variant default --eval knn --eval linear --random-init --seed 0",
        "cropbench run mocov2 --variant default --eval knn --random-init --seed 0",
        "cropbench run mocov2 --variant default --trace-epochs 4 --seed 0",
        "cropbench run vsimclr --variant default --eval ucf101 --eval hmdb51 --seed 0",
    ]
    work = tmp_path / "work"
    assert proc.stdout.splitlines()[-2:] == [
        f"cropbench check --scale micro --require-all --records {work}/records --golden results/golden",
        f"cropbench check --scale micro --require-all --records {work}/traces --golden results/golden/traces",
    ]
    assert not writes_goldens(proc.stdout)


def test_regression_update_runs_each_jobs_seeds(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, JOBS, "--update")
    assert proc.returncode == 0, proc.stderr
    seeds = lambda n: " ".join(f"--seed {s}" for s in range(n))
    assert run_lines(proc.stdout) == [
        f"cropbench run simclr --variant default --eval knn --eval linear --random-init {seeds(5)}",
        f"cropbench run mocov2 --variant default --eval knn --random-init {seeds(3)}",  # default 3
        "cropbench run mocov2 --variant default --trace-epochs 4 --seed 0",  # a trace is one seed's
        f"cropbench run vsimclr --variant default --eval ucf101 --eval hmdb51 {seeds(2)}",
    ]
    assert writes_goldens(proc.stdout) == [
        "rm -rf results/golden/micro",
        f"cp -r {tmp_path}/work/records/micro results/golden/micro",
        "rm -rf results/golden/traces/micro",
        f"cp -r {tmp_path}/work/traces/micro results/golden/traces/micro",
    ]


def test_regression_update_traces_rewrites_the_traces_only(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, JOBS, "--update-traces")
    assert proc.returncode == 0, proc.stderr
    assert run_lines(proc.stdout) == ["cropbench run mocov2 --variant default --trace-epochs 4 --seed 0"]
    assert writes_goldens(proc.stdout) == [
        "rm -rf results/golden/traces/micro",
        f"cp -r {tmp_path}/work/traces/micro results/golden/traces/micro",
    ]


def test_regression_refuses_an_unknown_mode(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, JOBS, "--everything")
    assert proc.returncode == 2 and "unknown option '--everything'" in proc.stderr


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("simclr default knn seeds=0", "'seeds=0': seeds=N needs a whole number N >= 1"),
        ("simclr default knn random_init", "unknown column 'random_init' (expected random-init, seeds=N or trace=K)"),
        ("simclr default knn trace=0", "'trace=0': trace=K needs a whole number of epochs K >= 1"),
        ("simclr default", "expected ENTRY VARIANT EVAL[,EVAL...]"),
    ],
)
def test_regression_job_lines_are_validated(tmp_path: Path, line: str, message: str) -> None:
    proc = dry_run(tmp_path, line + "\n")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_committed_jobs_parse_in_every_mode(tmp_path: Path) -> None:
    """Every committed job runs seed 0 alone in CI (whole, or its trace) and with --all (whole), and
    its seeds=N column's seeds (default 3) when updating; every trace fits its recipe's schedule."""
    ci, full, update = (dry_run(tmp_path, None, *a) for a in ((), ("--all",), ("--update",)))
    assert ci.returncode == full.returncode == update.returncode == 0, ci.stderr + full.stderr + update.stderr
    jobs = [ln for ln in (REPO / "results/golden/jobs.txt").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    traces = {tuple(j.split()[:2]): int(c[6:]) for j in jobs for c in j.split() if c.startswith("trace=")}
    whole = lambda runs: [r for r in runs if "--trace-epochs" not in r]
    ci_runs, full_runs, update_runs = (run_lines(p.stdout) for p in (ci, full, update))
    assert len(whole(full_runs)) == len(whole(update_runs)) == len(jobs) >= 17
    assert len(whole(ci_runs)) == len(jobs) - len(traces) >= 5
    assert [r for r in ci_runs if "--trace-epochs" in r] == [
        f"cropbench run {e} --variant {v} --trace-epochs {k} --seed 0" for (e, v), k in traces.items()
    ]
    assert all(r.endswith(" --seed 0") and r.count("--seed") == 1 for r in ci_runs + full_runs)
    for job, run in zip(jobs, whole(update_runs), strict=True):
        n = next((int(c[6:]) for c in job.split() if c.startswith("seeds=")), 3)
        assert run.count("--seed") == n and run.endswith(" ".join(f"--seed {s}" for s in range(n))), (job, run)
    assert sum(r.count("--seed") >= 3 for r in update_runs) >= 11  # every image job is a distribution
    for (e, v), k in traces.items():
        assert k <= load_entry(e).recipe(v, "micro").train.epochs, (e, v, k)
        assert (REPO / f"results/golden/traces/micro/{e}/{v}/trace/seed0.json").is_file(), (e, v)


def test_regression_refuses_a_missing_or_empty_jobs_file(tmp_path: Path) -> None:
    """Nothing run must never read as a passed regression."""
    env = {**os.environ, "REGRESSION_DRY_RUN": "1", "REGRESSION_JOBS": str(tmp_path / "missing.txt")}
    cmd = ["bash", str(REPO / "scripts" / "regression.sh"), str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "cannot read the jobs file" in proc.stderr
    proc = dry_run(tmp_path, "# only a comment\n")
    assert proc.returncode == 2 and "has no job for this mode" in proc.stderr
    proc = dry_run(tmp_path, "simclr default knn\n", "--update-traces")  # no trace=K: nothing to update
    assert proc.returncode == 2 and "has no job for this mode" in proc.stderr
