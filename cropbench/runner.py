"""Run one benchmark entry: resolve its recipe, pretrain, evaluate, write records.

recipe  = entry.recipe(variant, scale, overrides)     # validated, frozen
preflight(spec, entry, ...)                            # every check that can fail, before training
method  = METHODS[recipe.method](Config(recipe.params), backbone, ctx)
result  = Trainer(method, dataset, recipe).fit()       # or torch.distributed workers (--nproc)
metrics = EVALUATIONS[name].evaluate(encoder, Settings(recipe.eval[name]), EvalData)
write_record(out, Record(entry, variant, scale, eval, seed, metrics, pretrain, provenance))
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cropbench.backbones import build_backbone
from cropbench.config import deep_merge, from_dict
from cropbench.data import build_dataset, default_data_root, validate_dataset
from cropbench.dist import DistContext, params_checksum, shutdown
from cropbench.errors import ConfigError, CropbenchError, TrainingError
from cropbench.evaluations.base import EvalData
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.recipe import Entry, Recipe, flatten, load_entry
from cropbench.registry import EVALUATIONS, METHODS
from cropbench.trainer import CHECKPOINT, Trainer, TrainResult, read_checkpoint

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


def method_config(recipe: Recipe, where: str = "") -> Any:
    """The method's ``Config`` validated from ``recipe.params`` (defaults filled in)."""
    return from_dict(METHODS.get(recipe.method).Config, recipe.params, where, "params")


def build_method(recipe: Recipe, ctx: MethodContext, where: str = "") -> SSLMethod:
    """Method class from the registry, its Config validated from ``recipe.params``; a setting the
    method or backbone rejects is a ``ConfigError`` naming the recipe."""
    cls = METHODS.get(recipe.method)
    cfg = method_config(recipe, where)
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    try:
        backbone = build_backbone(recipe.backbone, **recipe.backbone_args)
        method = cls(cfg, backbone, ctx)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {recipe.method} on {recipe.backbone} rejects these settings: {e}") from e
    _check_stride(cfg, backbone, where)
    return method


def _check_stride(cfg: Any, backbone: torch.nn.Module, where: str) -> None:
    """Region swapping (RegionCL) cuts boxes on the backbone's output grid: the view side must be
    a multiple of its output stride (RegionCL ``cutMix`` boxes are multiples of 32 px)."""
    stride, views = getattr(backbone, "output_stride", None), getattr(cfg, "views", None)
    size = getattr(views, "size", None)
    if hasattr(cfg, "region") and isinstance(stride, int) and isinstance(size, int) and size % stride:
        raise ConfigError(
            f"{where}: params.views.size: {size} is not a multiple of the backbone's output stride "
            f"{stride}; region boxes lie on that grid (e.g. {max(stride, size - size % stride)})"
        )


def build_train_set(recipe: Recipe, data_root: Path | None) -> Any:
    ds = build_dataset(recipe.data.dataset, recipe.data.train_split, data_root, image_size=recipe.data.image_size)
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
    tc = recipe.train
    spe = n_train // tc.batch_size
    if tc.max_steps_per_epoch:
        spe = min(spe, tc.max_steps_per_epoch)
    return MethodContext(dist_ctx, max(1, spe), tc.epochs, tc.batch_size // dist_ctx.world_size)


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
) -> tuple[SSLMethod, TrainResult]:
    dataset = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(dataset), dist_ctx), where)
    if on_init is not None:
        on_init(method)
    trainer = Trainer(method, dataset, recipe, run_dir, device, dist_ctx, quiet)
    return trainer.method, trainer.fit(resume=resume)


