"""The trainer's data loader: the order is a function of (seed, epoch) only, built once per fit with
persistent workers that see each epoch (``set_epoch``), and the same numbers at any worker count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.recipe import Recipe
from cropbench.runner import build_method, build_train_set, method_context
from cropbench.trainer import EpochSampler, Trainer

TINY = {
    "method": "simclr",
    "backbone": "resnet_micro",
    "backbone_args": {"widths": [8, 8, 16, 16]},
    "data": {"image_size": 32, "limit": 48},
    "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2, "log_every": 1},
    "optim": {"lr": 0.1, "base_batch": 16, "warmup_epochs": 0.5},
    "params": {"views": {"size": 16}, "hidden_dim": 32, "out_dim": 16},
}


def test_single_process_order_is_the_seeded_permutation_of_each_epoch() -> None:
    """Today's order, by hand: ``torch.randperm(n)`` from a generator seeded ``seed * 10007 + epoch``,
    cut to the samples the epoch's steps use."""
    s = EpochSampler(50, seed=3, dist=DistContext(), limit=32)
    for epoch in (0, 1, 5):
        s.set_epoch(epoch)
        want = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 10_007 + epoch))[:32].tolist()
        assert list(s) == [(epoch, i) for i in want]
        assert len(s) == 32
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_each_rank_gets_its_distributed_sampler_shard() -> None:
    seen = []
    for rank in range(2):
        s = EpochSampler(50, seed=3, dist=DistContext(rank, 2), limit=24)
        s.set_epoch(4)
        ref = DistributedSampler(range(50), 2, rank, shuffle=True, seed=3, drop_last=True)
        ref.set_epoch(4)
        assert list(s) == [(4, i) for i in list(ref)[:24]]
        seen += [i for _, i in s]
    assert len(set(seen)) == 48  # the shards are disjoint


class EpochTagged(Dataset):
    """Samples that say which epoch the dataset was set to when they were read (a video dataset's
    ``set_epoch`` changes its clips in the same way), in whichever process read them."""

    def __init__(self, n: int):
        self.n, self.epoch = n, -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.epoch, i

    @staticmethod
    def collate(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return items


def _trainer(tmp_path: Path, data_root: Path, dataset: Any = None, **data: Any) -> Trainer:
    recipe = from_dict(Recipe, {**TINY, "data": {**TINY["data"], **data}})
    ds = build_train_set(recipe, data_root) if dataset is None else dataset
    method = build_method(recipe, method_context(recipe, len(ds), DistContext()))
    return Trainer(method, ds, recipe, tmp_path, torch.device("cpu"), quiet=True)


def _epochs(tr: Trainer, n: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """The samples of n epochs, and the id of each epoch's loader and worker iterator."""
    out, ids = [], []
    for epoch in range(n):
        loader = tr._loader(epoch)
        out.append([item for batch in loader for item in batch])
        ids.append((id(loader), id(loader._iterator)))
    return out, ids


def test_persistent_workers_are_built_once_and_see_every_epoch(tmp_path: Path, data_root: Path) -> None:
    tr = _trainer(tmp_path, data_root, EpochTagged(40), num_workers=2, prefetch_factor=3)
    got, ids = _epochs(tr, 3)
    assert len(set(ids)) == 1  # one loader, one set of workers, for all epochs
    assert tr._data.persistent_workers and tr._data.prefetch_factor == 3
    ref = _trainer(tmp_path / "w0", data_root, EpochTagged(40), num_workers=0)
    want, _ = _epochs(ref, 3)
    for epoch in range(3):
        assert got[epoch] == want[epoch]  # the same samples in the same order as in one process
        assert {e for e, _ in got[epoch]} == {epoch} and len(got[epoch]) == 32
    # a method with an on_epoch_start hook may change its dataset (CYBORGS' masks): rebuilt each epoch
    hooked = _trainer(tmp_path / "hook", data_root, EpochTagged(40), num_workers=2)
    hooked._epoch_hook = True
    got_hooked, ids_hooked = _epochs(hooked, 2)
    assert got_hooked == got[:2] and len(set(ids_hooked)) == 2 and not hooked._data.persistent_workers


@pytest.mark.slow
def test_worker_count_does_not_change_the_numbers(tmp_path: Path, data_root: Path) -> None:
    """2 epochs of SimCLR on the embedded data: the same losses and weights with 2 persistent
    workers as in one process (the micro goldens run with num_workers 0)."""
    runs = []
    for nw in (0, 2):
        tr = _trainer(tmp_path / f"nw{nw}", data_root, num_workers=nw)
        runs.append((tr.fit(), [p.detach().clone() for p in tr.method.parameters()]))
    (a, wa), (b, wb) = runs
    assert (a.loss_first, a.loss_last) == (b.loss_first, b.loss_last)
    assert all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_prefetch_factor_is_validated() -> None:
    from cropbench.errors import ConfigError
    from cropbench.recipe import check_ranges

    with pytest.raises(ConfigError, match="data.prefetch_factor: expected an integer >= 1, got 0"):
        check_ranges(from_dict(Recipe, {**TINY, "data": {"prefetch_factor": 0}}), "test")
