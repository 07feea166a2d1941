"""``--launcher slurm``: the run is submitted through submitit and the command returns at once.

Tested for real with submitit's LocalExecutor (``--launcher submitit-local``: the same
``AutoExecutor`` path with ``cluster="local"``, tasks started by submitit's controller with its
job environment [facebookincubator/submitit@1.5.4:submitit/local/local.py ``Controller``,
``LocalJobEnvironment``]); each task sets the torchrun variables from ``submitit.JobEnvironment``
and joins the job as under torchrun. The test waits for the job and reads its records.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.data import dataset_folder
from cropbench.records import load_records
from cropbench.runner import command_line

submitit = pytest.importorskip("submitit")  # in the test extra; CI always has it

TINY = ["--eval", "knn", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3"]
TINY += ["--set", "train.batch_size=16", "--set", "data.limit=64", "--set", "eval.knn.k=5"]


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output


def wait_for(job_dir: Path, job_id: str, tasks: int, timeout: float = 300.0) -> list[object]:
    """Every task's result (submitit writes ``<job>_<task>_result.pkl`` as a task ends)."""
    from submitit.local.local import LocalJob

    deadline = time.monotonic() + timeout
    while not all((job_dir / f"{job_id}_{t}_result.pkl").exists() for t in range(tasks)):
        assert time.monotonic() < deadline, f"job {job_id} did not finish in {timeout}s"
        time.sleep(0.5)
    return LocalJob(job_dir, job_id, tasks=list(range(tasks))).results()


@pytest.mark.slow
def test_a_submitted_run_and_a_submitted_eval_finish_and_write_their_records(tmp_path: Path, data_root: Path) -> None:
    """run: 2 tasks (gloo, CPU) joined through the job environment; rank 0 writes the one record.
    eval of its checkpoint: 1 task; the same kNN numbers (the same weights, the same protocol)."""
    dataset_folder("synth_images", data_root)
    out, work, logs = tmp_path / "out", tmp_path / "runs", tmp_path / "logs"
    common = ["--data-root", str(data_root), "--launcher", "submitit-local", "--gpus-per-node", "0", "--time", "10"]
    t0 = time.monotonic()
    code, text = invoke("run", "simclr", *TINY, "--nproc", "2", "--out", str(out), "--work-dir", str(work), *common)
    assert code == 0, text
    assert time.monotonic() - t0 < 60  # it returned without waiting for the job
    job_id = re.search(r"submitted submitit-local job (\d+): 1 node\(s\) x 2 process\(es\)", text).group(1)
    log = work / "slurm" / f"{job_id}_0_log.out"
    assert f"log:     {log}" in text
    assert f"record:  {out / 'micro/simclr/default/knn/seed0.json'}" in text
    rank0, rank1 = wait_for(work / "slurm", job_id, 2)
    assert rank1 is None and [r.key for r in rank0] == [r.key for r in load_records(out)]
    (ran,) = load_records(out)
    assert ran.provenance["world_size"] == 2
    assert ran.provenance["command"] == command_line()  # the submitting command, not submitit's task
    assert "knn: top1" in (work / "slurm" / f"{job_id}_0_log.err").read_text()
    assert "knn: top1" not in (work / "slurm" / f"{job_id}_1_log.err").read_text()

    ckpt = work / "micro/simclr/default/seed0/checkpoint.pt"
    ev_out = tmp_path / "eval_out"
    args = ["eval", str(ckpt), "--entry", "simclr", "--eval", "knn", "--set", "eval.knn.k=5", "--out", str(ev_out)]
    code, text = invoke(*args, "--work-dir", str(work), "--slurm-log-dir", str(logs), *common)
    assert code == 0, text
    job_id = re.search(r"job (\d+): 1 node\(s\) x 1 process\(es\)", text).group(1)
    assert f"log:     {logs / f'{job_id}_0_log.out'}" in text
    (evaluated,) = wait_for(logs, job_id, 1)[0]
    assert evaluated.metrics == ran.metrics and load_records(ev_out)[0].metrics == ran.metrics


def test_missing_submitit_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    for launcher in ("slurm", "submitit-local"):
        code, text = invoke("run", "simclr", "--launcher", launcher, "--work-dir", str(tmp_path / "w"))
        assert code == 2 and "pip install cropbench[slurm]" in text and "Traceback" not in text, text
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "gpu"], "--partition applies only with --launcher slurm"),
        (["--time", "30"], "--time applies only with --launcher slurm"),
        (["--launcher", "slurm", "--gpus-per-node", "4", "--nproc", "2"], "one process per GPU"),
        (["--launcher", "submitit-local", "--nodes", "2"], "--launcher submitit-local runs on this machine"),
    ],
)
def test_launcher_options_that_do_not_fit_are_errors(args: list[str], message: str, tmp_path: Path) -> None:
    code, text = invoke("run", "simclr", *args, "--work-dir", str(tmp_path / "w"))
    assert code == 2 and message in text, text


def test_slurm_without_sbatch_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, text = invoke("run", "simclr", "--launcher", "slurm", "--partition", "gpu", "--work-dir", str(tmp_path))
    assert code == 2 and "no `sbatch` on PATH" in text, text


def test_slurm_submission_reaches_sbatch_with_the_asked_resources(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--launcher slurm`` down to ``sbatch`` (a stand-in here that keeps the script and answers as
    sbatch does, "Submitted batch job N"): the script asks for the nodes, tasks, GPUs, partition and
    time given; the CLI prints the job id, the log of task 0 and the records' paths."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never run here
    for f in ("sbatch", "srun"):
        (bin_dir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    dataset_folder("synth_images", data_root)
    out, work = tmp_path / "out", tmp_path / "runs"
    args = ["run", "simclr", *TINY, "--seed", "0", "--seed", "1", "--out", str(out), "--work-dir", str(work)]
    args += ["--data-root", str(data_root), "--launcher", "slurm", "--partition", "gpu", "--nodes", "2"]
    code, text = invoke(*args, "--gpus-per-node", "8", "--time", "90", "--cpus-per-task", "10")
    assert code == 0, text
    assert "submitted Slurm job 4242: 2 node(s) x 8 process(es)" in text
    assert f"log:     {work / 'slurm' / '4242_0_log.out'}" in text
    for seed in (0, 1):
        assert f"record:  {out / f'micro/simclr/default/knn/seed{seed}.json'}" in text
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=90"):
        assert f"#SBATCH {line}\n" in script, script
    assert "#SBATCH --cpus-per-task=10\n" in script and "srun" in script
    assert not out.exists() and not (work / "micro").exists()  # nothing ran here
