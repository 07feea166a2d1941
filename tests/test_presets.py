"""Evaluation protocol presets (issue 11, item 3): each protocol is written once, in its evaluation
module (``presets=`` of ``register_evaluation``), and entries name it
(``eval: {coco: {preset: paper}}``, plus overrides) instead of copying the block.

``data/resolved_eval_settings.json`` is the resolved ``recipe.eval`` of every entry x variant x
scale, frozen from git HEAD dd0a9a3 before the presets existed (the eleven copied blocks); a variant
added since (vsupervised, mocov2/asymmetric) is added with the settings it resolves to, which for
mocov2/asymmetric equal mocov2/default's (the variant changes no evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.errors import ConfigError
from cropbench.evaluations import coco, voc
from cropbench.evaluations.base import register_evaluation
from cropbench.recipe import BENCHMARKS_DIR, SCALES, list_entries, load_entry, resolve_presets
from cropbench.registry import EVALUATIONS

BEFORE = json.loads((Path(__file__).parent / "data" / "resolved_eval_settings.json").read_text())


def test_resolved_eval_settings_are_unchanged_for_every_entry_variant_and_scale() -> None:
    now = {}
    for name in list_entries():
        entry = load_entry(name)
        for variant in entry.variant_names():
            for scale in SCALES:
                now[f"{name}/{variant}/{scale}"] = entry.recipe(variant, scale).eval
    assert sorted(now) == sorted(BEFORE)
    for key, settings in now.items():
        assert settings == BEFORE[key], key


def test_a_preset_is_the_base_and_keys_next_to_it_override_it() -> None:
    got = resolve_presets({"coco": {"preset": "paper", "lr": 0.01}, "knn": {"k": 20}}, "here")
    assert got["coco"] == {**coco.PAPER, "lr": 0.01} and got["knn"] == {"k": 20}
    assert coco.PAPER["lr"] == 0.02  # the preset itself is not modified
    got["coco"]["steps"].append(1)
    assert coco.PAPER["steps"] == [60000, 80000]  # a resolved recipe holds its own copy


def test_set_overrides_a_preset_value_and_can_choose_a_preset() -> None:
    densecl = load_entry("densecl")
    paper = densecl.recipe("default", "paper", {"eval": {"voc": {"iterations": 10}}}).eval["voc"]
    assert paper == {**voc.PAPER, "iterations": 10}
    micro = densecl.recipe("default", "micro", {"eval": {"coco": {"preset": "paper"}}}).eval["coco"]
    assert micro == coco.PAPER


def test_an_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"here: eval\.coco\.preset: unknown preset 'papr'; valid presets of coco: micro, paper$"
    ):
        resolve_presets({"coco": {"preset": "papr"}}, "here")
    with pytest.raises(
        ConfigError, match=r"eval\.knn\.preset: unknown preset 'paper'; valid presets of knn: cifar10, imagenet"
    ):
        load_entry("simclr").recipe("default", "paper", {"eval": {"knn": {"preset": "paper"}}})


def test_a_preset_that_does_not_validate_fails_at_registration() -> None:
    @dataclass(frozen=True)
    class Settings:
        dataset: str = "x"
        lr: float = 0.1

    with pytest.raises(ConfigError, match=r"evaluation 'probe': presets\.paper\.lrr: unknown key"):
        register_evaluation("probe", Settings, presets={"paper": {"lrr": 0.2}})


def _eval_blocks(data: dict) -> list[tuple[str, str, dict]]:
    """Every ``eval.<name>`` block written in an entry file (all scales, all variants)."""
    layers = list(data.get("recipes", {}).values())
    layers += [r for v in (data.get("variants") or {}).values() for r in (v.get("recipes") or {}).values()]
    return [(name, str(block), block) for layer in layers for name, block in (layer.get("eval") or {}).items()]


def test_no_entry_copies_a_preset() -> None:
    """A block that holds every value of one of its evaluation's presets (3+ keys) is a copy."""
    copies = []
    for path in sorted(BENCHMARKS_DIR.glob("*/entry.yaml")):
        for name, text, block in _eval_blocks(yaml.safe_load(path.read_text())):
            for preset, values in EVALUATIONS.get(name).presets.items():
                if len(values) >= 3 and all(block.get(k) == v for k, v in values.items()):
                    copies.append(f"{path.parent.name}: eval.{name} copies preset {preset!r}: {text}")
    assert not copies, "\n".join(copies)


def test_the_copy_detector_finds_a_copy() -> None:
    """The test above can fail: a block pasted from the coco preset is found."""
    data = {"recipes": {"paper": {"eval": {"coco": dict(coco.PAPER), "voc": {"preset": "paper"}}}}}
    found = [(n, b) for n, _, b in _eval_blocks(data) if all(b.get(k) == v for k, v in coco.PAPER.items())]
    assert [n for n, _ in found] == ["coco"]


def test_show_full_names_the_preset_and_prints_the_resolved_values() -> None:
    result = CliRunner().invoke(cli, ["show", "regioncl", "--full"])
    assert result.exit_code == 0, result.output
    paper = result.output.split("[paper]")[1]
    assert "eval presets: knn=imagenet, linear=imagenet, coco=paper, voc=paper, cityscapes=paper" in paper
    assert "iterations: 90000" in paper and "batch_size: 1024" in paper  # resolved values, override included
