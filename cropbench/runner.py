"""Run one benchmark entry: resolve its recipe, pretrain, evaluate, write records.

Every process of the launch (one; ``--nproc N`` spawned; or torchrun / srun / Slurm, joined) runs:

recipe  = entry.recipe(variant, scale, overrides)     # validated, frozen
preflight(spec, entry, ...)                            # every check that can fail, before training
method  = METHODS[recipe.method](Config(recipe.params), backbone, ctx)
result  = Trainer(method, dataset, recipe, ctx).fit()  # data-parallel over ctx = DistContext(rank, world)
metrics = EVALUATIONS[name].evaluate(encoder, Settings(recipe.eval[name]), EvalData(dist=ctx))
write_record(out, Record(...))                         # rank 0 only, as checkpoints and run locks
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cropbench.backbones import build_backbone
from cropbench.config import deep_merge, from_dict, to_dict
from cropbench.data import (
    build_dataset,
    check_dataset_kwargs,
    dataset_folder,
    dataset_num_classes,
    default_data_root,
    validate_dataset,
)
from cropbench.dist import (
    DistContext,
    any_rank,
    barrier,
    broadcast_module,
    gather_floats,
    join_process_group,
    params_checksum,
    shutdown,
)
from cropbench.errors import ConfigError, CropbenchError, TrainingError
from cropbench.evaluations.base import EvalData
from cropbench.launch import LaunchEnv, free_port, launch_env, refuse_nproc
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.recipe import RUNTIME_ONLY, Entry, Recipe, flatten, load_entry
from cropbench.registry import DATASETS, EVALUATIONS, METHODS
from cropbench.trainer import CHECKPOINT, Trainer, TrainResult, read_checkpoint
from cropbench.views.generators import VIEW_GENERATORS, ViewGenerator, build_views

REPO_ROOT = Path(__file__).resolve().parent.parent
RANDOM_INIT = "+random_init"


@dataclass(frozen=True)
class RunSpec:
    entry: str
    variant: str = "default"
    scale: str = "micro"
    evals: tuple[str, ...] = ()  # empty: the entry's own list
    seeds: tuple[int, ...] = (0,)
    data_root: Path | None = None
    device: str = "auto"
    nproc: int = 1
    resume: bool = False  # continue from the run folder's checkpoint; without one, start over (said)
    out: Path = REPO_ROOT / "results" / "records"
    work_dir: Path = Path("runs")
    overrides: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False  # also evaluate the same encoder at its initialisation
    quiet: bool = False
    resume_strict: bool = False  # with resume: a missing checkpoint is an error, not a fresh start
    command: str | None = None  # the command line records carry (None: this process's sys.argv)
    # pretrain only the first N epochs of the recipe's schedule and write a ``trace`` record (no
    # evaluations): the loss a whole run has there, as CI checks most golden jobs
    trace_epochs: int | None = None


TRACE = "trace"  # the evaluation name of a ``--trace-epochs`` record


@dataclass(frozen=True)
class TraceSettings:
    """The "protocol" of a trace record: which prefix of which schedule it traced."""

    epochs: int  # epochs traced, from the first
    schedule_epochs: int  # the recipe's train.epochs (the lr and momentum schedules' length)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CropbenchError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise CropbenchError(f"--device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def seeded_recipe(entry: Entry, spec: RunSpec, seed: int) -> Recipe:
    return entry.recipe(spec.variant, spec.scale, deep_merge(spec.overrides, {"train": {"seed": seed}}))


def views_spec(recipe: Recipe, where: str = "") -> dict[str, Any]:
    """``params.views`` with its generator's name (``{generator: NAME, ...}``): every entry names
    one; a recipe that names none (a test's or an override's short ``views: {size: 16}``) gets the
    method's ``default_views``, the generator its entries name."""
    views = recipe.params.get("views", {})
    if not isinstance(views, dict):
        raise ConfigError(f"{where}: params.views: expected a mapping (a view generator's settings), got {views!r}")
    return views if "generator" in views else {"generator": METHODS.get(recipe.method).default_views, **views}


def build_generator(
    method: str, views: dict[str, Any] | None = None, stride: int | None = None, where: str = ""
) -> ViewGenerator:
    """The view generator ``params.views`` gives ``method`` (its ``default_views`` when the mapping
    names none); ``stride``: the backbone's output stride (region boxes lie on its grid)."""
    views = views or {}
    spec = views if "generator" in views else {"generator": METHODS.get(method).default_views, **views}
    return build_views(spec, stride, where)


def method_config(recipe: Recipe, where: str = "") -> Any:
    """The method's ``Config`` validated from ``recipe.params`` (defaults filled in); ``params.views``
    belongs to the view generator (``build_views``), not to the method."""
    params = {k: v for k, v in recipe.params.items() if k != "views"}
    return from_dict(METHODS.get(recipe.method).Config, params, where, "params")


def generator_config(recipe: Recipe, where: str = "") -> Any:
    """The recipe's view generator's validated ``Config`` (``params.views`` less its name)."""
    spec = views_spec(recipe, where)
    gen = VIEW_GENERATORS.get(spec["generator"])
    return from_dict(gen.Config, {k: v for k, v in spec.items() if k != "generator"}, where, "params.views")


