"""Run one benchmark entry: resolve its recipe, pretrain, evaluate, write records.

recipe  = entry.recipe(variant, scale, overrides)     # validated, frozen
method  = METHODS[recipe.method](Config(recipe.params), backbone, ctx)
result  = Trainer(method, dataset, recipe).fit()       # or torch.distributed workers (--nproc)
metrics = EVALUATIONS[name].evaluate(encoder, Settings(recipe.eval[name]), EvalData)
write_record(out, Record(entry, variant, scale, eval, seed, metrics, pretrain, provenance))
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cropbench.backbones import build_backbone
from cropbench.config import deep_merge, from_dict
from cropbench.data import build_dataset, default_data_root
from cropbench.dist import DistContext, params_checksum
from cropbench.errors import ConfigError, CropbenchError, TrainingError
from cropbench.evaluations.base import EvalData
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.recipe import Entry, Recipe, load_entry
from cropbench.registry import EVALUATIONS, METHODS
from cropbench.trainer import Trainer, TrainResult

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
    resume: bool = False
    out: Path = REPO_ROOT / "results" / "records"
    work_dir: Path = Path("runs")
    overrides: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False  # also evaluate the same encoder at its initialisation
    quiet: bool = False


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


def build_method(recipe: Recipe, ctx: MethodContext, where: str = "") -> SSLMethod:
    """Method class from the registry, its Config validated from ``recipe.params``."""
    cls = METHODS.get(recipe.method)
    cfg = from_dict(cls.Config, recipe.params, where, "params")
    torch.manual_seed(recipe.train.seed)  # the initial weights are a function of the seed
    backbone = build_backbone(recipe.backbone, **recipe.backbone_args)
    return cls(cfg, backbone, ctx)


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
        return {**result.summary(), "params_checksum": params_checksum(method)}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_distributed(
    recipe: Recipe, run_dir: Path, data_root: Path | None, device: torch.device, nproc: int, resume: bool, where: str
) -> TrainResult:
    """Data-parallel pretraining on ``nproc`` processes through torchrun's launcher API."""
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
    results = elastic_launch(cfg, _ddp_worker)(recipe, run_dir, data_root, device.type, resume, where)
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
    )


def load_encoder(checkpoint: Path, device: torch.device) -> torch.nn.Module:
    blob = torch.load(checkpoint, map_location="cpu", weights_only=False)
    enc = build_backbone(blob["backbone"], **blob["backbone_args"])
    enc.load_state_dict(blob["encoder"])
    return enc.to(device)


def evaluate(
    encoder: torch.nn.Module, name: str, recipe: Recipe, modality: str, data: EvalData, where: str
) -> dict[str, float]:
    ev = EVALUATIONS.get(name)
    if ev.modality != modality:
        raise ConfigError(f"evaluation {name!r} is for {ev.modality} encoders; this entry's encoder is {modality}")
    settings = from_dict(ev.Settings, recipe.eval.get(name, {}), where, f"eval.{name}")
    return ev.evaluate(encoder, settings, data)


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


def run(spec: RunSpec) -> list[Any]:
    """Pretrain + evaluate every seed of one entry/variant; returns the records written."""
    from cropbench.records import Record, collect_provenance, write_record

    entry = load_entry(spec.entry)
    evals = spec.evals or entry.evaluations
    _check_evals(entry, evals)
    device, log = resolve_device(spec.device), _log(spec.quiet)
    data_root = Path(spec.data_root) if spec.data_root else (default_data_root() if spec.scale == "micro" else None)
    if data_root is None:
        raise CropbenchError(f"--scale {spec.scale} reads real datasets: pass --data-root PATH or set CROPBENCH_DATA")
    records = []
    for seed in spec.seeds:
        recipe = seeded_recipe(entry, spec, seed)
        where = f"{entry.path} (variant {spec.variant!r}, scale {spec.scale!r})"
        run_dir = Path(spec.work_dir) / spec.scale / entry.name / spec.variant / f"seed{seed}"
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
        for name in evals:
            for variant, enc, pre in encoders:
                t1 = time.perf_counter()
                metrics = {k: float(v) for k, v in evaluate(enc, name, recipe, entry.modality, data, where).items()}
                wall = time.perf_counter() - t1
                prov = collect_provenance(recipe.to_dict(), str(device), " ".join(sys.argv))
                rec = Record(entry.name, variant, spec.scale, name, seed, metrics, pre, wall, prov)
                path = write_record(Path(spec.out), rec)
                shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items())
                log(f"[{entry.name}/{variant} seed {seed}] {name}: {shown} ({wall:.1f}s) -> {path}")
                records.append(rec)
    return records
