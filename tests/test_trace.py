"""``cropbench run --trace-epochs K``: the first K epochs of a recipe's schedule, as CI checks the golden
jobs it does not re-run whole (``results/golden/traces``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.checks import check, load_tolerances
from cropbench.cli import cli
from cropbench.errors import ConfigError
from cropbench.records import read_record, record_json, record_path

REPO = Path(__file__).resolve().parent.parent
TRACES = REPO / "results" / "golden" / "traces"

# BYOL: its EMA momentum follows the schedule's length, so a prefix run that shortened the schedule
# would differ from the whole run's first epochs at once
TINY = [
    "--set",
    "train.epochs=3",
    "--set",
    "train.max_steps_per_epoch=3",
    "--set",
    "train.batch_size=16",
    "--set",
    "data.limit=64",
    "--set",
    "optim.warmup_epochs=0",
]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def run(out: Path, data_root: Path, *args: str) -> None:
    where = ["--quiet", "--out", str(out / "records"), "--work-dir", str(out / "runs"), "--data-root", str(data_root)]
    code, text = invoke("run", "byol", *TINY, *args, *where)
    assert code == 0, text


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, Path]:
    """The same tiny BYOL recipe whole (3 epochs, kNN) and traced for 2 epochs, in two work folders."""
    whole, traced = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("traced")
    run(whole, data_root, "--eval", "knn")
    run(traced, data_root, "--trace-epochs", "2")
    return whole, traced


def test_a_trace_is_the_prefix_of_the_whole_run(runs: tuple[Path, Path]) -> None:
    whole, traced = runs
    rec = read_record(traced / "records/micro/byol/default/trace/seed0.json")
    full = read_record(whole / "records/micro/byol/default/knn/seed0.json")
    rows = metric_rows(whole / "runs/micro/byol/default/seed0")
    epoch2 = next(r["epoch_loss"] for r in rows if r.get("epoch") == 2 and "epoch_loss" in r)
    assert rec.metrics == {"loss": epoch2}  # bit for bit: same steps, lr and momentum schedules
    assert rec.pretrain["loss_first"] == full.pretrain["loss_first"]
    assert (rec.pretrain["epochs"], rec.pretrain["steps"]) == (2, 6) and full.pretrain["epochs"] == 3
    # every logged step of the prefix (loss, lr) is the whole run's
    prefix = metric_rows(traced / "runs/micro/byol/default/seed0-trace2")
    assert prefix == [r | {"images_per_s": p["images_per_s"]} for r, p in zip(rows, prefix, strict=False)]
    assert len(prefix) < len(rows)
    # its own folder: the trace's epoch-2 checkpoint never stands in for a whole run's
    assert not (traced / "runs/micro/byol/default/seed0").exists()
    assert rec.provenance["eval_settings"] == {"epochs": 2, "schedule_epochs": 3}


def test_the_trace_check_passes_a_rerun_and_misses_a_run_that_stopped_learning(
    runs: tuple[Path, Path], tmp_path: Path, data_root: Path
) -> None:
    """The committed trace tolerances against the tiny trace as its own golden: a re-run of the same
    code passes; the same trace with the learning rate at 1e-9 (zero in effect: 0 is refused), its
    override marker removed as a code change would give it, misses on the loss, with the first step's
    loss still equal."""
    _, traced = runs
    golden = tmp_path / "golden"
    shutil.copytree(traced / "records", golden)
    shutil.copy(TRACES / "tolerances.yaml", golden / "tolerances.yaml")
    ok = check(traced / "records", golden, require_all=True)
    assert ok.passed and ok.checked == 2, ok.table()  # loss and pretrain.loss_first

    broken = tmp_path / "broken"
    run(broken, data_root, "--trace-epochs", "2", "--set", "optim.lr=1e-9")
    path = record_path(broken / "records", read_record(traced / "records/micro/byol/default/trace/seed0.json"))
    rec = json.loads(path.read_text())
    del rec["provenance"]["overrides"]["optim.lr"]
    path.write_text(json.dumps(rec))
    report = check(broken / "records", golden, require_all=True)
    assert [(m.metric, m.key) for m in report.misses] == [("loss", "micro/byol/default/trace/seed0")], report.table()
    assert "pretrain.loss_first" in report.table()  # compared, and equal: the first step precedes any update
    tol = load_tolerances(golden / "tolerances.yaml").for_metric("trace", "loss")
    miss = report.misses[0]
    assert abs(miss.got - miss.expected) > 3 * tol.allowed(miss.expected)  # not a near miss


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval", "knn"], "--trace-epochs 2 pretrains a prefix of the schedule and evaluates nothing; drop --eval"),
        (["--random-init"], "drop --random-init"),
        (["--trace-epochs", "9"], "--trace-epochs 9: the recipe trains 3 epochs (train.epochs); trace at most 3"),
    ],
)
def test_trace_refusals_come_before_any_training(
    tmp_path: Path, data_root: Path, extra: list[str], message: str
) -> None:
    args = ["--trace-epochs", "2", *extra] if extra[0] != "--trace-epochs" else extra
    where = ["--out", str(tmp_path / "records"), "--work-dir", str(tmp_path / "runs"), "--data-root", str(data_root)]
    code, text = invoke("run", "byol", *TINY, *args, *where)
    assert code == 2 and message in " ".join(text.split()), text
    assert not (tmp_path / "runs" / "micro").exists()  # refused in the preflight: nothing trained


def test_committed_trace_goldens_are_one_seed_traces_of_the_committed_recipes() -> None:
    """Each golden trace: seed 0, eval ``trace``, unmodified, of its entry's current micro recipe
    (a recipe change without a trace regeneration fails here, not in CI's check alone)."""
    from cropbench.recipe import load_entry

    paths = sorted(TRACES.glob("micro/*/*/trace/seed*.json"))
    assert len(paths) >= 10
    for path in paths:
        rec = read_record(path)
        assert rec.eval == "trace" and rec.seed == 0 and not rec.overrides, path
        assert record_json(rec) == path.read_text(), path
        recipe = load_entry(rec.entry).recipe(rec.variant, "micro", {"train": {"seed": 0}})
        assert rec.provenance["recipe_hash"] == recipe.hash(), f"{path}: regenerate the trace goldens"
        assert rec.provenance["eval_settings"]["schedule_epochs"] == recipe.train.epochs


def test_a_jobs_own_tolerance_comes_before_the_metrics(tmp_path: Path) -> None:
    path = tmp_path / "tolerances.yaml"
    text = """
default: {abs: 1.0, why: "default"}
metrics:
  trace/loss: {rel: 0.01, why: "any trace"}
jobs:
  regioncl/s/trace/loss: {rel: 0.5, why: "its own drift"}
"""
    path.write_text(text)
    tol = load_tolerances(path)
    assert tol.for_metric("trace", "loss", "regioncl/s").rel == 0.5
    assert tol.for_metric("trace", "loss", "regioncl/m").rel == 0.01 == tol.for_metric("trace", "loss").rel
    assert tol.for_metric("knn", "top1", "regioncl/s").abs == 1.0
    path.write_text(text.replace("regioncl/s/trace/loss", "regioncl/trace/loss"))
    with pytest.raises(ConfigError, match="jobs.regioncl/trace/loss: expected a key entry/variant/eval/metric"):
        load_tolerances(path)