def resolved_config(recipe: Recipe, where: str = "") -> Any:
    """What records carry as ``provenance.config``: the method's Config, and ``views`` = its view
    generator's validated Config, with the generator's name."""
    name = views_spec(recipe, where)["generator"]
    gen_cfg = generator_config(recipe, where)
    return {**to_dict(method_config(recipe, where)), "views": {"generator": name, **to_dict(gen_cfg)}}


def build_method(recipe: Recipe, ctx: MethodContext, where: str = "") -> SSLMethod:
    """Method class from the registry, its Config validated from ``recipe.params``, its view
    generator from ``params.views``; a setting either rejects is a ``ConfigError`` naming the recipe."""
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    try:
        backbone = build_backbone(recipe.backbone, **recipe.backbone_args)
        return method_from_params(recipe.method, recipe.params, backbone, ctx, where)
    except ConfigError as e:  # an unknown backbone_args key: say which recipe holds it
        if where and not str(e).startswith(where):
            raise ConfigError(f"{where}: {e}") from e
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {recipe.method} on {recipe.backbone} rejects these settings: {e}") from e


def method_from_params(
    method: str, params: dict[str, Any], backbone: torch.nn.Module, ctx: MethodContext, where: str = ""
) -> SSLMethod:
    """``method`` on ``backbone`` from a recipe's ``params`` (``views``: its view generator's).

    The generator is built before the method (the method may read it: VideoMoCo's frame count,
    BraVe's broad views) but draws its learned weights after the method's (``reset_parameters``),
    the initialisation order the goldens pin."""
    cls = METHODS.get(method)
    cfg = from_dict(cls.Config, {k: v for k, v in params.items() if k != "views"}, where, "params")
    stride = getattr(backbone, "output_stride", None)
    with torch.random.fork_rng(devices=[]):
        views = build_generator(method, params.get("views"), stride, where)
    model = cls(cfg, backbone, ctx, views)
    views.reset_parameters()
    _check_stride(views, backbone, where)
    return model


def _check_stride(views: ViewGenerator, backbone: torch.nn.Module, where: str) -> None:
    """Region swapping (RegionCL) cuts boxes on the backbone's output grid: the view side must be
    a multiple of its output stride (RegionCL ``cutMix`` boxes are multiples of 32 px)."""
    stride, size = getattr(backbone, "output_stride", None), views.grid_size
    if isinstance(stride, int) and isinstance(size, int) and size % stride:
        raise ConfigError(
            f"{where}: params.views.views.size: {size} is not a multiple of the backbone's output stride "
            f"{stride}; region boxes lie on that grid (e.g. {max(stride, size - size % stride)})"
        )


def train_set_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The keywords the training set's builder receives (preflight checks them)."""
    return {"image_size": recipe.data.image_size}


def build_train_set(recipe: Recipe, data_root: Path | None) -> Any:
    ds = build_dataset(recipe.data.dataset, recipe.data.train_split, data_root, **train_set_kwargs(recipe))
    if recipe.data.limit is not None:
        ds = _Limited(ds, range(min(recipe.data.limit, len(ds))))
    return ds


class _Limited(torch.utils.data.Subset):
    """The first N samples of a dataset (``data.limit``), keeping its ``collate``."""

    def __getattr__(self, name: str) -> Any:
        if name in ("collate", "set_epoch", "num_classes", "classes"):
            return getattr(self.dataset, name)
        raise AttributeError(name)


def method_context(recipe: Recipe, n_train: int, dist_ctx: DistContext) -> MethodContext:
    """The method's view of the run. The one place the schedule length is computed: steps per
    epoch = ``n_train // train.batch_size`` (capped by ``train.max_steps_per_epoch``); the trainer's
    lr schedule and the method's own schedules (BYOL momentum, VideoMoCo adversarial start) read it
    from here (``prepare_dataset`` keeps the sample count, the trainer checks)."""
    tc = recipe.train
    spe = n_train // tc.batch_size
    if tc.max_steps_per_epoch:
        spe = min(spe, tc.max_steps_per_epoch)
    return MethodContext(
        dist_ctx, max(1, spe), tc.epochs, tc.batch_size // dist_ctx.world_size, recipe.data.num_workers
    )


def pretrain_local(
    recipe: Recipe,
    run_dir: Path,
    data_root: Path | None,
    device: torch.device,
    dist_ctx: DistContext,
    resume: bool,
    quiet: bool,
    where: str,
    on_init: Callable[[SSLMethod], None] | None = None,
    stop_after: int | None = None,
) -> tuple[SSLMethod, TrainResult]:
    dataset = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(dataset), dist_ctx), where)
    if on_init is not None:
        on_init(method)
    trainer = Trainer(method, dataset, recipe, run_dir, device, dist_ctx, quiet)
    return trainer.method, trainer.fit(resume=resume, stop_after=stop_after)


def _ddp_worker(
    recipe: Recipe, run_dir: Path, data_root: Path | None, device_name: str, resume: bool, where: str
) -> dict[str, float]:
    """One process of ``pretrain_distributed`` (launched by torchrun's launcher API)."""

    def job(ctx: DistContext, device: torch.device) -> dict[str, float]:
        method, result = pretrain_local(recipe, run_dir, data_root, device, ctx, resume, True, where)
        check_in_sync(method, ctx, device)  # every rank raises if the ranks' weights differ
        return result.summary()

    return joined(_require_env(), device_name, job)


def launch_all(nproc: int, worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Run ``worker(*args)`` on ``nproc`` local processes through torchrun's launcher API; every
    rank's return value, by rank. Each worker finds RANK, WORLD_SIZE, ... in its environment."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        start_method="spawn",
    )
    return elastic_launch(cfg, worker)(*args)


