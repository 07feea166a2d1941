"""A plain PyTorch pretraining loop: views -> loss -> step, with checkpoints, resume and DDP.

    for epoch in range(start, epochs):
        method.on_epoch_start(epoch)                 # e.g. CYBORGS regenerates masks
        for batch in loader:                         # uint8 canvases / clips
            lr = schedule(step)
            out = method.training_step(batch, step, views_rng(step))   # views + loss
            out.loss.backward(); all_reduce(grads); optimizer.step()
            method.after_step(step)                  # momentum encoders
        save_checkpoint(epoch)                       # atomic, every epoch

Determinism: the data order is a function of (seed, epoch) and the view randomness a function of
(seed, global step, rank), so ``--resume`` continues exactly where an uninterrupted run would be
(bit-identical on CPU). Data-parallel: gradients are all-reduced explicitly (one flat buffer);
BatchNorm is synchronised with SyncBN on CUDA and stays per-process on CPU (torch's SyncBN has no
CPU kernel).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from cropbench.data.images import collate_images
from cropbench.dist import DistContext, all_reduce_grads, all_reduce_mean
from cropbench.errors import TrainingError
from cropbench.methods.base import SSLMethod
from cropbench.optim import build_optimizer, lr_at, named_params, set_lr
from cropbench.recipe import Recipe

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

    def summary(self) -> dict[str, float]:
        return {
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "epochs": float(self.epochs),
            "steps": float(self.steps),
            "images_per_s": self.images_per_s,
            "wall_s": self.wall_s,
        }


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


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def views_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG a method draws its views from: a pure function of (seed, step, rank)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return g


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
        if device.type == "cuda" and dist_ctx.enabled:
            method = self.method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        method.to(device)
        if device.type == "cuda" and recipe.train.channels_last and method.modality == "image":
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
        self.steps_per_epoch = len(self.train_dataset) // tc.batch_size
        if tc.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, tc.max_steps_per_epoch)
        self.base_lr = recipe.optim.lr * tc.batch_size / recipe.optim.base_batch
        self.optimizer = build_optimizer(method.param_groups(), named_params(method), recipe.optim, self.base_lr)
        self.state = _State()

    # ----------------------------------------------------------------- data
    def _loader(self, epoch: int) -> DataLoader:
        seed = self.recipe.train.seed
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(epoch)
        if self.dist.enabled:
            sampler = DistributedSampler(
                self.train_dataset, self.dist.world_size, self.dist.rank, shuffle=True, seed=seed, drop_last=True
            )
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.train_dataset, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        nw = self.recipe.data.num_workers
        return DataLoader(
            self.train_dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            drop_last=True,
            num_workers=nw,
            collate_fn=getattr(self.train_dataset, "collate", collate_images),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
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
            "recipe_hash": self.recipe.hash(),
            "finished": s.epoch >= self.recipe.train.epochs,
        }
        save_atomic(blob, self.checkpoint_path())
        write_text_atomic(self.run_dir / METRICS, "".join(json.dumps(h, sort_keys=True) + "\n" for h in s.history))

    def load(self, path: Path | None = None) -> bool:
        """Restore the last checkpoint; False when there is none. A recipe mismatch is an error."""
        path = path or self.checkpoint_path()
        if not path.exists():
            return False
        blob = torch.load(path, map_location=self.device, weights_only=False)
        if blob.get("recipe_hash") != self.recipe.hash():
            raise TrainingError(
                f"{path} was written by a different recipe (hash {blob.get('recipe_hash')} != "
                f"{self.recipe.hash()}); start without --resume or use another --out"
            )
        self.method.load_state_dict(blob["method"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.state = _State(
            blob["epoch"],
            blob["step"],
            blob["loss_first"],
            blob["loss_last"],
            blob["images"],
            blob["train_s"],
            list(blob["history"]),
        )
        return True

    # ----------------------------------------------------------------- loop
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
            out = self.method.training_step(batch, s.step, gen)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        all_reduce_grads(self.method.parameters(), self.dist)
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
        for i, batch in enumerate(self._loader(epoch)):
            if i >= self.steps_per_epoch:
                break
            loss_t, logs = self._step(batch)
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
                        **{k: float(v) for k, v in logs.items()},
                    }
                )
                bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{ips:.0f}")
            bar.update(1)
        bar.close()
        s.train_s += time.perf_counter() - t0
        s.loss_last = losses[-1] if losses else all_reduce_mean(loss_t, self.dist).item()
        self._check_finite(s.loss_last)
        s.epoch = epoch + 1
        extra = self.method.on_epoch_end(epoch, self) or {}
        s.history.append(
            {
                "epoch": s.epoch,
                "step": s.step,
                "epoch_loss": sum(losses) / max(1, len(losses)),
                "images_per_s": round((s.images - n0) / max(1e-9, time.perf_counter() - t0), 2),
                **{k: float(v) for k, v in extra.items()},
            }
        )

    def fit(self, resume: bool = False) -> TrainResult:
        if resume:
            self.load()
        tc = self.recipe.train
        for epoch in range(self.state.epoch, tc.epochs):
            self.method.train()
            self.method.on_epoch_start(epoch, self)
            self._epoch(epoch)
            self._save()
        s = self.state
        return TrainResult(
            s.loss_first,
            s.loss_last,
            s.epoch,
            s.step,
            s.images / max(1e-9, s.train_s),
            s.train_s,
            self.checkpoint_path(),
        )
