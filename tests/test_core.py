"""Recipe schema, strict config conversion, registries and every committed entry's recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cropbench.config import from_dict
from cropbench.errors import ConfigError, UnknownNameError
from cropbench.recipe import SCALES, list_entries, load_entry, load_entry_file, parse_overrides
from cropbench.registry import BACKBONES, EVALUATIONS, METHODS, Registry
from cropbench.runner import resolved_config


@dataclass(frozen=True)
class Inner:
    k: int
    t: float = 0.1


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    sizes: tuple[int, ...] = ()
    opt: dict[str, float] = field(default_factory=dict)


def test_from_dict_converts_nested_and_ints_to_float() -> None:
    o = from_dict(Outer, {"name": "a", "inner": {"k": 3, "t": 1}, "sizes": [1, 2]})
    assert o == Outer("a", Inner(3, 1.0), (1, 2))
    assert isinstance(o.inner.t, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "inner": {"k": 3, "kk": 1}}, "f.yaml: inner.kk: unknown key; valid keys of Inner: k, t"),
        ({"name": "a", "inner": {"k": "3"}}, "f.yaml: inner.k: expected an integer, got str '3'"),
        ({"name": "a", "inner": {"t": 0.2}}, "f.yaml: inner.k: missing required field (int)"),
        ({"name": "a", "inner": {"k": 1}, "sizes": [1, "x"]}, "f.yaml: sizes[1]: expected an integer"),
        ({"name": "a", "inner": {"k": True}}, "inner.k: expected an integer, got bool True"),
    ],
)
def test_from_dict_errors_name_file_key_path_and_expectation(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, "f.yaml")
    assert message in str(e.value)


def test_registry_rejects_duplicates_and_lists_valid_names() -> None:
    reg: Registry = Registry("widget")
    reg.add("a", object)
    with pytest.raises(ValueError, match="duplicate widget name 'a'"):
        reg.add("a", object)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; valid widgets: a"):
        reg.get("b")


def test_registries_hold_the_core_names() -> None:
    assert {"resnet18", "resnet50", "resnet_micro"} <= set(BACKBONES.names())
    assert {"simclr", "mocov2", "byol", "simsiam"} <= set(METHODS.names())
    assert {"knn", "linear"} <= set(EVALUATIONS.names())


def test_unknown_entry_lists_entries() -> None:
    with pytest.raises(UnknownNameError) as e:
        load_entry("nope")
    assert "simclr" in str(e.value)


def _minimal_entry(tmp_path: Path, **over: object) -> Path:
    data = {
        "name": "toy",
        "paper": {"title": "T", "arxiv": "0000.00000"},
        "description": "d",
        "evaluations": ["knn"],
        "recipes": {"base": {"method": "simclr", "backbone": "resnet_micro"}},
    }
    data.update(over)
    path = tmp_path / "toy" / "entry.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_entry_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = _minimal_entry(tmp_path, recipes={"base": {"method": "simclr", "backbone": "resnet_micro", "trian": {}}})
    entry = load_entry_file(path)
    with pytest.raises(ConfigError) as e:
        entry.recipe("default", "micro")
    assert str(path) in str(e.value) and "trian: unknown key" in str(e.value)


def test_entry_rejects_unknown_scale_and_unknown_variant(tmp_path: Path) -> None:
    path = _minimal_entry(tmp_path, recipes={"huge": {}})
    with pytest.raises(ConfigError, match="recipes.huge: unknown scale"):
        load_entry_file(path)
    entry = load_entry_file(_minimal_entry(tmp_path / "b"))
    with pytest.raises(UnknownNameError, match="valid variants of toy: default"):
        entry.recipe("x", "micro")


def test_overrides_layer_base_scale_variant_cli(tmp_path: Path) -> None:
    path = _minimal_entry(
        tmp_path,
        recipes={
            "base": {"method": "simclr", "backbone": "resnet_micro", "train": {"epochs": 5, "batch_size": 64}},
            "micro": {"train": {"epochs": 2}},
        },
        variants={"v": {"recipes": {"micro": {"train": {"batch_size": 32}}}}},
    )
    entry = load_entry_file(path)
    r = entry.recipe("v", "micro", parse_overrides(["optim.lr=0.5"]))
    assert (r.train.epochs, r.train.batch_size, r.optim.lr) == (2, 32, 0.5)
    assert entry.recipe("v", "paper").train.epochs == 5
    assert r.hash() != entry.recipe("v", "micro").hash()


@pytest.mark.parametrize("name", list_entries())
def test_every_entry_validates_at_every_scale(name: str) -> None:
    """Recipes, method configs and evaluation settings of every committed entry are valid."""
    entry = load_entry(name)
    assert entry.evaluations, f"{name} lists no evaluations"
    for variant in entry.variants:
        for scale in SCALES:
            recipe = entry.recipe(variant, scale)
            where = f"{entry.path} ({variant}, {scale})"
            resolved_config(recipe, where)  # the method's Config and the generator's it names
            assert recipe.backbone in BACKBONES
            for ev in entry.evaluations:
                evaluation = EVALUATIONS.get(ev)
                assert evaluation.modality == entry.modality
                from_dict(evaluation.Settings, recipe.eval.get(ev, {}), where, f"eval.{ev}")
            if scale != "micro":
                assert recipe.deviations or scale == "paper", (
                    f"{name}/{variant}/{scale}: a non-paper recipe states no deviations"
                )
    for ref in entry.references:
        assert ref.source, f"{name}: reference {ref} has no source"
