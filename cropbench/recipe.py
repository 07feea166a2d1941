"""Benchmark entries and recipes: ``benchmarks/<entry>/entry.yaml`` validated into frozen dataclasses.

An entry holds the paper, its variants, recipes per scale (``base`` + ``micro``/``small``/``paper``
overrides, then per-variant overrides, then CLI ``--set`` overrides), the evaluations it supports,
reference numbers with their source, and claims. ``Entry.recipe(variant, scale)`` resolves one
``Recipe``; the method's own ``Config`` dataclass validates ``recipe.params`` and each
evaluation's ``Settings`` validates ``recipe.eval[name]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cropbench.config import deep_merge, from_dict, to_dict
from cropbench.errors import ConfigError, UnknownNameError

SCALES = ("micro", "small", "paper")
Scale = Literal["micro", "small", "paper"]
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synth_images"  # registered dataset name; micro uses the embedded synthetic set
    image_size: int = 64  # side of the canvas that views are cut from (loader resizes to it)
    num_workers: int = 0  # decode workers; 0 keeps micro runs single-process and deterministic
    train_split: str = "train"
    limit: int | None = None  # use only the first N training samples (debugging, smoke tests)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = 0.05  # base lr at ``base_batch`` (linear scaling rule, as MoCo/SimSiam)
    base_batch: int = 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()  # epochs at which 'step' multiplies lr by 0.1
    exclude_bias_norm: bool = False  # LARS-style: no weight decay / adaptation on bias and norm params
    trust_coefficient: float = 0.001  # LARS only


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # CUDA only
    log_every: int = 10
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    grad_clip: float | None = None


@dataclass(frozen=True)
class Recipe:
    method: str  # METHODS registry name
    backbone: str  # BACKBONES registry name
    backbone_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    params: dict[str, Any] = field(default_factory=dict)  # validated by the method's Config
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-evaluation settings
    deviations: dict[str, str] = field(default_factory=dict)  # key path -> why it departs from the paper

    def to_dict(self) -> dict:
        return to_dict(self)

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Paper:
    title: str
    arxiv: str
    code: str = ""  # official code URL ('' when none was released)
    venue: str = ""
    authors: str = ""


@dataclass(frozen=True)
class Reference:
    """A number the paper (or its official repo) reports, or a committed micro golden's tolerance."""

    eval: str
    metric: str
    value: float
    source: str  # where the number comes from (table, README@commit, log)
    variant: str = "default"
    scale: Scale = "paper"
    tolerance: float = 1.0  # absolute, in the metric's units
    note: str = ""


@dataclass(frozen=True)
class Claim:
    """'variant beats baseline on eval/metric by >= min_delta' at a scale."""

    text: str
    eval: str
    metric: str
    baseline: str  # "entry" or "entry/variant"
    variant: str = "default"
    min_delta: float = 0.0
    scale: Scale = "paper"
    source: str = ""


@dataclass(frozen=True)
class Variant:
    description: str = ""
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # 'base' and/or scale overrides


@dataclass(frozen=True)
class Entry:
    name: str
    paper: Paper
    description: str
    modality: Literal["image", "video"] = "image"
    evaluations: tuple[str, ...] = ()
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # 'base' + one per scale
    variants: dict[str, Variant] = field(default_factory=lambda: {"default": Variant()})
    references: tuple[Reference, ...] = ()
    claims: tuple[Claim, ...] = ()
    notes: str = ""
    path: str = ""  # set by the loader

    def variant_names(self) -> list[str]:
        return list(self.variants)

    def raw_recipe(self, variant: str = "default", scale: str = "micro", overrides: dict | None = None) -> dict:
        if variant not in self.variants:
            raise UnknownNameError(f"variant of {self.name}", variant, list(self.variants))
        if scale not in SCALES:
            raise UnknownNameError("scale", scale, list(SCALES))
        v = self.variants[variant]
        merged: dict = {}
        for layer in (
            self.recipes.get("base"),
            self.recipes.get(scale),
            v.recipes.get("base"),
            v.recipes.get(scale),
            overrides,
        ):
            merged = deep_merge(merged, layer or {})
        return merged

    def recipe(self, variant: str = "default", scale: str = "micro", overrides: dict | None = None) -> Recipe:
        where = f"{self.path} (variant {variant!r}, scale {scale!r})"
        return from_dict(Recipe, self.raw_recipe(variant, scale, overrides), where)


def parse_entry(data: Any, path: str) -> Entry:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    entry = from_dict(Entry, {**data, "path": path}, path)
    for key in entry.recipes:
        if key not in ("base", *SCALES):
            raise ConfigError(f"{path}: recipes.{key}: unknown scale; expected base, {', '.join(SCALES)}")
    for name, v in entry.variants.items():
        for key in v.recipes:
            if key not in ("base", *SCALES):
                raise ConfigError(f"{path}: variants.{name}.recipes.{key}: unknown scale")
    for i, ref in enumerate(entry.references):
        if ref.variant not in entry.variants:
            raise ConfigError(
                f"{path}: references[{i}].variant: {ref.variant!r} is not a variant ({', '.join(entry.variants)})"
            )
    return entry


def load_entry_file(path: Path) -> Entry:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    entry = parse_entry(data, str(path))
    if entry.name != path.parent.name:
        raise ConfigError(f"{path}: name: {entry.name!r} must match its folder name {path.parent.name!r}")
    return entry


def list_entries(root: Path = BENCHMARKS_DIR) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/entry.yaml"))


def load_entry(name: str, root: Path = BENCHMARKS_DIR) -> Entry:
    path = root / name / "entry.yaml"
    if not path.exists():
        raise UnknownNameError("entry", name, list_entries(root))
    return load_entry_file(path)


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict:
    """``["train.epochs=3", "optim.lr=0.1"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out
