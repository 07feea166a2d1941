"""IMPORT AS ``cropbench.methods.*`` (never ``methods.*``: the folder installs as cropbench.methods).

The contract every SSL method follows.

A method = backbone + view generator + objective. The trainer hands it a collated batch of
*canvases* (uint8, on the training device); the method builds its views there (batched, so the
GPU does the augmentation), computes the loss and returns a ``StepOutput``.

    out = method.training_step(batch, step, generator)    # views -> loss
    out.loss.backward(); optimizer.step()
    method.after_step(step)                               # momentum encoders, queues

Views carry *provenance*: where each came from in the source canvas (crop boxes, flips, and
method-specific extras such as RegionCL region boxes, CYBORGS mask ids or video time windows).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cropbench.dist import DistContext
from cropbench.types import EpochCurve, View
from cropbench.views.generators import ViewGenerator


@dataclass
class StepOutput:
    loss: Tensor  # scalar, what backward() is called on
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars for the metrics log


BATCHNORM_MODES = ("sync", "shuffle", "local")  # values of ``SSLMethod.batchnorm``


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it is part of."""

    dist: DistContext = DistContext()
    steps_per_epoch: int = 1
    epochs: int = 1
    batch_size: int = 1  # per process
    num_workers: int = 0  # data.num_workers: decode workers for a method's own passes over the data (CYBORGS masks)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: the lr schedule's length, and the one every
        step-indexed schedule of a method uses (BYOL's momentum, VideoMoCo's adversarial start)."""
        return self.steps_per_epoch * self.epochs


@dataclass(frozen=True)
class EpochContext:
    """What an epoch hook (``on_epoch_start`` / ``on_epoch_end``) may know: never the trainer."""

    epoch: int  # 0-based: the epoch about to start (on_epoch_start) or just finished (on_epoch_end)
    device: torch.device = torch.device("cpu")  # where the method's parameters live
    seed: int = 0  # train.seed
    run_dir: Path = Path(".")  # the run's folder (checkpoints, CYBORGS' mask rounds)
    dist: DistContext = DistContext()  # rank / world size; files are written by dist.is_main only


class SSLMethod(nn.Module, abc.ABC):
    """Base class: subclasses set ``Config`` (a frozen dataclass), receive their view generator
    (``self.views``: the views of one batch, with their provenance; ``cropbench views`` draws them)
    and implement ``training_step`` (views -> loss). None overrides ``make_views``."""

    Config: ClassVar[type]
    modality: ClassVar[str] = "image"
    # How BatchNorm statistics are shared between processes, declared per method as its official
    # code does it (the trainer reads it; each subclass cites its source): "sync" = SyncBN over all
    # processes (global BN), "shuffle" = MoCo's shuffle-BN for the key encoder and per-process BN
    # elsewhere, "local" = per-process BN. On CPU (gloo) torch has no SyncBN: "sync" runs local.
    batchnorm: ClassVar[str] = "local"
    # Whether some steps leave trainable parameters without a gradient (VideoMoCo's frame generator
    # before ``adversarial_from``): DDP then walks each step's autograd graph to find them, a cost
    # the other methods skip (tests/test_ddp.py trains every registered method under DDP).
    ddp_find_unused_parameters: ClassVar[bool] = False
    # The view generator a recipe gets when its ``params.views`` names none (every entry names
    # one; short test recipes and overrides rely on this): the generator the method's paper uses.
    default_views: ClassVar[str] = "pair"

    def __init__(self, cfg: Any, backbone: nn.Module, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.ctx = ctx

    # The view generator (``cropbench.views.generators``): the one the recipe's ``params.views``
    # names, built by ``build_method`` and passed in; methods hold no view settings. Each concrete
    # method's ``__init__`` takes ``views`` and registers it last (the state-dict order).
    views: ViewGenerator

    @property
    def encoder(self) -> nn.Module:
        """The backbone that evaluations receive (the online / query encoder)."""
        return self.backbone

    def make_views(self, batch: Any, generator: torch.Generator) -> list[View]:
        """The views of ``batch`` (tensors + provenance), drawn from ``generator``: the generator's."""
        return self.views(batch, generator)

    @abc.abstractmethod
    def training_step(self, batch: Any, step: int, generator: torch.Generator) -> StepOutput:
        """One optimisation step's loss (and logs) on ``batch``."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (momentum updates)."""

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Called before each epoch (e.g. CYBORGS regenerates masks here)."""

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Called after each epoch; returned scalars go to the epoch log: by default the view
        generator's (e.g. ParamCrop's cube IoU)."""
        return self.views.epoch_logs(ctx.dist)

    @property
    def epoch_curves(self) -> tuple[EpochCurve, ...]:
        """Per-epoch plots, as data (e.g. ParamCrop's view IoU curve), the view generator's: the
        trainer has ``cropbench.viewplot`` draw each from the epoch logs ``on_epoch_end`` returns."""
        return self.views.epoch_curves

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        """Wrap the training dataset if the method needs more per sample (CYBORGS adds masks).

        Called once, before the first epoch; it must keep the number of samples (the schedule
        length, ``ctx.steps_per_epoch``, is computed from it before the method is built). The
        trainer collates with ``dataset.collate`` when the dataset has one, else ``collate_images``.
        """
        return dataset

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group lr (SimSiam fixed predictor lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def groups_apart(self, module: nn.Module, **options: Any) -> list[dict[str, Any]]:
        """Two parameter groups: every other trainable parameter, then ``module``'s with ``options``
        (``fixed_lr``, ``lr_scale``, ``grad_scale``: cropbench.optim applies them)."""
        own = list(module.parameters())
        ids = {id(p) for p in own}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": own, **options}]
