"""Fail early, category "first impressions" (issue 10): what a new user meets first.
`cropbench check` after the README's first command shows the comparisons it made and passes;
records stay out of git; errors start on a fresh line, not on a progress bar's; names are listed
in plain English; `cropbench show` prints a summary unless ``--full``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tqdm import tqdm

import cropbench.runner
from cropbench.cli import RESULTS, cli
from cropbench.errors import CropbenchError

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "results" / "golden"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def expected_comparisons(records: Path) -> int:
    """Metrics plus the tolerance file's pretraining keys, over the golden records copied here."""
    pretrain = yaml.safe_load((GOLDEN / "tolerances.yaml").read_text()).get("pretrain") or {}
    recs = [json.loads(p.read_text()) for p in records.rglob("seed*.json")]
    return sum(len(r["metrics"]) + len(set(pretrain) & set(r["pretrain"])) for r in recs)


def test_check_after_the_readme_command_passes_and_shows_its_comparisons(tmp_path: Path) -> None:
    """The README's first command writes simclr's micro knn+linear records (and random init):
    here the golden ones stand in for them. `check` compares those, shows every comparison, lists
    the other goldens as not run (information) and exits 0; CI's --require-all makes them misses."""
    for variant in ("default", "default+random_init"):
        shutil.copytree(GOLDEN / "micro" / "simclr" / variant, tmp_path / "micro" / "simclr" / variant)
    n_goldens = len({p.parent for p in (GOLDEN / "micro").glob("*/*/*/seed*.json")})  # golden jobs
    code, out = invoke("check", "--records", str(tmp_path))
    assert code == 0, out
    rows = [ln for ln in out.splitlines() if ln.startswith("| micro/simclr/")]
    # each golden metric of the 4 records, + the checked pretraining losses (random init has none)
    n = expected_comparisons(tmp_path)
    assert n >= 12 and len(rows) == n and all("| ok " in r for r in rows)
    assert f"not run ({n_goldens - 4} golden jobs without a fresh record; --require-all makes them misses)" in out
    assert "  micro/mocov2/default/knn (n=" in out  # one line per job, with its number of golden seeds
    assert out.splitlines()[-1] == f"check passed: {n} comparisons, 0 misses, {n_goldens - 4} not run"
    code, out = invoke("check", "--records", str(tmp_path), "--require-all")
    assert code == 1 and out.splitlines()[-1].startswith(f"check FAILED: {n + n_goldens - 4} comparisons")


def test_records_and_runs_stay_out_of_git() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("results/records/micro/simclr/default/knn/seed0.json", "runs/micro/simclr/default/seed0/x.pt"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        assert res.returncode == 0, f"{path} is not ignored by git"
    assert RESULTS / "records" == REPO / "results" / "records"  # the default --out that is ignored
    res = subprocess.run(["git", "check-ignore", "-q", "results/golden/jobs.txt"], cwd=REPO, check=False)
    assert res.returncode == 1  # the goldens are still tracked


def test_an_error_during_training_prints_on_a_fresh_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error raised while a progress bar is open: the bar is closed (cleared) first, so the
    message is not appended to the bar's line."""

    def fails_mid_epoch(spec: object) -> None:
        bar = tqdm(total=3, desc="epoch 1/1", leave=False)  # stderr, as the trainer's
        bar.update(1)
        raise CropbenchError("non-finite loss at epoch 1")

    monkeypatch.setattr(cropbench.runner, "run", fails_mid_epoch)
    code, out = invoke("run", "simclr")
    assert code == 2 and "epoch 1/1" in out  # the bar was shown ...
    assert out.rsplit("\r", 1)[-1] == "Error: non-finite loss at epoch 1\n"  # ... and the error is on its own line
    assert not [b for b in getattr(tqdm, "_instances", ()) if not b.disable]


def test_unknown_entry_lists_the_valid_entries() -> None:
    code, out = invoke("show", "nope")
    assert code == 2 and "unknown entry 'nope'; valid entries: brave, byol," in out and "entrys" not in out


def test_show_prints_a_summary_and_full_prints_everything() -> None:
    code, short = invoke("show", "regioncl")
    assert code == 0 and len(short.splitlines()) <= 40
    assert "[paper] recipe" in short and "regioncl_m on resnet50, imagenet at 256 px, 200 epochs" in short
    assert "references:" in short and "cropbench show regioncl --full" in short
    code, full = invoke("show", "regioncl", "--full")
    assert code == 0 and len(full.splitlines()) > 300 and "    params:" in full and "deviations:" in full
