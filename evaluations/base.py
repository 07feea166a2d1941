"""IMPORT AS ``cropbench.evaluations.*`` (never ``evaluations.*``: the folder installs as cropbench.evaluations).

The one signature every evaluation has: ``evaluate(encoder, settings, data) -> dict[str, float]``.

* ``encoder``: the pretrained backbone (a ``ResNetBackbone`` or a video backbone); evaluations
  that fine-tune deep-copy it first, frozen protocols put it in ``eval()`` mode.
* ``settings``: the evaluation's own frozen ``Settings`` dataclass, validated from the recipe's
  ``eval.<name>`` section (protocol hyper-parameters, dataset name).
* ``data``: an ``EvalData`` — where the data lives and the runtime (device, cache, seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.registry import EVALUATIONS


@dataclass(frozen=True)
class EvalData:
    root: Path  # data root (the dataset's folder is resolved from it by the DATASETS registry)
    device: torch.device = torch.device("cpu")
    cache_dir: Path | None = None  # where cached features may be written (None: no caching)
    seed: int = 0
    num_workers: int = 0
    scale: str = "micro"
    dist: DistContext = DistContext()
    log: Callable[[str], None] = print


EvaluateFn = Callable[[nn.Module, Any, EvalData], dict[str, float]]


@dataclass(frozen=True)
class Evaluation:
    name: str
    Settings: type  # frozen dataclass; must have a ``dataset: str`` field
    evaluate: EvaluateFn
    modality: str = "image"  # "image" or "video": which backbones it accepts
    description: str = ""
    metrics: tuple[str, ...] = field(default_factory=tuple)  # metric names it reports, main first
    # named protocols (``paper``: the papers' setting) an entry selects with ``eval.<name>.preset``
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


def register_evaluation(
    name: str,
    settings: type,
    modality: str = "image",
    metrics: tuple[str, ...] = (),
    presets: dict[str, dict[str, Any]] | None = None,
) -> Callable[[EvaluateFn], EvaluateFn]:
    """Decorator: ``@register_evaluation("knn", KnnSettings, metrics=("top1",), presets={...})``.
    Each preset must validate as ``settings`` (checked here, at import)."""
    for preset, values in (presets or {}).items():
        from_dict(settings, values, f"evaluation {name!r}", f"presets.{preset}")

    def deco(fn: EvaluateFn) -> EvaluateFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        ev = Evaluation(name, settings, fn, modality, doc[0] if doc else "", metrics, dict(presets or {}))
        EVALUATIONS.add(name, ev)
        return fn

    return deco
