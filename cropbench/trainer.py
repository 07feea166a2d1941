"""A plain PyTorch pretraining loop: views -> loss -> step, with checkpoints, resume and DDP.

    for epoch in range(start, epochs):
        method.on_epoch_start(EpochContext(epoch))   # e.g. CYBORGS regenerates masks
        for batch in loader:                         # uint8 canvases / clips
            lr = schedule(step)
            out = method.training_step(batch, step, views_rng(step))   # views + loss
            out.loss.backward(); optimizer.step()     # DDP all-reduces during backward
            method.after_step(step)                  # momentum encoders
        save_checkpoint(epoch)                       # atomic, every epoch

Determinism: the data order is a function of (seed, epoch) and the view randomness a function of
(seed, global step, rank), so ``--resume`` continues exactly where an uninterrupted run would be
(bit-identical on CPU); persistent loader workers (``data.num_workers > 0``) are built once per
``fit`` and receive the epoch with every index (``EpochSampler``), so a dataset's ``set_epoch``
holds inside them too. Data-parallel: the step runs under ``DistributedDataParallel``
(``StepModule``: its forward is the method's ``training_step``), whose bucketed all-reduce overlaps
backward; ``train.compile`` compiles the method's backbone and heads while it trains. BatchNorm
follows each method's ``batchnorm`` declaration (its official code): "sync" methods are
converted to SyncBN on CUDA; on CPU (gloo) torch's SyncBN has no kernel, so their BN stays per
process there (a warning says so). "shuffle" (MoCo family) does shuffle-BN in the method, "local"
is per process.

Logs: every ``log_every`` steps a metrics.jsonl row holds the step's loss and the mean of each
scalar the method logged (loss components ``loss_*``, match accuracy, ...) over the steps since
the previous row (or the epoch start). The summary carries each ``loss_*`` component's first and
last row value (``loss_dense_first`` / ``loss_dense_last``): means over the first and last logged
windows.
"""

from __future__ import annotations

import itertools
import json
import math
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm

from cropbench.data.images import collate_images
from cropbench.dist import DistContext, all_reduce_mean
from cropbench.errors import CheckpointError, TrainingError
from cropbench.io import save_torch_atomic, write_text_atomic
from cropbench.methods.base import EpochContext, SSLMethod, StepOutput
from cropbench.optim import build_optimizer, lr_at, named_params, set_lr
from cropbench.recipe import Recipe
from cropbench.viewplot import draw_epoch_curves

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    loss_first: float
    loss_last: float
    epochs: int
    steps: int
    images_per_s: float
    wall_s: float
    checkpoint: Path
    components: dict[str, float] = field(default_factory=dict)  # loss_<c>_first / _last
    epoch_losses: tuple[float, ...] = ()  # mean step loss of each epoch trained, from the first

    def summary(self) -> dict[str, float]:
        return {
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "epochs": float(self.epochs),
            "steps": float(self.steps),
            "images_per_s": self.images_per_s,
            "wall_s": self.wall_s,
            **self.components,
        }


def loss_components(history: list[dict[str, Any]]) -> dict[str, float]:
    """``loss_<c>_first`` / ``loss_<c>_last`` for every ``loss_<c>`` key of the step rows of
    metrics.jsonl: its value in the first and in the last row that has it (window means)."""
    out: dict[str, float] = {}
    for row in (r for r in history if "loss" in r):
        for k in (k for k in row if k.startswith("loss_")):
            out.setdefault(f"{k}_first", row[k])
            out[f"{k}_last"] = row[k]
    return dict(sorted(out.items()))


def convert_batchnorm(method: SSLMethod, device: torch.device, dist: DistContext, quiet: bool) -> SSLMethod:
    """SyncBN where the method's official code uses global BN (``batchnorm == "sync"``), on CUDA and
    several processes; on CPU torch has no SyncBN kernel, so BN stays per process (said once).
    "shuffle" (MoCo family: shuffle-BN inside the method) and "local" methods are left as they are."""
    if not dist.enabled or method.batchnorm != "sync":
        return method
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if not quiet and dist.is_main:
        print(
            f"note: {type(method).__name__} uses global BatchNorm (SyncBN) in its official code; "
            "torch has no SyncBN on CPU, so BatchNorm statistics stay per process here",
            file=sys.stderr,
        )
    return method


