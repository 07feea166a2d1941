"""Joining an existing distributed launch (issue 14): torchrun and srun environments, for real.

Two ``torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node 1`` invocations on 127.0.0.1 (gloo,
one CPU process each) run the same ``cropbench run`` command and must end with the weights of one
``cropbench run --nproc 2`` (torch.equal on every encoder tensor) and the same kNN numbers; only
rank 0 writes records and prints the table. The variables are torchrun's
[pytorch/pytorch@v2.14.1:torch/distributed/run.py "Environment variables": RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT] and srun's [SchedMD/slurm srun.1 "OUTPUT ENVIRONMENT
VARIABLES": SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST; a batch script
also has SLURM_PROCID=0 and SLURM_NTASKS, but no SLURM_STEP_* unless srun started it].
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.data import dataset_folder
from cropbench.errors import CropbenchError
from cropbench.launch import LaunchEnv, first_host, launch_env
from cropbench.records import load_records

TINY = ["--eval", "knn", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3"]
TINY += ["--set", "train.batch_size=16", "--set", "data.limit=64", "--set", "eval.knn.k=5", "--quiet"]
TINY += ["--random-init"]  # the random-init encoder's evaluation runs in every process too
CKPT = Path("micro/simclr/default/seed0/checkpoint.pt")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(node: int, port: int, out: Path, work: Path, data_root: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node)]
    cmd += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd += ["-m", "cropbench", "run", "simclr", *TINY, "--out", str(out), "--work-dir", str(work)]
    cmd += ["--data-root", str(data_root)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, object]:
    """One ``--nproc 2`` run and one 2-node torchrun run of the same command, side by side."""
    dataset_folder("synth_images", data_root)  # a fresh machine has no data yet: generate it once here
    root = tmp_path_factory.mktemp("multinode")
    port = _free_port()
    nodes = [_torchrun(n, port, root / f"out_node{n}", root / "joined", data_root) for n in (0, 1)]
    spawn = [sys.executable, "-m", "cropbench", "run", "simclr", *TINY, "--nproc", "2"]
    spawn += ["--out", str(root / "out_nproc"), "--work-dir", str(root / "spawned"), "--data-root", str(data_root)]
    spawned = subprocess.run(spawn, env=_env(), capture_output=True, text=True, timeout=300)
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (o, e) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, o + e
    assert spawned.returncode == 0, spawned.stdout + spawned.stderr
    return {"root": root, "node_out": [o for o, _ in outs], "node_err": [e for _, e in outs], "spawned": spawned}


@pytest.mark.slow
def test_two_torchrun_nodes_give_the_weights_of_one_two_process_run(launches: dict) -> None:
    root = launches["root"]
    joined = torch.load(root / "joined" / CKPT, weights_only=True)["encoder"]
    spawned = torch.load(root / "spawned" / CKPT, weights_only=True)["encoder"]
    assert joined.keys() == spawned.keys() and len(joined) > 10
    for k in joined:
        assert torch.equal(joined[k], spawned[k]), k
    joined_recs, spawned_recs = load_records(root / "out_node0"), load_records(root / "out_nproc")
    assert [r.variant for r in joined_recs] == [r.variant for r in spawned_recs] == ["default", "default+random_init"]
    for a, b in zip(joined_recs, spawned_recs, strict=True):
        assert a.metrics == b.metrics and a.pretrain.get("loss_first") == b.pretrain.get("loss_first")
        assert a.provenance["world_size"] == b.provenance["world_size"] == 2
        assert a.provenance["command"].startswith("python -m cropbench run simclr")


@pytest.mark.slow
def test_only_rank_0_of_a_joined_launch_writes_and_prints(launches: dict) -> None:
    """Each node got its own --out: rank 1's is never created; its stdout has no table."""
    root = launches["root"]
    found = sorted(p.relative_to(root / "out_node0").as_posix() for p in (root / "out_node0").rglob("*.json"))
    assert found == ["micro/simclr/default+random_init/knn/seed0.json", "micro/simclr/default/knn/seed0.json"]
    assert not (root / "out_node1").exists()
    assert "simclr/default" in launches["node_out"][0] and "top1" in launches["node_out"][0]
    assert launches["node_out"][1].strip() == ""
    assert "knn: top1" not in launches["node_err"][1]
    assert launches["spawned"].stdout.count("top1") == 1  # one table (one row per metric) from --nproc 2 too


