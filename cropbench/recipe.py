"""Benchmark entries and recipes: ``benchmarks/<entry>/entry.yaml`` validated into frozen dataclasses.

An entry holds the paper, its variants, recipes per scale (``base`` + ``micro``/``small``/``paper``
overrides, then per-variant overrides, then CLI ``--set`` overrides), the evaluations it supports,
reference numbers with their source, and claims. ``Entry.recipe(variant, scale)`` resolves one
``Recipe``; the method's own ``Config`` dataclass validates ``recipe.params`` and each
evaluation's ``Settings`` validates ``recipe.eval[name]``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cropbench.config import deep_merge, from_dict, to_dict
from cropbench.errors import ConfigError, UnknownNameError
from cropbench.registry import EVALUATIONS

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
    prefetch_factor: int = 2  # batches each worker loads ahead (num_workers > 0; torch's default)


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
    nesterov: bool = False  # SGD / LARS: Nesterov momentum (BraVe's optax.lars: nesterov=True)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # image models in NHWC: cuDNN (CUDA) and oneDNN (CPU) run convs faster
    log_every: int = 10
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    grad_clip: float | None = None
    compile: bool = False  # torch.compile the method's backbone and heads while it trains


# Settings that change speed, never the trained weights: left out of ``Recipe.pretrain_hash`` so a
# run can be resumed with them changed (and checkpoints written before they existed still resume).
RUNTIME_ONLY = (("train", "compile"), ("data", "prefetch_factor"))


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
        """Identity of the whole recipe (records): sha256 of its sorted JSON, 16 hex digits."""
        return _hash(self.to_dict())

    def pretrain_hash(self) -> str:
        """Identity of the pretrained weights (checkpoints, ``--resume``): the recipe without
        ``eval`` (evaluation settings), ``deviations`` (notes) and the ``RUNTIME_ONLY`` speed
        settings, which do not change training; so fixing an evaluation setting, or turning
        ``train.compile`` on, can resume from the pretrained checkpoint."""
        data = {k: v for k, v in self.to_dict().items() if k not in ("eval", "deviations")}
        for section, key in RUNTIME_ONLY:  # speed settings (torch.compile, prefetching)
            data[section].pop(key)
        return _hash(data)


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: v is not None and math.isfinite(v) and v >= lo


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
# key path -> (test, what is expected): ranges the dataclass types cannot say, checked on every
# resolved recipe so that a bad value is an error naming it before anything runs
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train.epochs": (_at_least(1), "an integer >= 1"),
    "train.batch_size": (_at_least(1), "an integer >= 1"),
    "train.log_every": (_at_least(1), "an integer >= 1"),
    "train.max_steps_per_epoch": (_optional(_at_least(1)), "null (no cap) or an integer >= 1"),
    "train.grad_clip": (_optional(_POSITIVE[0]), "null (no clipping) or a number > 0"),
    "optim.lr": _POSITIVE,
    "optim.base_batch": (_at_least(1), "an integer >= 1"),
    "optim.weight_decay": (_at_least(0), "a number >= 0"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.warmup_epochs": (_at_least(0), "a number >= 0"),
    "optim.trust_coefficient": _POSITIVE,
    "data.image_size": (_at_least(1), "an integer >= 1"),
    "data.num_workers": (_at_least(0), "an integer >= 0"),
    "data.prefetch_factor": (_at_least(1), "an integer >= 1"),
    "data.limit": (_optional(_at_least(1)), "null (all samples) or an integer >= 1"),
}


def check_ranges(recipe: Recipe, where: str) -> Recipe:
    """``ConfigError`` naming the first key of ``RANGES`` whose value is out of range."""
    for path, (test, expected) in RANGES.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key)
        if not test(value):
            raise ConfigError(f"{where}: {path}: expected {expected}, got {value!r}")
    return recipe


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
class Related:
    """Another method's published number, shown next to an entry for context (``cropbench show``).

    Not a reference: ``check`` never compares records with it (a reference must be the paper's
    own number, or absent)."""

    method: str  # e.g. "PixPro 100 ep"
    eval: str
    metric: str
    value: float
    source: str
    scale: Scale = "paper"
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
    related: tuple[Related, ...] = ()  # other methods' numbers, context only: never checked
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
        raw = self.raw_recipe(variant, scale, overrides)
        if "eval" in raw:
            raw["eval"] = resolve_presets(raw["eval"], where)
        return check_ranges(from_dict(Recipe, raw, where), where)

    def eval_presets(self, variant: str = "default", scale: str = "micro") -> dict[str, str]:
        """The preset each evaluation's settings start from at this variant and scale (``show``)."""
        section = self.raw_recipe(variant, scale).get("eval") or {}
        return {k: v[PRESET] for k, v in section.items() if isinstance(v, dict) and PRESET in v}


PRESET = "preset"  # eval.<name>.preset: a named protocol of that evaluation (its ``presets``)


def resolve_presets(section: Any, where: str) -> Any:
    """``eval.<name>: {preset: P, **keys}`` -> evaluation ``name``'s preset P with ``keys`` on top.

    The preset is the base of that evaluation's settings; keys written next to it, in any recipe
    layer (base, scale, variant, ``--set``), override it. An unknown preset is a ``ConfigError``
    listing the evaluation's presets."""
    if not isinstance(section, dict):
        return section  # from_dict reports the bad type
    return {name: _resolve_preset(name, settings, where) for name, settings in section.items()}


def _resolve_preset(name: str, settings: Any, where: str) -> Any:
    if not isinstance(settings, dict) or PRESET not in settings:
        return settings
    presets = EVALUATIONS.get(name).presets
    chosen = settings[PRESET]
    if not isinstance(chosen, str) or chosen not in presets:
        listed = ", ".join(sorted(presets)) or "(none)"
        raise ConfigError(f"{where}: eval.{name}.preset: unknown preset {chosen!r}; valid presets of {name}: {listed}")
    rest = {k: v for k, v in settings.items() if k != PRESET}
    return deep_merge(copy.deepcopy(presets[chosen]), rest)


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


def parse_value(raw: str) -> Any:
    """A ``--set`` value as a user writes it: integers (``-1``, ``1_000``) and finite floats
    (``1e-3``, ``1E-3``, ``.5``) by Python's number syntax (YAML 1.1 reads ``1e-3`` as text);
    anything else as a YAML scalar or list (``true``, ``null``, ``[0.2, 1.0]``, ``cosine``)."""
    text = raw.strip()
    for number in (int, float):
        try:
            value = number(text)
        except ValueError:
            continue
        if math.isfinite(value):
            return value
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set value {raw!r} is neither a number nor valid YAML: {e}") from e


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict:
    """``["train.epochs=3", "optim.lr=1e-3"]`` -> nested dict (values by ``parse_value``)."""
    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.epochs=2")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} was already set to a value")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"--set {item!r}: {key} is a section with keys set by other --set options")
        node[parts[-1]] = parse_value(raw)
    return out


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 1}}`` -> ``{"train.epochs": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        path = f"{prefix}{k}"
        out.update(flatten(v, path + ".") if isinstance(v, dict) and v else {path: v})
    return out