class StepModule(nn.Module):
    """What ``DistributedDataParallel`` wraps: its forward is the method's ``training_step`` (methods
    train there, not in ``forward``), so DDP's gradient hooks see each step's autograd graph."""

    def __init__(self, method: SSLMethod):
        super().__init__()
        self.method = method

    def forward(self, batch: Any, step: int, generator: torch.Generator) -> StepOutput:
        return self.method.training_step(batch, step, generator)


def wrap_data_parallel(method: SSLMethod, dist: DistContext) -> nn.Module:
    """``StepModule(method)``, under DDP when several processes train.

    broadcast_buffers=False: each process keeps its own buffers (BN statistics per process as the
    method's ``batchnorm`` declares; MoCo queues are filled with all processes' keys by the method),
    and none is broadcast at construction either (torch's replacement, forward_sync_buffers=False,
    still would). find_unused_parameters as the method declares it (``ddp_find_unused_parameters``:
    VideoMoCo's generator has no gradient before ``adversarial_from``); DDP then marks such
    parameters ready and leaves one that no process used untouched, as the optimizer skipped it."""
    module = StepModule(method)
    if not dist.enabled:
        return module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return DistributedDataParallel(
            module, broadcast_buffers=False, find_unused_parameters=method.ddp_find_unused_parameters
        )


def compile_modules(method: SSLMethod) -> list[nn.Module]:
    """``torch.compile`` each top-level module of the method that holds parameters (backbone,
    heads, momentum copies), in place: state_dict keys stay as they are. Returns them, to undo."""
    mods = [m for _, m in method.named_children() if any(True for _ in m.parameters())]
    for m in mods:
        m.compile()
    return mods


def uncompile_modules(mods: list[nn.Module]) -> None:
    """Back to eager after training, so evaluations run the checkpoint's eager model (the same
    numbers as ``cropbench eval`` of that checkpoint). ``nn.Module.compile`` keeps its compiled
    callable in ``_compiled_call_impl``; None restores the eager ``__call__``."""
    for m in mods:
        m._compiled_call_impl = None


class EpochSampler(Sampler):
    """``(epoch, index)`` pairs: the data order of an epoch, a function of (seed, epoch) only, cut
    to the samples the epoch's steps use. ``set_epoch`` before each epoch.

    One process: the order of ``RandomSampler`` with a generator seeded by (seed, epoch) (the same
    indices as a loader rebuilt every epoch); several: ``DistributedSampler``'s shard. The epoch
    travels with each index because persistent workers hold their own copy of the dataset
    (``EpochIndexed`` sets it there)."""

    def __init__(self, n: int, seed: int, dist: DistContext, limit: int):
        self.n, self.seed, self.dist, self.limit = n, seed, dist, limit
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Sampler:
        if self.dist.enabled:
            order = DistributedSampler(
                range(self.n), self.dist.world_size, self.dist.rank, shuffle=True, seed=self.seed, drop_last=True
            )
            order.set_epoch(self.epoch)
            return order
        return RandomSampler(range(self.n), generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))

    def __iter__(self) -> Any:
        epoch, order = self.epoch, self._order()
        return ((epoch, i) for i in itertools.islice(order, len(self)))

    def __len__(self) -> int:
        shard = self.n // self.dist.world_size if self.dist.enabled else self.n
        return min(shard, self.limit)


class EpochIndexed(Dataset):
    """Reads ``EpochSampler``'s ``(epoch, index)`` keys: calls the dataset's ``set_epoch`` (if it
    has one) whenever the epoch changes, in whichever process holds this copy."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


class LogWindow:
    """Running sums of a method's step logs since the last metrics row, kept on the device (no
    host sync per step); NaN values (e.g. no matchable cell) are left out of the mean."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            v = torch.as_tensor(v).detach().double()
            ok = ~torch.isnan(v)
            self.sums[k] = self.sums.get(k, 0) + torch.where(ok, v, 0.0)
            self.counts[k] = self.counts.get(k, 0) + ok.double()

    def means(self, dist: DistContext) -> dict[str, float]:
        """The window's means over steps and processes (one all-reduce); then the window restarts."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        dev = self.sums[keys[0]].device
        sums = all_reduce_mean(torch.stack([self.sums[k].to(dev) for k in keys]), dist)
        counts = all_reduce_mean(torch.stack([self.counts[k].to(dev) for k in keys]), dist)
        self.sums, self.counts = {}, {}
        return {k: float(v) for k, v in zip(keys, (sums / counts).tolist(), strict=True)}


@dataclass
class _State:
    """What a checkpoint restores besides weights and optimizer state."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    images: int = 0  # images seen (all processes)
    train_s: float = 0.0  # time spent in training steps
    history: list[dict[str, Any]] = field(default_factory=list)