def test_nproc_inside_a_launch_is_an_error(tmp_path: Path) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for cmd in (["run", "simclr"], ["eval", str(tmp_path / "w.pt"), "--entry", "simclr"]):
        res = CliRunner().invoke(cli, [*cmd, "--nproc", "2", "--out", str(tmp_path / "o")], env=env)
        assert res.exit_code == 2, res.output
        assert "--nproc 2: this process is already rank 0 of 2 (torchrun" in res.output
        assert "leave --nproc out" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- reading the environment
def test_torchrun_environment() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29400"}
    assert launch_env(env) == LaunchEnv(3, 8, 1, "n0", 29400, "torchrun")
    # torchrun --standalone --nproc-per-node 1: one process, on torchrun's own store
    assert launch_env(env | {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).master_port == 29400
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}).master_port > 0  # no store named: a free port
    assert launch_env({}) is None
    assert launch_env({"PATH": "/bin", "SLURM_JOB_ID": "7"}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer >= 0"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR is not"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0': expected an integer >= 1"),
    ],
)
def test_a_broken_launch_environment_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(CropbenchError, match=message.replace("(", r"\(").replace("[", r"\[")):
        launch_env(env)


def test_srun_step_environment() -> None:
    """srun's variables; the master is the step's first host, the port a function of the job id."""
    step = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_ID": "4242"}
    step |= {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[003-006,010],cpu1", "SLURM_NTASKS": "16"}
    env = launch_env(step)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu003")
    assert env.master_port == 20_000 + 42420 % 20_000 and env.source == "slurm"
    assert launch_env(step | {"MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_addr == "head"
    # torchrun inside srun: torchrun's own variables describe this process
    assert launch_env(step | {"RANK": "0", "WORLD_SIZE": "1"}).source == "torchrun"


def test_a_batch_script_or_a_one_task_step_is_no_launch() -> None:
    """sbatch's own shell has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step, an interactive
    ``srun --pty bash`` is a step of one task: cropbench runs alone there (or spawns with --nproc)."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gnode[10,20]"}
    assert launch_env(batch) is None
    assert launch_env(batch | {"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "0"}) is None


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gnode[10,20,25,37]", "gnode10"), ("node[001-004]-ib,x", "node001-ib"), ("a1,b2", "a1"), ("solo", "solo")],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


# ---------------------------------------------------------------- joining for real, failing together
def _srun_worker(rank: int, port: int, out: str, fail_rank: int) -> None:
    """What srun gives a task: SLURM_* only; cropbench finds the launch, joins it and runs ``job``."""
    from cropbench.runner import joined, together

    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2")
    os.environ.update(SLURM_STEP_NODELIST="127.0.0.1", MASTER_PORT=str(port), SLURM_JOB_ID="1")

    def job(ctx, device):  # type: ignore[no-untyped-def]
        t = torch.tensor([float(ctx.rank + 1)])
        torch.distributed.all_reduce(t)
        try:
            together(ctx, device, lambda: 1 / 0 if ctx.rank == fail_rank else None)
        except Exception as e:
            return f"{ctx.rank}/{ctx.world_size} sum {t.item():g} {type(e).__name__}: {e}"
        return f"{ctx.rank}/{ctx.world_size} sum {t.item():g} ok"

    Path(out, f"rank{rank}").write_text(joined(launch_env(), "cpu", job))


def test_an_srun_step_is_joined_and_a_failure_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """Two processes with only srun's variables join one gloo group (the all-reduce sums 1 + 2);
    ``together``: rank 1 failing makes rank 0 raise too instead of waiting for it."""
    mp.start_processes(_srun_worker, (_free_port(), str(tmp_path), 1), nprocs=2, join=True, start_method="fork")
    assert (tmp_path / "rank0").read_text() == (
        "0/2 sum 3 CropbenchError: another process of this launch failed (rank 0 of 2 stops)"
    )
    assert (tmp_path / "rank1").read_text() == "1/2 sum 3 ZeroDivisionError: division by zero"