def command_line() -> str:
    """This process's command line, as records carry it (``python -m cropbench ...`` as typed)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "cropbench":
        argv[0] = "python -m cropbench"
    return " ".join(argv)


def _require_env() -> LaunchEnv:
    env = launch_env()
    if env is None:
        raise CropbenchError("a distributed worker was started without RANK / WORLD_SIZE in its environment")
    return env


def joined(env: LaunchEnv, device_name: str, job: Callable[[DistContext, torch.device], Any]) -> Any:
    """Join the launch ``env`` describes (env://; NCCL on CUDA with LOCAL_RANK's device, gloo on
    CPU), run ``job(ctx, device)`` in it, and leave the process group cleanly."""
    env.export()
    ctx, device = join_process_group(env.rank, env.world_size, env.local_rank, resolve_device(device_name))
    try:
        out = job(ctx, device)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    shutdown(ctx)  # barrier, then destroy (see cropbench.dist.shutdown)
    return out


def together(ctx: DistContext, device: torch.device, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every process; when it fails on any of them, every process raises (the failing
    ones their own error), so no rank is left waiting in a collective for one that has exited."""
    try:
        out, err = fn(), None
    except Exception as e:
        out, err = None, e
    if any_rank(err is not None, ctx, device) and err is None:
        raise CropbenchError(f"another process of this launch failed (rank {ctx.rank} of {ctx.world_size} stops)")
    if err is not None:
        raise err
    return out


def check_in_sync(method: torch.nn.Module, ctx: DistContext, device: torch.device) -> None:
    """Data-parallel ranks end with the same parameters (their sums, compared in float64)."""
    sums = gather_floats(params_checksum(method), ctx, device)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise TrainingError(f"data-parallel ranks ended with different weights (parameter sums {sums})")


def pretrain_distributed(
    recipe: Recipe, run_dir: Path, data_root: Path | None, device: torch.device, nproc: int, resume: bool, where: str
) -> TrainResult:
    """Data-parallel pretraining alone on ``nproc`` local processes (torchrun's launcher API)."""
    s = launch_all(nproc, _ddp_worker, recipe, run_dir, data_root, device.type, resume, where)[0]
    return TrainResult(
        s["loss_first"],
        s["loss_last"],
        int(s["epochs"]),
        int(s["steps"]),
        s["images_per_s"],
        s["wall_s"],
        run_dir / "checkpoint.pt",
        {k: v for k, v in s.items() if k.startswith("loss_") and k not in ("loss_first", "loss_last")},
    )


def load_encoder(checkpoint: Path, device: torch.device) -> torch.nn.Module:
    """The encoder of a cropbench checkpoint, read with ``weights_only=True`` (never runs code)."""
    blob = read_checkpoint(checkpoint)
    enc = build_backbone(blob["backbone"], **blob["backbone_args"])
    enc.load_state_dict(blob["encoder"])
    return enc.to(device)


def eval_settings(name: str, recipe: Recipe, modality: str, where: str) -> Any:
    """The evaluation's ``Settings`` validated from ``recipe.eval[name]``."""
    ev = EVALUATIONS.get(name)
    if ev.modality != modality:
        raise ConfigError(f"evaluation {name!r} is for {ev.modality} encoders; this entry's encoder is {modality}")
    return from_dict(ev.Settings, recipe.eval.get(name, {}), where, f"eval.{name}")


def evaluate(
    encoder: torch.nn.Module, name: str, recipe: Recipe, modality: str, data: EvalData, where: str
) -> dict[str, float]:
    return EVALUATIONS.get(name).evaluate(encoder, eval_settings(name, recipe, modality, where), data)


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def _pretrain_seed(
    spec: RunSpec,
    recipe: Recipe,
    run_dir: Path,
    data_root: Path,
    device: torch.device,
    where: str,
    ctx: DistContext,
) -> tuple[torch.nn.Module, dict[str, Any] | None, TrainResult]:
    """Pretrain one seed on this process (one of ``ctx.world_size``); returns (encoder, its initial
    state or None, TrainResult). With several processes the encoder is rank 0's on every process:
    the checkpoint's weights, BatchNorm statistics included (per process on CPU)."""
    init_state: dict[str, Any] = {}

    def keep(m: SSLMethod) -> None:  # the same seed builds the same initial weights on every rank
        init_state.update(copy.deepcopy(m.encoder.state_dict()))

    on_init = keep if spec.random_init else None
    quiet = spec.quiet or not ctx.is_main
    method, result = pretrain_local(
        recipe, run_dir, data_root, device, ctx, spec.resume, quiet, where, on_init, spec.trace_epochs
    )
    encoder = method.encoder
    if ctx.enabled:
        check_in_sync(method, ctx, device)
        encoder = build_backbone(recipe.backbone, **recipe.backbone_args)  # plain BN, as the checkpoint loads
        encoder.load_state_dict(method.encoder.state_dict())
        encoder = encoder.to(device)
        broadcast_module(encoder, ctx)
    return encoder, (init_state if spec.random_init else None), result


def _check_evals(entry: Entry, evals: tuple[str, ...]) -> None:
    for name in evals:
        if name not in entry.evaluations:
            supported = ", ".join(entry.evaluations)
            raise ConfigError(f"entry {entry.name!r} does not support evaluation {name!r}; it supports: {supported}")
        EVALUATIONS.get(name)