_PLAIN = (str, int, float, bool, type(None), Tensor, torch.Size)


def check_plain(obj: Any, path: str = "checkpoint") -> None:
    """Raise naming the first value that is not a tensor or plain data (dict, list, tuple, str,
    number, bool, None): checkpoints hold only what ``torch.load(weights_only=True)`` reads."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TrainingError(f"{path}: key {k!r} is a {type(k).__name__}, not a str or int")
            check_plain(v, f"{path}[{k!r}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{path}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TrainingError(f"{path} is a {type(obj).__name__}; checkpoints store only tensors and plain data")


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain data only, so a crafted file never runs
    code. Anything unreadable is a ``CheckpointError`` naming the file."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if why is None:  # not a refused object: a damaged file
            raise CheckpointError(
                f"{path}: not a readable checkpoint (corrupt or truncated: {e}); "
                "delete it to start this run from scratch"
            ) from e
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain data ({why}); cropbench "
            "loads checkpoints with weights_only=True because unpickling such objects can run code"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt or truncated: {type(e).__name__} {first}); "
            "delete it to start this run from scratch"
        ) from e
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(blob).__name__}")
    return blob


def views_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG a method draws its views from: a pure function of (seed, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return g


def schedule_length(method: SSLMethod, dataset: Dataset, prepared: Dataset, recipe: Recipe) -> int:
    """Steps per epoch of the lr schedule: the method's ``ctx.steps_per_epoch``, the one number its
    own step schedules use too (computed once, by ``runner.method_context``, from the training
    set). Errors when ``prepare_dataset`` changed the sample count, or when the method was built
    for more steps than the data holds, or for another number of epochs."""
    ctx, tc = method.ctx, recipe.train
    if len(prepared) != len(dataset):
        raise TrainingError(
            f"{type(method).__name__}.prepare_dataset changed the number of training samples "
            f"({len(dataset)} -> {len(prepared)}); the schedule length is computed from the training set"
        )
    if ctx.steps_per_epoch * tc.batch_size > len(prepared) or ctx.epochs != tc.epochs:
        raise TrainingError(
            f"the method was built for {ctx.steps_per_epoch} steps x {ctx.epochs} epochs at train.batch_size="
            f"{tc.batch_size}, but this run has {len(prepared)} samples and {tc.epochs} epochs; build it with "
            "runner.method_context(recipe, len(dataset), dist)"
        )
    return ctx.steps_per_epoch


class Trainer:
    def __init__(
        self,
        method: SSLMethod,
        dataset: Dataset,
        recipe: Recipe,
        run_dir: Path,
        device: torch.device,
        dist_ctx: DistContext | None = None,
        quiet: bool = False,
    ):
        self.method, self.recipe, self.run_dir = method, recipe, Path(run_dir)
        dist_ctx = dist_ctx or DistContext()
        self.device, self.dist, self.quiet = device, dist_ctx, quiet
        self.run_dir.mkdir(parents=True, exist_ok=True)
        method = self.method = convert_batchnorm(method, device, dist_ctx, quiet)
        method.to(device)
        if recipe.train.channels_last and method.modality == "image":  # oneDNN (CPU) and cuDNN
            method.to(memory_format=torch.channels_last)
        self.train_dataset = method.prepare_dataset(dataset, self.run_dir)
        tc = recipe.train
        if tc.batch_size % dist_ctx.world_size:
            raise TrainingError(f"train.batch_size={tc.batch_size} is not divisible by --nproc {dist_ctx.world_size}")
        self.local_batch = tc.batch_size // dist_ctx.world_size
        if len(self.train_dataset) < tc.batch_size:
            raise TrainingError(
                f"the training set has {len(self.train_dataset)} samples, fewer than train.batch_size={tc.batch_size}"
            )
        self.steps_per_epoch = schedule_length(method, dataset, self.train_dataset, recipe)
        self.base_lr = recipe.optim.lr * tc.batch_size / recipe.optim.base_batch
        self.optimizer = build_optimizer(method.param_groups(), named_params(method), recipe.optim, self.base_lr)
        self.state = _State()
        self.step_module = wrap_data_parallel(method, dist_ctx)  # after .to(device) and SyncBN
        self._epoch_hook = type(method).on_epoch_start is not SSLMethod.on_epoch_start
        self._data: DataLoader | None = None

    # ----------------------------------------------------------------- data
    def _loader(self, epoch: int) -> DataLoader:
        """The epoch's loader: built once per ``fit`` (its workers persist), rebuilt every epoch
        for a method with an ``on_epoch_start`` hook, which may change its dataset (CYBORGS
        regenerates masks) where persistent workers would keep a stale copy."""
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(epoch)
        if self._data is None or self._epoch_hook:
            self._data = self._build_loader()
        self._data.sampler.set_epoch(epoch)
        return self._data

    def _build_loader(self) -> DataLoader:
        dc = self.recipe.data
        n, limit = len(self.train_dataset), self.steps_per_epoch * self.local_batch
        return DataLoader(
            EpochIndexed(self.train_dataset),
            batch_size=self.local_batch,
            sampler=EpochSampler(n, self.recipe.train.seed, self.dist, limit),
            drop_last=True,
            num_workers=dc.num_workers,
            collate_fn=getattr(self.train_dataset, "collate", collate_images),
            pin_memory=self.device.type == "cuda",
            persistent_workers=dc.num_workers > 0 and not self._epoch_hook,
            prefetch_factor=dc.prefetch_factor if dc.num_workers > 0 else None,
        )

    # ----------------------------------------------------------- checkpoint
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def _save(self) -> None:
        if not self.dist.is_main:
            return
        s = self.state
        blob = {
            "epoch": s.epoch,
            "step": s.step,
            "loss_first": s.loss_first,
            "loss_last": s.loss_last,
            "images": s.images,
            "train_s": s.train_s,
            "history": s.history,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "encoder": self.method.encoder.state_dict(),
            "backbone": self.recipe.backbone,
            "backbone_args": dict(self.recipe.backbone_args),
            "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.pretrain_hash(),  # eval settings are not part of it
            "finished": s.epoch >= self.recipe.train.epochs,
        }
        check_plain(blob)
        save_torch_atomic(blob, self.checkpoint_path())
        write_text_atomic(self.run_dir / METRICS, "".join(json.dumps(h, sort_keys=True) + "\n" for h in s.history))
        draw_epoch_curves(self.run_dir, s.history, self.method.epoch_curves)  # e.g. ParamCrop's view IoU

    def load(self, path: Path | None = None) -> bool:
        """Restore the last checkpoint (weights_only); False when there is none. A checkpoint of
        another pretraining recipe, or one that does not fit this model, is an error naming it."""
        path = path or self.checkpoint_path()
        if not path.exists():
            return False
        blob = read_checkpoint(path, self.device)
        if blob.get("recipe_hash") != self.recipe.pretrain_hash():
            raise CheckpointError(
                f"{path} was written by a different recipe (pretraining hash {blob.get('recipe_hash')} != "
                f"{self.recipe.pretrain_hash()}); start without --resume or use another --work-dir"
            )
        try:
            self.method.load_state_dict(blob["method"])
            self.optimizer.load_state_dict(blob["optimizer"])
            keys = ("epoch", "step", "loss_first", "loss_last", "images", "train_s")
            self.state = _State(*(blob[k] for k in keys), list(blob["history"]))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: does not fit this run's model ({type(e).__name__}: {e})") from e
        self._say(f"resumed from {path} at epoch {self.state.epoch} of {self.recipe.train.epochs}")
        return True

    def _say(self, msg: str) -> None:
        """A log line on stderr on its own line (never on a progress bar's)."""
        if not self.quiet and self.dist.is_main:
            tqdm.write(msg, file=sys.stderr)

    # ----------------------------------------------------------------- loop
    def _epoch_context(self, epoch: int) -> EpochContext:
        """What the method's epoch hooks see (never the trainer itself)."""
        return EpochContext(epoch, self.device, self.recipe.train.seed, self.run_dir, self.dist)

    def _step(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        tc, s = self.recipe.train, self.state
        set_lr(
            self.optimizer,
            lr_at(s.step, self.steps_per_epoch, tc.epochs, self.base_lr, self.recipe.optim),
            self.base_lr,
        )
        batch = batch.to(self.device)
        gen = views_generator(tc.seed, s.step, self.dist.rank, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and tc.amp):
            out = self.step_module(batch, s.step, gen)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()  # under DDP the gradients are averaged over processes here
        if tc.grad_clip:
            nn.utils.clip_grad_norm_(self.method.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.method.after_step(s.step)
        return out.loss.detach(), out.logs

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss}) at epoch {self.state.epoch + 1}, step {self.state.step}; "
                f"training stopped, the last good checkpoint is kept at {self.checkpoint_path()}"
            )

    def _epoch(self, epoch: int) -> None:
        tc, s = self.recipe.train, self.state
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=self.quiet or not self.dist.is_main,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            file=sys.stderr,
        )
        t0, n0, losses = time.perf_counter(), s.images, []
        window = LogWindow()  # the method's step logs since the last metrics row (or epoch start)
        for i, batch in enumerate(self._loader(epoch)):
            if i >= self.steps_per_epoch:
                break
            loss_t, logs = self._step(batch)
            window.add(logs)
            if self.device.type == "cpu" or s.step == 0 or (s.step + 1) % tc.log_every == 0:
                # a host sync: every step on CPU (free), every log_every steps on CUDA
                loss = all_reduce_mean(loss_t, self.dist).item()
                self._check_finite(loss)
                if math.isnan(s.loss_first):
                    s.loss_first = loss
                losses.append(loss)
            s.step += 1
            s.images += len(batch) * self.dist.world_size
            if s.step % tc.log_every == 0:
                ips = (s.images - n0) / max(1e-9, time.perf_counter() - t0)
                s.history.append(
                    {
                        "epoch": epoch + 1,
                        "step": s.step,
                        "loss": losses[-1],
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": round(ips, 2),
                        **window.means(self.dist),
                    }
                )
                bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{ips:.0f}")
            bar.update(1)
        bar.close()
        s.train_s += time.perf_counter() - t0
        s.loss_last = losses[-1] if losses else all_reduce_mean(loss_t, self.dist).item()
        self._check_finite(s.loss_last)
        s.epoch = epoch + 1
        extra = self.method.on_epoch_end(self._epoch_context(epoch)) or {}
        s.history.append(
            {
                "epoch": s.epoch,
                "step": s.step,
                "epoch_loss": sum(losses) / max(1, len(losses)),
                "images_per_s": round((s.images - n0) / max(1e-9, time.perf_counter() - t0), 2),
                **{k: float(v) for k, v in extra.items()},
            }
        )

    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to the end of the recipe's schedule, or only its first ``stop_after`` epochs (the
        same steps, lr and schedules as the whole run's: a prefix of it, as ``--trace-epochs`` runs)."""
        if resume:
            self.load()
        tc = self.recipe.train
        end = tc.epochs if stop_after is None else min(tc.epochs, stop_after)
        compiled = compile_modules(self.method) if tc.compile else []
        try:
            for epoch in range(self.state.epoch, end):
                self.method.train()
                self.method.on_epoch_start(self._epoch_context(epoch))
                self._epoch(epoch)
                self._save()
        finally:
            uncompile_modules(compiled)
            self._data = None  # ends persistent workers
        s = self.state
        return TrainResult(
            s.loss_first,
            s.loss_last,
            s.epoch,
            s.step,
            s.images / max(1e-9, s.train_s),
            s.train_s,
            self.checkpoint_path(),
            loss_components(s.history),
            tuple(float(r["epoch_loss"]) for r in s.history if "epoch_loss" in r),
        )