def _ddp_worker(
    recipe: Recipe, run_dir: Path, data_root: Path | None, device_name: str, resume: bool, where: str
) -> dict[str, float]:
    """One torch.distributed process (launched by torch's elastic launcher, i.e. torchrun)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        method, result = pretrain_local(
            recipe, run_dir, data_root, device, DistContext(rank, world), resume, True, where
        )
        out = {**result.summary(), "params_checksum": params_checksum(method)}
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    shutdown(DistContext(rank, world))  # barrier, then destroy (see cropbench.dist.shutdown)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_all(nproc: int, worker: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Run ``worker(*args)`` on ``nproc`` local processes through torchrun's launcher API; every
    rank's return value, by rank."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        start_method="spawn",
    )
    return elastic_launch(cfg, worker)(*args)


def pretrain_distributed(
    recipe: Recipe, run_dir: Path, data_root: Path | None, device: torch.device, nproc: int, resume: bool, where: str
) -> TrainResult:
    """Data-parallel pretraining on ``nproc`` processes through torchrun's launcher API."""
    results = launch_all(nproc, _ddp_worker, recipe, run_dir, data_root, device.type, resume, where)
    sums = [results[r]["params_checksum"] for r in sorted(results)]
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise TrainingError(f"data-parallel ranks ended with different weights (parameter sums {sums})")
    s = results[0]
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


def _pretrain_seed(spec: RunSpec, recipe: Recipe, run_dir: Path, data_root: Path, device: torch.device, where: str):
    """Pretrain one seed; returns (encoder, its initial state or None, TrainResult)."""
    init_state: dict[str, Any] = {}
    if spec.nproc > 1:
        result = pretrain_distributed(recipe, run_dir, data_root, device, spec.nproc, spec.resume, where)
        encoder = load_encoder(result.checkpoint, device)
        if spec.random_init:  # the same seed builds the same initial weights
            init_state = build_method(recipe, method_context(recipe, 10**9, DistContext()), where).encoder.state_dict()
    else:

        def keep(m: SSLMethod) -> None:
            init_state.update(copy.deepcopy(m.encoder.state_dict()))

        on_init = keep if spec.random_init else None
        method, result = pretrain_local(
            recipe, run_dir, data_root, device, DistContext(), spec.resume, spec.quiet, where, on_init
        )
        encoder = method.encoder
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
    return Path(spec.work_dir) / spec.scale / entry / spec.variant / f"seed{seed}"


