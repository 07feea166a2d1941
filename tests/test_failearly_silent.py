"""Fail early, category "silent wrong results" (issue 10): inputs that used to give a wrong or
ignored result with exit 0. Each case asserts the exit status, the message (what and where), and
that nothing was written or lost.

One tiny CLI run (module fixture) is shared: it runs with ``--set`` overrides and ``--resume``
before any checkpoint exists, in a run folder that holds a lock file left by a killed process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.errors import CropbenchError
from cropbench.runner import LOCK, run_lock

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]
TINY += ["--set", "data.limit=64", "--set", "optim.lr=1e-3"]  # a number as users write it (YAML says str)


def invoke(*args: str) -> tuple[int, str]:
    """Exit status and output of the CLI; a traceback (any exception but SystemExit) fails the test."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def run_args(tmp: Path, data_root: Path, *extra: str) -> list[str]:
    return ["run", "simclr", "--eval", "knn", *TINY, "--out", str(tmp / "rec"), "--work-dir", str(tmp / "runs")] + [
        "--data-root",
        str(data_root),
        *extra,
    ]


# another process that takes the run lock as ``run_lock`` does (flock on run.lock), says so, waits
HOLDER = (
    "import fcntl, os, sys, time\n"
    "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "f.write(f'pid {os.getpid()} on test\\n'); f.flush(); print('locked', flush=True); time.sleep(60)\n"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / LOCK)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _hold_lock_and_die(run_dir: Path) -> None:
    """A process that takes the run lock and is killed (SIGKILL) while holding it."""
    proc = _holder(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("silent")
    run_dir = tmp / "runs" / "micro" / "simclr" / "default" / "seed0"
    _hold_lock_and_die(run_dir)
    assert (run_dir / LOCK).read_text().startswith("pid ")  # the dead holder's lock file is still there
    code, out = invoke(*run_args(tmp, data_root, "--resume"))
    assert code == 0, out
    return tmp, out


def test_overrides_are_recorded_and_numbers_parsed(tiny_run: tuple[Path, str]) -> None:
    tmp, _ = tiny_run
    rec = json.loads((tmp / "rec" / "micro/simclr/default/knn/seed0.json").read_text())
    assert rec["provenance"]["recipe"]["optim"]["lr"] == 0.001
    assert rec["provenance"]["overrides"] == {
        "data.limit": 64,
        "optim.lr": 0.001,
        "train.batch_size": 16,
        "train.epochs": 1,
        "train.max_steps_per_epoch": 2,
    }


def test_modified_records_are_marked_and_never_checked_against_the_paper(tiny_run: tuple[Path, str]) -> None:
    tmp, _ = tiny_run
    code, out = invoke("leaderboard", "--records", str(tmp / "rec"))
    assert code == 0 and "| simclr/default (modified) [1] " in out and "modified by --set data.limit=64" in out
    code, out = invoke("check", "--records", str(tmp / "rec"))
    assert code == 0, out  # the goldens of other jobs are "not run" information, not failures
    assert "micro/simclr/default/knn/seed0: data.limit=64, optim.lr=0.001" in out and "not compared" in out


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tiny_run: tuple[Path, str]) -> None:
    tmp, out = tiny_run
    path = tmp / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt"
    assert f"--resume: no checkpoint at {path}, starting from scratch" in out
    assert path.exists()


def test_resume_strict_refuses_without_a_checkpoint_and_writes_nothing(tmp_path: Path, data_root: Path) -> None:
    code, out = invoke(*run_args(tmp_path, data_root, "--resume=strict"))
    path = tmp_path / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt"
    assert code == 2 and f"--resume=strict: no checkpoint at {path}" in out
    assert files(tmp_path) == []


def test_negative_epochs_is_an_error_before_anything_is_written(tmp_path: Path, data_root: Path) -> None:
    code, out = invoke(*run_args(tmp_path, data_root, "--set", "train.epochs=-1"))
    assert code == 2 and "entry.yaml (variant 'default', scale 'micro'): train.epochs: expected an integer >= 1" in out
    assert "got -1" in out and files(tmp_path) == []


def test_a_stale_lock_of_a_dead_process_does_not_block(tiny_run: tuple[Path, str]) -> None:
    tmp, out = tiny_run  # the fixture's run went through a lock left by a SIGKILLed holder
    assert (tmp / "rec" / "micro/simclr/default/knn/seed0.json").exists()


def test_a_second_concurrent_run_is_refused_and_changes_nothing(tiny_run: tuple[Path, str], data_root: Path) -> None:
    tmp, _ = tiny_run
    run_dir = tmp / "runs" / "micro" / "simclr" / "default" / "seed0"
    before = {p: (tmp / p).read_bytes() for p in files(tmp) if not p.endswith(LOCK)}
    with run_lock(run_dir):  # the first run, still going
        code, out = invoke(*run_args(tmp, data_root))
    assert code == 2 and f"{run_dir} is in use by another cropbench run (pid {os.getpid()}" in out
    assert "another --work-dir" in out
    assert {p: (tmp / p).read_bytes() for p in files(tmp) if not p.endswith(LOCK)} == before


def test_the_lock_of_a_live_process_refuses_and_its_death_frees_it(tmp_path: Path) -> None:
    """The lock is a kernel flock: refused while the other process lives, free once it is killed."""
    proc = _holder(tmp_path)
    try:
        with pytest.raises(CropbenchError, match=rf"in use by another cropbench run \(pid {proc.pid} on test\)"):
            with run_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


@pytest.mark.parametrize("command", ["leaderboard", "check"])
def test_records_folder_that_does_not_exist_is_an_error(command: str, tmp_path: Path) -> None:
    code, out = invoke(command, "--records", str(tmp_path / "nope"))
    assert code == 2 and f"records folder {tmp_path / 'nope'} does not exist" in out
    assert "(no records)" not in out and files(tmp_path) == []
