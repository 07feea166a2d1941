"""A smoke test generated from the registry: every entry and variant pretrains a few steps on the
embedded data with its own micro recipe (shrunk), through the real dataset, method and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cropbench.dist import DistContext
from cropbench.recipe import list_entries, load_entry
from cropbench.runner import pretrain_local

CASES = [(e, v) for e in list_entries() for v in load_entry(e).variants]


@pytest.mark.parametrize(("entry", "variant"), CASES, ids=[f"{e}/{v}" for e, v in CASES])
def test_entry_pretrains_on_embedded_data(entry: str, variant: str, tmp_path: Path, data_root: Path) -> None:
    e = load_entry(entry)
    micro = e.recipe(variant, "micro")
    batch = min(micro.train.batch_size, 16)
    recipe = e.recipe(
        variant,
        "micro",
        {"train": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": batch}, "data": {"limit": 4 * batch}},
    )
    method, result = pretrain_local(recipe, tmp_path, data_root, torch.device("cpu"), DistContext(), False, True, entry)
    assert result.steps == 2
    assert torch.isfinite(torch.tensor([result.loss_first, result.loss_last])).all()
    feats = method.encoder.eval()(_probe_input(method))
    assert feats.shape[-1] == method.encoder.feat_dim and torch.isfinite(feats).all()


def _probe_input(method: torch.nn.Module) -> torch.Tensor:
    if getattr(method.encoder, "modality", "image") == "video":
        return torch.randn(2, 3, 4, 32, 32)
    return torch.randn(2, 3, 32, 32)