def preflight(
    spec: RunSpec, entry: Entry, evals: tuple[str, ...], data_root: Path, log: Callable[[str], None]
) -> list[SeedPlan]:
    """Everything that can be checked before the first training step: recipes (ranges, method
    settings, view size vs stride), every evaluation's settings and dataset splits, the output
    and work folders, and the checkpoints ``--resume`` would read. Writes nothing."""
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    plans = [SeedPlan(s, seeded_recipe(entry, spec, s), run_folder(spec, entry.name, s)) for s in spec.seeds]
    check_writable(spec.out, "--out")
    check_writable(spec.work_dir, "--work-dir")
    recipe = plans[0].recipe
    settings = {name: eval_settings(name, recipe, entry.modality, where) for name in evals}
    build_method(recipe, method_context(recipe, 10**9, DistContext()), where)
    validate_dataset(recipe.data.dataset, data_root, recipe.data.train_split, spec.scale, "data.dataset")
    for name, s in settings.items():
        check_eval_data(s, data_root, spec.scale, f"eval.{name}.dataset")
    if spec.resume:
        for plan in plans:
            check_resume(spec, plan.recipe, plan.run_dir, log)
    return plans


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
    Records carry them; tables mark such records and ``check`` keeps them from paper references."""
    base = flatten(entry.recipe(spec.variant, spec.scale, {"train": {"seed": recipe.train.seed}}).to_dict())
    resolved = flatten(recipe.to_dict())
    return {k: resolved.get(k) for k in sorted(flatten(spec.overrides)) if base.get(k) != resolved.get(k)}


def resolve_data_root(spec: RunSpec) -> Path:
    """``--data-root``, else ``$CROPBENCH_DATA``, else (micro only) the embedded-data cache."""
    if spec.data_root:
        return Path(spec.data_root)
    if spec.scale == "micro" or os.environ.get("CROPBENCH_DATA"):
        return default_data_root()
    raise CropbenchError(f"--scale {spec.scale} reads real datasets: pass --data-root PATH or set CROPBENCH_DATA")


def run(spec: RunSpec) -> list[Any]:
    """Pretrain + evaluate every seed of one entry/variant; returns the records written.

    Everything checkable is checked first (``preflight``); then every seed's run folder is locked
    (a second run of the same folders is refused) and the seeds run one after another, each
    writing its records as soon as they exist (a later failure never loses them)."""
    entry = load_entry(spec.entry)
    evals = spec.evals or entry.evaluations
    _check_evals(entry, evals)
    device, log = resolve_device(spec.device), _log(spec.quiet)
    data_root = resolve_data_root(spec)
    plans = preflight(spec, entry, evals, data_root, log)
    with contextlib.ExitStack() as locks:
        for plan in plans:
            locks.enter_context(run_lock(plan.run_dir))
        return [rec for plan in plans for rec in _run_seed(spec, entry, evals, plan, data_root, device, log)]


def _run_seed(
    spec: RunSpec,
    entry: Entry,
    evals: tuple[str, ...],
    plan: SeedPlan,
    data_root: Path,
    device: torch.device,
    log: Callable[[str], None],
) -> list[Any]:
    """Pretrain one seed, evaluate it (and its random init), write one record per evaluation."""
    from cropbench.records import Record, collect_provenance, protocol_provenance, write_record

    seed, recipe, run_dir = plan.seed, plan.recipe, plan.run_dir
    where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
    tag = f"[{entry.name}/{spec.variant} seed {seed}]"
    log(
        f"{tag} pretraining {recipe.method} on {recipe.data.dataset} ({recipe.train.epochs} epochs, "
        f"batch {recipe.train.batch_size}, {device}) -> {run_dir}"
    )
    t0 = time.perf_counter()
    encoder, init_state, result = _pretrain_seed(spec, recipe, run_dir, data_root, device, where)
    log(
        f"{tag} pretrained in {time.perf_counter() - t0:.1f}s: loss {result.loss_first:.4f} -> "
        f"{result.loss_last:.4f}, {result.images_per_s:.0f} img/s"
    )
    cache = Path(spec.work_dir) / "cache"
    data = EvalData(data_root, device, cache, seed, recipe.data.num_workers, spec.scale, DistContext(), log)
    encoders = [(spec.variant, encoder, result.summary())]
    if init_state is not None:
        rand = copy.deepcopy(encoder)
        rand.load_state_dict(init_state)
        encoders.append((spec.variant + RANDOM_INIT, rand, {}))  # a random-init encoder had no pretraining
    overrides = overrides_of(entry, spec, recipe)
    cfg = method_config(recipe, where)
    records = []
    for name in evals:
        settings = eval_settings(name, recipe, entry.modality, where)
        for variant, enc, pre in encoders:
            t1 = time.perf_counter()
            metrics = {k: float(v) for k, v in EVALUATIONS.get(name).evaluate(enc, settings, data).items()}
            wall = time.perf_counter() - t1
            prov = {
                **collect_provenance(recipe.to_dict(), str(device), " ".join(sys.argv)),
                "overrides": overrides,
                **protocol_provenance(name, settings, cfg),
            }
            rec = Record(entry.name, variant, spec.scale, name, seed, metrics, pre, wall, prov)
            path = write_record(Path(spec.out), rec)
            shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
            log(f"[{entry.name}/{variant} seed {seed}] {name}: {shown} ({wall:.1f}s) -> {path}")
            records.append(rec)
    return records


# ---------------------------------------------------------------- cropbench eval
def _launch(nproc: int, worker: Callable[..., Any], *args: Any) -> Any:
    """Run ``worker(*args)`` on ``nproc`` local processes (torchrun's launcher); rank 0's result."""
    return launch_all(nproc, worker, *args)[0]


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


def evaluate_weights(spec: EvalSpec) -> list[Any]:
    """Evaluate WEIGHTS under an entry's evaluation protocols; one record per evaluation, written
    as soon as it exists to the same layout as ``run``'s, carrying the weights' provenance and the
    resolved protocol."""
    entry = load_entry(spec.entry)
    evals = spec.evals or entry.evaluations
    _check_evals(entry, evals)
    device, log = resolve_device(spec.device), _log(spec.quiet)
    data_root = resolve_data_root(RunSpec(spec.entry, scale=spec.scale, data_root=spec.data_root))
    plan = preflight_eval(spec, entry, evals, data_root)
    kind = "external" if plan.external else "cropbench"
    log(f"[{entry.name}/{spec.variant}] {kind} weights {plan.weights['file']} ({plan.weights['format']})")
    job = _EvalJob(spec, plan.recipe, plan.seed, plan.settings, data_root, device.type)
    if spec.nproc > 1:  # every process evaluates (fine-tunes train data-parallel); rank 0's numbers
        results = _launch(spec.nproc, _eval_worker, job)
        return [_write_eval_record(entry, plan, name, *results[name], device, log) for name in evals]
    data, encoder = _eval_data(job, DistContext(), device, log), plan.encoder.to(device)
    return [
        _write_eval_record(entry, plan, name, *_evaluate_one(name, job, encoder, data), device, log) for name in evals
    ]


def _write_eval_record(
    entry: Entry,
    plan: EvalPlan,
    name: str,
    metrics: dict[str, float],
    wall: float,
    device: torch.device,
    log: Callable[[str], None],
) -> Any:
    from cropbench.records import Record, collect_provenance, protocol_provenance, write_record

    where = f"{entry.path} (variant {plan.variant!r}, scale {plan.scale!r})"
    prov = {
        **collect_provenance(plan.recipe.to_dict(), str(device), " ".join(sys.argv)),
        "overrides": plan.overrides,
        **protocol_provenance(name, plan.settings[name], method_config(plan.recipe, where)),
        "weights": plan.weights,
        "external_weights": plan.external,
    }
    rec = Record(entry.name, plan.variant, plan.scale, name, plan.seed, metrics, {}, wall, prov)
    path = write_record(plan.out, rec)
    shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
    log(f"[{entry.name}/{plan.variant}] {name}: {shown} ({wall:.1f}s) -> {path}")
    return rec


@dataclass(frozen=True)
class _EvalJob:
    """What every process of ``cropbench eval`` needs (picklable for ``--nproc`` workers)."""

    spec: EvalSpec
    recipe: Recipe
    seed: int
    settings: dict[str, Any]
    data_root: Path
    device: str


def _eval_data(job: _EvalJob, ctx: DistContext, device: torch.device, log: Callable[[str], None]) -> EvalData:
    cache = Path(job.spec.work_dir) / "cache"
    return EvalData(job.data_root, device, cache, job.seed, job.recipe.data.num_workers, job.spec.scale, ctx, log)


def _evaluate_one(name: str, job: _EvalJob, encoder: torch.nn.Module, data: EvalData) -> tuple[dict[str, float], float]:
    """One evaluation of the job: (metrics, wall seconds)."""
    t0 = time.perf_counter()
    metrics = EVALUATIONS.get(name).evaluate(encoder, job.settings[name], data)
    return {k: float(v) for k, v in metrics.items()}, time.perf_counter() - t0


def _eval_worker(job: _EvalJob) -> dict[str, tuple[dict[str, float], float]]:
    """One ``cropbench eval --nproc`` process: loads the weights itself, evaluates with
    ``data.dist`` set (the fine-tuning evaluations train data-parallel; rank 0's numbers are kept)."""
    from cropbench.weights import load_external_encoder

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(job.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    ctx = DistContext(rank, world)
    try:
        rec = job.recipe
        encoder, _ = load_external_encoder(job.spec.weights, rec.backbone, rec.backbone_args, job.spec.format)
        data = _eval_data(job, ctx, device, _log(job.spec.quiet or rank > 0))
        encoder = encoder.to(device)
        out = {name: _evaluate_one(name, job, encoder, data) for name in job.settings}
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown(ctx)
    return out
