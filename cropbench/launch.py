"""Where a cropbench process stands in a distributed job, and submitting a job to Slurm.

Three ways a run gets its processes (the runner does the same work in each, on every process):

* ``--nproc N``: cropbench spawns N local processes through torchrun's launcher API.
* joined: the environment already describes a job, and the process joins it instead of spawning:
  torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
  [pytorch/pytorch torch/distributed/run.py, "Environment variables"]; ``srun`` sets
  ``SLURM_PROCID``, ``SLURM_LOCALID`` and, in a job step only, ``SLURM_STEP_NUM_TASKS`` and
  ``SLURM_STEP_NODELIST`` (a batch script's own environment has ``SLURM_PROCID=0`` and the job's
  ``SLURM_NTASKS`` too, so only a step's variables mean "srun started me"; a step of one task, an
  interactive ``srun --pty bash``, is no launch either).
* ``--launcher slurm``: the same run is submitted through submitit; each task sets the torchrun
  variables from ``submitit.JobEnvironment`` and then runs the joined path.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cropbench.errors import CropbenchError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20_000, 20_000  # a job's default rendezvous port: PORT_BASE + job id mod PORT_SPAN


@dataclass(frozen=True)
class LaunchEnv:
    """One process of an existing distributed job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" (RANK/WORLD_SIZE set) or "slurm" (an srun step)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.source}, master {self.master_addr}:{self.master_port})"

    def export(self) -> None:
        """Set the torchrun variables that ``init_process_group("env://")`` reads."""
        values = (self.rank, self.world_size, self.local_rank, self.master_addr, self.master_port)
        os.environ.update({k: str(v) for k, v in zip(TORCHRUN_VARS, values, strict=True)})


def _int(env: Mapping[str, str], name: str, lo: int = 0) -> int:
    raw = env.get(name, "")
    if not re.fullmatch(r"\s*\d+\s*", raw) or int(raw) < lo:
        raise CropbenchError(f"environment variable {name}={raw!r}: expected an integer >= {lo}")
    return int(raw)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-006,010],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not m.group(0):
        raise CropbenchError(f"SLURM node list {nodelist!r}: expected host names like node[01-04],gpu5")
    prefix, ranges, suffix = m.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def free_port() -> int:
    """A TCP port free on this host now (for a launch of one host; a race with others is unlikely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_of(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def _torchrun_env(env: Mapping[str, str]) -> LaunchEnv:
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise CropbenchError(
            f"environment: {' and '.join(TORCHRUN_VARS[:2])} describe a distributed job together, but "
            f"{missing[0]} is not set (torchrun sets both; unset the other to run without a launcher)"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE", 1)
    if rank >= world:
        raise CropbenchError(f"environment: RANK={rank} is not below WORLD_SIZE={world}")
    if world == 1:  # one process: torchrun's store if it named one, else a private one
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        port = _int(env, "MASTER_PORT", 1) if "MASTER_PORT" in env else free_port()
        return LaunchEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    for k in TORCHRUN_VARS[2:]:
        if k not in env:
            raise CropbenchError(f"environment: RANK and WORLD_SIZE={world} are set, but {k} is not (torchrun sets it)")
    local, addr, port = _int(env, "LOCAL_RANK"), env["MASTER_ADDR"], _int(env, "MASTER_PORT", 1)
    return LaunchEnv(rank, world, local, addr, port, "torchrun")


def _slurm_env(env: Mapping[str, str]) -> LaunchEnv:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS", 1)
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    addr = env.get("MASTER_ADDR") or first_host(nodes)
    job = f"{env.get('SLURM_JOB_ID', '0')}{env.get('SLURM_STEP_ID', '')}"
    port = _int(env, "MASTER_PORT", 1) if "MASTER_PORT" in env else _port_of(job)
    return LaunchEnv(rank, world, local, addr, port, "slurm")


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The distributed job this process belongs to, from its environment; None when there is none.
    torchrun's variables win over Slurm's (a torchrun under srun describes its own workers)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun_env(env)
    if "SLURM_PROCID" in env and env.get("SLURM_STEP_NUM_TASKS", "1").strip() != "1":
        return _slurm_env(env)  # a step of one task (an interactive srun shell) is no launch: --nproc may spawn
    return None


def refuse_nproc(nproc: int, env: LaunchEnv | None) -> None:
    """``--nproc N`` spawns processes; inside an existing launch the launcher already did."""
    if env is not None and nproc > 1:
        raise CropbenchError(
            f"--nproc {nproc}: this process is already {env.describe()}; the launcher started the "
            "processes, so leave --nproc out (or run without torchrun / srun to spawn them here)"
        )


# ---------------------------------------------------------------- Slurm through submitit
LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class SlurmOptions:
    """``--launcher slurm`` (or ``submitit-local``: submitit's LocalExecutor, one node, for tests)."""

    launcher: str = "slurm"
    log_dir: Path = Path("runs/slurm")
    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1  # processes per node: one per GPU
    gpus_per_node: int = 1
    time_min: int = 60
    cpus_per_task: int | None = None

    def check(self) -> None:
        """Options that fit together, submitit installed, and (for Slurm) ``sbatch`` at hand."""
        if self.launcher not in LAUNCHERS[1:]:
            raise CropbenchError(f"--launcher {self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if self.launcher == "submitit-local" and self.nodes != 1:
            raise CropbenchError(f"--nodes {self.nodes}: --launcher submitit-local runs on this machine (1 node)")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise CropbenchError(
                f"--nproc {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: one process per GPU "
                "(leave --nproc out; set it only with --gpus-per-node 0, for CPU jobs)"
            )
        import_submitit()
        if self.launcher == "slurm" and shutil.which("sbatch") is None:
            raise CropbenchError("--launcher slurm: no `sbatch` on PATH; submit from a Slurm login node")


@dataclass(frozen=True)
class Submitted:
    job_id: str
    stdout: Path  # task 0's log (each task has its own, <job>_<task>_log.out/.err)
    stderr: Path
    job: Any  # the submitit Job


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError as e:
        raise CropbenchError(
            "--launcher slurm submits through submitit, which is not installed: pip install cropbench[slurm] "
            "(or pip install submitit)"
        ) from e
    return submitit


def submit(fn: Callable[..., Any], args: tuple[Any, ...], opts: SlurmOptions, name: str) -> Submitted:
    """Submit ``fn(*args)`` as one job of ``opts.nodes`` x ``opts.tasks_per_node`` tasks; returns at once."""
    opts.check()
    submitit = import_submitit()
    cluster = "slurm" if opts.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=Path(opts.log_dir).absolute(), cluster=cluster)
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": opts.time_min,
        "nodes": opts.nodes,
        "tasks_per_node": opts.tasks_per_node,
        "gpus_per_node": opts.gpus_per_node,
    }
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.partition:
        params["slurm_partition"] = opts.partition
    executor.update_parameters(**params)
    job = executor.submit(run_as_task, fn, *args)
    return Submitted(str(job.job_id), Path(job.paths.stdout), Path(job.paths.stderr), job)


def run_as_task(fn: Callable[..., Any], *args: Any) -> Any:
    """One task of a submitted job: the torchrun variables from submitit's job environment, then
    ``fn(*args)``, which finds them and joins the job. One node: the rendezvous is on 127.0.0.1."""
    import submitit

    job = submitit.JobEnvironment()
    addr = "127.0.0.1" if job.num_nodes == 1 else job.hostnames[0]
    LaunchEnv(job.global_rank, job.num_tasks, job.local_rank, addr, _port_of(job.job_id), "slurm").export()
    return fn(*args)