# ---------------------------------------------------------------- preflight
def eval_splits(settings: Any) -> list[str]:
    """The dataset splits an evaluation reads: its ``*_split`` fields, or ``train<N>``/``test<N>``
    for the official video splits (``split: all`` = 1, 2 and 3)."""
    splits = [v for k, v in vars(settings).items() if k.endswith("_split") and isinstance(v, str)]
    fold = getattr(settings, "split", None)
    if isinstance(fold, str):
        folds = ["1", "2", "3"] if fold == "all" else [fold]
        splits += [f"{part}{f}" for f in folds for part in ("train", "test")]
    return list(dict.fromkeys(splits))


def check_eval_data(settings: Any, data_root: Path, scale: str = "micro", field: str = "") -> None:
    """Each split the evaluation will read exists and is well formed, and is real data at small /
    paper scale (``cropbench.data.validate_dataset``: checks only, writes nothing)."""
    validate_dataset(settings.dataset, data_root, tuple(eval_splits(settings)), scale, field)


def check_writable(path: Path, option: str) -> None:
    """``path`` is a folder, or can be made one, that we may write in (nothing is created)."""
    full = Path(path).absolute()
    for parent in (full, *full.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise CropbenchError(f"{option} {path}: {parent} is a file, not a folder; choose another {option}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CropbenchError(f"{option} {path}: {parent} is not writable; choose another {option}")
        return


def check_resume(spec: RunSpec, recipe: Recipe, run_dir: Path, log: Callable[[str], None]) -> None:
    """With ``--resume``: the checkpoint is readable and of this pretraining recipe; a missing one
    is said (with ``--resume=strict``, an error)."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        if spec.resume_strict:
            raise CropbenchError(f"--resume=strict: no checkpoint at {path}; run without --resume to start")
        log(f"--resume: no checkpoint at {path}, starting from scratch")
        return
    found = read_checkpoint(path).get("recipe_hash")
    if found != recipe.pretrain_hash():
        raise CropbenchError(
            f"--resume: {path} was written by a different recipe (pretraining hash {found} != "
            f"{recipe.pretrain_hash()}); start without --resume or use another --work-dir"
        )


@dataclass(frozen=True)
class SeedPlan:
    seed: int
    recipe: Recipe
    run_dir: Path


def run_folder(spec: RunSpec, entry: str, seed: int) -> Path:
    """``<work-dir>/<scale>/<entry>/<variant>/seed<N>``; a trace's is ``seed<N>-trace<K>`` (its
    checkpoint stops at epoch K and must never pass for a whole run's)."""
    trace = f"-trace{spec.trace_epochs}" if spec.trace_epochs else ""
    return Path(spec.work_dir) / spec.scale / entry / spec.variant / f"seed{seed}{trace}"


def check_trace(spec: RunSpec, evals: tuple[str, ...], recipe: Recipe) -> None:
    """``--trace-epochs K`` pretrains a prefix and evaluates nothing: no evaluations, no random
    init, and K within the recipe's schedule."""
    k = spec.trace_epochs
    if k is None:
        return
    if k < 1:
        raise ConfigError(f"--trace-epochs {k}: expected a whole number of epochs >= 1")
    if evals or spec.random_init:
        what = "--random-init" if spec.random_init else f"--eval {evals[0]}"
        raise ConfigError(f"--trace-epochs {k} pretrains a prefix of the schedule and evaluates nothing; drop {what}")
    if k > recipe.train.epochs:
        raise ConfigError(
            f"--trace-epochs {k}: the recipe trains {recipe.train.epochs} epochs (train.epochs); "
            f"trace at most {recipe.train.epochs}"
        )


def preflight(
    spec: RunSpec, entry: Entry, evals: tuple[str, ...], data_root: Path, log: Callable[[str], None]
) -> list[SeedPlan]:
    """Everything that can be checked before the first training step: recipes (ranges, method
    settings, view size vs stride, a classifier's size against the training classes), every
    evaluation's settings and dataset splits, the output and work folders, and the checkpoints
    ``--resume`` would read. Writes nothing."""
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    plans = [SeedPlan(s, seeded_recipe(entry, spec, s), run_folder(spec, entry.name, s)) for s in spec.seeds]
    check_writable(spec.out, "--out")
    check_writable(spec.work_dir, "--work-dir")
    recipe = plans[0].recipe
    check_trace(spec, evals, recipe)
    settings = {name: eval_settings(name, recipe, entry.modality, where) for name in evals}
    method = build_method(recipe, method_context(recipe, 10**9, DistContext()), where)
    check_dataset_kwargs(recipe.data.dataset, train_set_kwargs(recipe), "data.dataset")
    validate_dataset(recipe.data.dataset, data_root, recipe.data.train_split, spec.scale, "data.dataset")
    check_num_classes(method, recipe, data_root, where)
    for name, s in settings.items():
        check_eval_data(s, data_root, spec.scale, f"eval.{name}.dataset")
    if spec.resume:
        for plan in plans:
            check_resume(spec, plan.recipe, plan.run_dir, log)
    return plans


def check_num_classes(method: SSLMethod, recipe: Recipe, data_root: Path, where: str) -> None:
    """A method with a classifier (``params.num_classes``) must have as many outputs as its
    training split has classes: fewer would fail at the first batch holding a larger label, more
    would train silently with classes that never occur."""
    want = getattr(method.cfg, "num_classes", None)
    if want is None:
        return
    have = dataset_num_classes(recipe.data.dataset, data_root, recipe.data.train_split)
    if have is not None and have != want:
        raise ConfigError(
            f"{where}: params.num_classes is {want}, but {recipe.data.dataset!r} split "
            f"{recipe.data.train_split!r} (data.dataset) has {have} classes; set params.num_classes: {have}"
        )


LOCK = "run.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<run_dir>/run.lock`` while a run uses the folder. The kernel
    drops it when the process ends, so a lock file left by a dead process never blocks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CropbenchError(
                f"{run_dir} is in use by another cropbench run ({holder}); wait for it to finish, "
                "or give this run another --work-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def overrides_of(entry: Entry, spec: RunSpec, recipe: Recipe) -> dict[str, Any]:
    """The ``--set`` (and ``--split``) keys that change the resolved recipe: key path -> value.
    Records carry them; tables mark such records and ``check`` keeps them from paper references.
    Speed-only settings (``RUNTIME_ONLY``: train.compile, data.prefetch_factor) do not count."""
    base = flatten(entry.recipe(spec.variant, spec.scale, {"train": {"seed": recipe.train.seed}}).to_dict())
    resolved = flatten(recipe.to_dict())
    speed = {f"{section}.{key}" for section, key in RUNTIME_ONLY}
    keys = sorted(set(flatten(spec.overrides)) - speed)
    return {k: resolved.get(k) for k in keys if base.get(k) != resolved.get(k)}


def resolve_data_root(spec: RunSpec) -> Path:
    """``--data-root``, else ``$CROPBENCH_DATA``, else (micro only) the embedded-data cache."""
    if spec.data_root:
        return Path(spec.data_root)
    if spec.scale == "micro" or os.environ.get("CROPBENCH_DATA"):
        return default_data_root()
    raise CropbenchError(f"--scale {spec.scale} reads real datasets: pass --data-root PATH or set CROPBENCH_DATA")


def run(spec: RunSpec) -> list[Any] | None:
    """Pretrain + evaluate every seed of one entry/variant; returns the records written (None on
    a process other than rank 0 of a distributed launch: it writes nothing).

    One job, run by every process of the launch: one process; ``--nproc N`` spawned here; or the
    processes of a launch this one joins (torchrun, srun, a submitted Slurm job: ``RANK`` /
    ``WORLD_SIZE`` or an srun step in the environment). Everything checkable is checked first
    (``preflight``, on every process); rank 0 locks every seed's run folder (a second run of the
    same folders is refused) and writes checkpoints and records, each seed's as soon as they exist."""
    env = launch_env()
    refuse_nproc(spec.nproc, env)
    if env is not None:
        return joined(env, spec.device, lambda ctx, device: _run_job(spec, ctx, device, lock=True))
    if spec.nproc > 1:
        return _spawn_run(spec)
    return _run_job(spec, DistContext(), resolve_device(spec.device), lock=True)


def preflight_run(spec: RunSpec) -> tuple[tuple[str, ...], list[SeedPlan]]:
    """``preflight`` for a launcher process that runs nothing itself (``--nproc``'s parent, a
    Slurm submission): the evaluations and seed plans, checked; says nothing (the job will)."""
    entry = load_entry(spec.entry)
    evals = run_evals(spec, entry)
    _check_evals(entry, evals)
    resolve_device(spec.device)
    return evals, preflight(spec, entry, evals, resolve_data_root(spec), _log(True))


def run_evals(spec: RunSpec, entry: Entry) -> tuple[str, ...]:
    """The evaluations a run makes: ``--eval``, else the entry's own list; for a trace only the
    given ones (``check_trace`` refuses any)."""
    return spec.evals if spec.trace_epochs or spec.evals else tuple(entry.evaluations)


def _spawn_run(spec: RunSpec) -> list[Any]:
    """``--nproc N``: check and lock here, then the whole job on N spawned processes; rank 0's records."""
    _, plans = preflight_run(spec)
    with contextlib.ExitStack() as locks:
        for plan in plans:
            locks.enter_context(run_lock(plan.run_dir))
        command = spec.command or command_line()
        return launch_all(spec.nproc, _run_worker, replace(spec, command=command))[0]


def _run_worker(spec: RunSpec) -> list[Any] | None:
    """One ``--nproc`` process: joins the spawned launch and runs the whole job (the parent holds the locks)."""
    return joined(_require_env(), spec.device, lambda ctx, device: _run_job(spec, ctx, device, lock=False))


def _run_job(spec: RunSpec, ctx: DistContext, device: torch.device, lock: bool) -> list[Any] | None:
    """The job every process of the launch runs: preflight, then each seed's pretraining and
    evaluations with ``ctx``. Rank 0 alone locks, logs and writes; it returns the records."""
    entry = load_entry(spec.entry)
    evals = run_evals(spec, entry)
    log = _log(spec.quiet or not ctx.is_main)
    data_root = resolve_data_root(spec)

    def check() -> list[SeedPlan]:
        _check_evals(entry, evals)
        return preflight(spec, entry, evals, data_root, log)

    plans = together(ctx, device, check)
    with contextlib.ExitStack() as locks:
        mine = lock and ctx.is_main  # with --nproc the spawning parent holds the locks
        together(ctx, device, lambda: [locks.enter_context(run_lock(p.run_dir)) for p in plans if mine])
        datasets = [plans[0].recipe.data.dataset, *_eval_datasets(entry, evals, plans[0].recipe)]
        materialise(datasets, data_root, spec.scale, ctx, device)
        records = [rec for plan in plans for rec in _run_seed(spec, entry, evals, plan, data_root, device, log, ctx)]
    return records if ctx.is_main else None


def _eval_datasets(entry: Entry, evals: tuple[str, ...], recipe: Recipe) -> list[str]:
    """The datasets the evaluations read (their settings are valid: preflight checked them)."""
    where = f"{entry.path} ({recipe.data.dataset})"
    return [eval_settings(name, recipe, entry.modality, where).dataset for name in evals]


def materialise(names: list[str], data_root: Path, scale: str, ctx: DistContext, device: torch.device) -> None:
    """Rank 0 generates the embedded synthetic datasets the job reads (atomically), the others wait
    for it: on a shared file system they then find them complete instead of generating them again."""

    def make() -> None:
        if ctx.is_main:
            for name in dict.fromkeys(names):
                if DATASETS.get(name).synthetic:
                    dataset_folder(name, data_root, scale)

    together(ctx, device, make)
    barrier(ctx)


def _run_seed(
    spec: RunSpec,
    entry: Entry,
    evals: tuple[str, ...],
    plan: SeedPlan,
    data_root: Path,
    device: torch.device,
    log: Callable[[str], None],
    ctx: DistContext,
) -> list[Any]:
    """Pretrain one seed, evaluate it (and its random init) on every process of the launch; rank 0
    writes one record per evaluation (the others return no records)."""
    seed, recipe, run_dir = plan.seed, plan.recipe, plan.run_dir
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    tag = f"[{entry.name}/{spec.variant} seed {seed}]"
    procs = f", {ctx.world_size} processes" if ctx.enabled else ""
    trace = f"the first {spec.trace_epochs} of " if spec.trace_epochs else ""
    log(
        f"{tag} pretraining {recipe.method} on {recipe.data.dataset} ({trace}{recipe.train.epochs} epochs, "
        f"batch {recipe.train.batch_size}, {device}{procs}) -> {run_dir}"
    )
    t0 = time.perf_counter()
    encoder, init_state, result = _pretrain_seed(spec, recipe, run_dir, data_root, device, where, ctx)
    log(
        f"{tag} pretrained in {time.perf_counter() - t0:.1f}s: loss {result.loss_first:.4f} -> "
        f"{result.loss_last:.4f}, {result.images_per_s:.0f} img/s"
    )
    if spec.trace_epochs:
        return _write_trace(spec, entry, plan, result, device, ctx, lambda m: log(f"{tag} {m}"))
    cache = Path(spec.work_dir) / "cache"
    data = EvalData(data_root, device, cache, seed, recipe.data.num_workers, spec.scale, ctx, log)
    encoders = [(spec.variant, encoder, result.summary())]
    if init_state is not None:
        rand = copy.deepcopy(encoder)
        rand.load_state_dict(init_state)
        encoders.append((spec.variant + RANDOM_INIT, rand, {}))  # a random-init encoder had no pretraining
    records = []
    for name in evals:
        settings = eval_settings(name, recipe, entry.modality, where)
        for variant, enc, pre in encoders:
            t1 = time.perf_counter()
            metrics = {k: float(v) for k, v in EVALUATIONS.get(name).evaluate(enc, settings, data).items()}
            wall = time.perf_counter() - t1
            if ctx.is_main:
                rec, path = _write_run_record(
                    spec, entry, plan, name, settings, variant, metrics, pre, wall, device, ctx
                )
                records.append(rec)
                shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
                log(f"[{entry.name}/{variant} seed {seed}] {name}: {shown} ({wall:.1f}s) -> {path}")
    return records


def _write_trace(
    spec: RunSpec,
    entry: Entry,
    plan: SeedPlan,
    result: TrainResult,
    device: torch.device,
    ctx: DistContext,
    log: Callable[[str], None],
) -> list[Any]:
    """The ``trace`` record of ``--trace-epochs K``: metric ``loss``, the mean step loss of epoch K
    (what a whole run's metrics.jsonl holds there: same steps, lr and schedules), with ``loss_first``
    and the steps traced in ``pretrain``."""
    if not ctx.is_main:
        return []
    settings = TraceSettings(result.epochs, plan.recipe.train.epochs)
    metrics = {"loss": result.epoch_losses[-1]}
    pre = result.summary()
    rec, path = _write_run_record(spec, entry, plan, TRACE, settings, spec.variant, metrics, pre, 0.0, device, ctx)
    log(f"trace: epoch {result.epochs} of {settings.schedule_epochs}, loss {metrics['loss']:.6f} -> {path}")
    return [rec]


def _write_run_record(
    spec: RunSpec,
    entry: Entry,
    plan: SeedPlan,
    name: str,
    settings: Any,
    variant: str,
    metrics: dict[str, float],
    pretrain: dict[str, float],
    wall: float,
    device: torch.device,
    ctx: DistContext,
) -> tuple[Any, Path]:
    """One record of ``run`` (rank 0's metrics), written atomically; (record, its path)."""
    from cropbench.records import Record, collect_provenance, protocol_provenance, write_record

    recipe = plan.recipe
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    prov = {
        **collect_provenance(recipe.to_dict(), str(device), spec.command or command_line()),
        "overrides": overrides_of(entry, spec, recipe),
        "world_size": ctx.world_size,
        **protocol_provenance(name, settings, resolved_config(recipe, where)),
    }
    rec = Record(entry.name, variant, spec.scale, name, plan.seed, metrics, pretrain, wall, prov)
    return rec, write_record(Path(spec.out), rec)


# ---------------------------------------------------------------- cropbench eval
@dataclass(frozen=True)
class EvalSpec:
    """``cropbench eval WEIGHTS``: evaluate a checkpoint (ours or a paper's release) without pretraining."""

    weights: Path
    entry: str
    variant: str = "default"
    scale: str = "micro"
    evals: tuple[str, ...] = ()  # empty: the entry's own list
    seed: int | None = None  # None: a cropbench checkpoint's own seed, else 0
    data_root: Path | None = None
    device: str = "auto"
    nproc: int = 1
    format: str = "auto"
    out: Path = REPO_ROOT / "results" / "records"
    work_dir: Path = Path("runs")  # feature caches
    overrides: dict[str, Any] = field(default_factory=dict)  # eval.<name>.<key> only
    quiet: bool = False
    command: str | None = None  # the command line records carry (None: this process's sys.argv)


@dataclass(frozen=True)
class EvalPlan:
    recipe: Recipe
    seed: int
    encoder: torch.nn.Module
    weights: dict[str, Any]  # Provenance.to_dict()
    external: bool  # not a cropbench checkpoint
    overrides: dict[str, Any]
    settings: dict[str, Any]  # eval name -> validated Settings
    variant: str
    scale: str
    out: Path


def check_eval_overrides(overrides: dict[str, Any]) -> None:
    """``cropbench eval`` takes only ``eval.<name>.<key>`` overrides: the weights are trained."""
    for key in sorted(flatten(overrides)):
        if not key.startswith("eval."):
            raise ConfigError(
                f"--set {key}: cropbench eval evaluates trained weights, so only evaluation settings "
                "can be set (eval.<name>.<key>=VALUE, e.g. eval.knn.k=20)"
            )


def load_weights(spec: EvalSpec, recipe: Recipe) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The encoder with the file's weights (strict; never runs code), its provenance, and the
    embedded recipe when the file is a cropbench checkpoint (else None)."""
    from cropbench.weights import format_names, load_external_encoder

    if spec.format != "auto" and spec.format not in format_names():
        raise ConfigError(f"--format {spec.format!r}: expected auto or one of {', '.join(format_names())}")
    if not Path(spec.weights).is_file():
        raise CropbenchError(f"WEIGHTS {spec.weights}: no such file")
    encoder, prov = load_external_encoder(spec.weights, recipe.backbone, recipe.backbone_args, spec.format)
    ours = read_checkpoint(Path(spec.weights)).get("recipe") if prov.format == "cropbench" else None
    return encoder, prov.to_dict(), ours if isinstance(ours, dict) else None


def checkpoint_overrides(trained: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Pretraining keys where a cropbench checkpoint's recipe departs from the entry's (key path ->
    the checkpoint's value): such a record is *modified*, as a ``run --set`` record is."""
    skip = ("eval", "deviations")
    mine = flatten({k: v for k, v in recipe.to_dict().items() if k not in skip})
    theirs = flatten({k: v for k, v in trained.items() if k not in skip})
    keys = sorted((set(mine) | set(theirs)) - {"train.seed"})
    return {k: theirs.get(k) for k in keys if mine.get(k) != theirs.get(k)}


def trained_recipe(trained: dict[str, Any], recipe: Recipe, where: str) -> Recipe:
    """The recipe a cropbench checkpoint was trained with, with the entry's (resolved) evaluation
    settings and deviations: the record of ``eval`` then matches the one ``run`` writes. A
    checkpoint whose recipe no longer validates (an older cropbench) keeps the entry's recipe; its
    differences are in the record's overrides either way."""
    own = {k: v for k, v in trained.items() if k not in ("eval", "deviations")}
    try:
        return from_dict(Recipe, {**own, "eval": recipe.to_dict()["eval"], "deviations": recipe.deviations}, where)
    except ConfigError:
        return recipe


def check_replaceable(spec: EvalSpec, entry: Entry, evals: tuple[str, ...], seed: int, sha: str) -> None:
    """Never replace a record of other weights (a ``run`` record, another file): use another --out."""
    from cropbench.records import Record, read_record, record_path

    for name in evals:
        path = record_path(Path(spec.out), Record(entry.name, spec.variant, spec.scale, name, seed, {}, {}, 0.0, {}))
        if path.exists() and read_record(path).weights.get("sha256") != sha:
            raise CropbenchError(
                f"--out {spec.out}: {path} holds a record of other weights (a cropbench run or another "
                "file); cropbench eval would replace it: choose another --out"
            )


def preflight_eval(spec: EvalSpec, entry: Entry, evals: tuple[str, ...], data_root: Path) -> EvalPlan:
    """``preflight`` for ``cropbench eval``: overrides, every evaluation's settings and datasets,
    the output folders, and the weights themselves (read and mapped strictly) before any evaluation."""
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    check_eval_overrides(spec.overrides)
    check_writable(spec.out, "--out")
    check_writable(spec.work_dir, "--work-dir")
    recipe = entry.recipe(spec.variant, spec.scale, spec.overrides)
    settings = {name: eval_settings(name, recipe, entry.modality, where) for name in evals}
    for name, s in settings.items():
        check_eval_data(s, data_root, spec.scale, f"eval.{name}.dataset")
    encoder, weights, trained = load_weights(spec, recipe)
    seed = spec.seed if spec.seed is not None else int((trained or {}).get("train", {}).get("seed", 0))
    recipe = entry.recipe(spec.variant, spec.scale, deep_merge(spec.overrides, {"train": {"seed": seed}}))
    base = flatten(entry.recipe(spec.variant, spec.scale, {"train": {"seed": seed}}).to_dict())
    resolved = flatten(recipe.to_dict())
    overrides = {k: resolved.get(k) for k in flatten(spec.overrides) if base.get(k) != resolved.get(k)}
    if trained is not None:
        overrides.update(checkpoint_overrides(trained, recipe))
        recipe = trained_recipe(trained, recipe, where)
    check_replaceable(spec, entry, evals, seed, weights["sha256"])
    overrides = dict(sorted(overrides.items()))
    return EvalPlan(
        recipe, seed, encoder, weights, trained is None, overrides, settings, spec.variant, spec.scale, Path(spec.out)
    )


def evaluate_weights(spec: EvalSpec) -> list[Any] | None:
    """Evaluate WEIGHTS under an entry's evaluation protocols; one record per evaluation, written
    as soon as it exists to the same layout as ``run``'s, carrying the weights' provenance and the
    resolved protocol. Every process of the launch (one, ``--nproc N``, or a torchrun / srun /
    Slurm launch it joins) loads the weights and evaluates with ``data.dist`` set; rank 0 writes
    the records and returns them (the other processes return None)."""
    env = launch_env()
    refuse_nproc(spec.nproc, env)
    if env is not None:
        return joined(env, spec.device, lambda ctx, device: _eval_job(spec, ctx, device))
    if spec.nproc > 1:  # check here first, then every process checks and evaluates
        preflight_eval_spec(spec)
        command = spec.command or command_line()
        return launch_all(spec.nproc, _eval_worker, replace(spec, command=command))[0]
    return _eval_job(spec, DistContext(), resolve_device(spec.device))


def preflight_eval_spec(spec: EvalSpec) -> tuple[EvalPlan, Path]:
    """``preflight_eval`` for a launcher process that evaluates nothing itself: (plan, data root)."""
    entry = load_entry(spec.entry)
    evals = spec.evals or entry.evaluations
    _check_evals(entry, evals)
    resolve_device(spec.device)
    data_root = resolve_data_root(RunSpec(spec.entry, scale=spec.scale, data_root=spec.data_root))
    return preflight_eval(spec, entry, evals, data_root), data_root


def _eval_worker(spec: EvalSpec) -> list[Any] | None:
    """One ``cropbench eval --nproc`` process: joins the spawned launch and runs the whole job."""
    return joined(_require_env(), spec.device, lambda ctx, device: _eval_job(spec, ctx, device))


def _eval_job(spec: EvalSpec, ctx: DistContext, device: torch.device) -> list[Any] | None:
    """What every process of ``cropbench eval`` runs: preflight (reads the weights), then each
    evaluation with ``ctx`` (fine-tunes train data-parallel); rank 0 writes the records."""
    entry = load_entry(spec.entry)
    evals = spec.evals or entry.evaluations
    log = _log(spec.quiet or not ctx.is_main)
    data_root = resolve_data_root(RunSpec(spec.entry, scale=spec.scale, data_root=spec.data_root))

    def check() -> EvalPlan:
        _check_evals(entry, evals)
        return preflight_eval(spec, entry, evals, data_root)

    plan = together(ctx, device, check)
    kind = "external" if plan.external else "cropbench"
    log(f"[{entry.name}/{spec.variant}] {kind} weights {plan.weights['file']} ({plan.weights['format']})")
    materialise([s.dataset for s in plan.settings.values()], data_root, spec.scale, ctx, device)
    cache = Path(spec.work_dir) / "cache"
    data = EvalData(data_root, device, cache, plan.seed, plan.recipe.data.num_workers, spec.scale, ctx, log)
    encoder, records = plan.encoder.to(device), []
    for name in evals:
        t0 = time.perf_counter()
        metrics = {k: float(v) for k, v in EVALUATIONS.get(name).evaluate(encoder, plan.settings[name], data).items()}
        if ctx.is_main:
            command = spec.command or command_line()
            records.append(
                _write_eval_record(entry, plan, name, metrics, time.perf_counter() - t0, device, ctx, command, log)
            )
    return records if ctx.is_main else None


def _write_eval_record(
    entry: Entry,
    plan: EvalPlan,
    name: str,
    metrics: dict[str, float],
    wall: float,
    device: torch.device,
    ctx: DistContext,
    command: str,
    log: Callable[[str], None],
) -> Any:
    from cropbench.records import Record, collect_provenance, protocol_provenance, write_record

    where = f"{entry.path} (variant {plan.variant!r}, scale {plan.scale!r})"
    prov = {
        **collect_provenance(plan.recipe.to_dict(), str(device), command),
        "overrides": plan.overrides,
        "world_size": ctx.world_size,
        **protocol_provenance(name, plan.settings[name], resolved_config(plan.recipe, where)),
        "weights": plan.weights,
        "external_weights": plan.external,
    }
    rec = Record(entry.name, plan.variant, plan.scale, name, plan.seed, metrics, {}, wall, prov)
    path = write_record(plan.out, rec)
    shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
    log(f"[{entry.name}/{plan.variant}] {name}: {shown} ({wall:.1f}s) -> {path}")
    return rec
