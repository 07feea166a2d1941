"""Shuffle-BN for the MoCo family and the per-method BatchNorm declarations.

References (facts carried over, not code):
* MoCo's multi-GPU shuffle-BN: facebookresearch/moco@3631be0:moco/builder.py
  (``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``: gather, permute drawn on rank 0 and
  broadcast, per-GPU BatchNorm, gather back with the inverse permutation).
* Its single-GPU emulation: facebookresearch/moco@f736491:colab/moco_cifar10_demo.ipynb
  (``SplitBatchNorm``, ``--bn-splits 8``: BN statistics per split of the batch; "ShuffleBN
  (without which loses 4% at 800 epochs)").
* Who uses SyncBN: google-research/simclr@383d414:run.py (``global_bn`` True),
  google-deepmind/deepmind-research@3d8692e:byol/configs/byol.py (``cross_replica_axis``),
  facebookresearch/simsiam@a7bc177:main_simsiam.py (``convert_sync_batchnorm``),
  renwang435/CYBORGS@5737d31:main_cyborgs.py (``convert_sync_batchnorm``),
  google-deepmind/brave@1ae5f0a:brave/models/brave/modules.py (``cross_replica_axis``);
  shuffle-BN, no SyncBN: WXinlong/DenseCL@b64bbb6:openselfsup/models/densecl.py,
  Annbless/RegionCL@758a00a:openselfsup/models/RegionCLM.py,
  tinapan-pt/VideoMoCo@0ed0a13:moco/builder.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.config import from_dict
from cropbench.dist import DistContext, init_process_group, shutdown
from cropbench.errors import ConfigError
from cropbench.methods import mocov2 as mocov2_module
from cropbench.methods.base import BATCHNORM_MODES, MethodContext
from cropbench.methods.momentum import shuffle_bn_forward, split_bn_forward
from cropbench.registry import BACKBONES, METHODS
from cropbench.runner import build_generator, method_from_params
from cropbench.trainer import convert_batchnorm
from cropbench.types import ImageBatch, VideoBatch

EPS = 1e-5  # nn.BatchNorm default


class TinyKeyNet(nn.Module):
    """conv -> BN2d -> ReLU -> mean pool -> linear -> BN1d: BatchNorm in a backbone and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        with torch.no_grad():  # non-trivial affine parameters
            for bn in (self.bn2, self.bn1):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn2(self.conv(x))).mean(dim=(2, 3))
        return self.bn1(self.fc(h))


def naive_forward(net: TinyKeyNet, x: Tensor) -> Tensor:
    """The same network written with functional ops, BN from the batch ``x`` alone (training)."""
    h = F.conv2d(x, net.conv.weight, net.conv.bias, padding=1)
    h = F.batch_norm(h, None, None, net.bn2.weight, net.bn2.bias, training=True, eps=EPS)
    h = F.linear(F.relu(h).mean(dim=(2, 3)), net.fc.weight, net.fc.bias)
    return F.batch_norm(h, None, None, net.bn1.weight, net.bn1.bias, training=True, eps=EPS)


def naive_grouped(net: TinyKeyNet, x: Tensor, groups: list[Tensor]) -> Tensor:
    """Each sample's output computed from its own group's batch, written back to its row."""
    out = torch.empty(x.shape[0], net.fc.out_features)
    for rows in groups:
        out[rows] = naive_forward(net, x[rows])
    return out


def _inputs(n: int, seed: int = 0) -> Tensor:
    """Rows whose statistics differ by position (a scale ramp), so group statistics differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g) * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)


# ------------------------------------------------------------------ split-BN emulation


@pytest.mark.parametrize(("n", "groups"), [(12, 3), (7, 3), (8, 1)])
@torch.no_grad()
def test_split_bn_equals_batchnorm_per_split_computed_naively(n: int, groups: int) -> None:
    net, x = TinyKeyNet().train(), _inputs(n)
    got = split_bn_forward(net, x, groups)
    splits = list(torch.arange(n).tensor_split(groups))  # sizes differ by at most one
    # measured: bit-identical over 60 seeded cases here; 1e-5 absorbs another CPU's reduction order
    torch.testing.assert_close(got, naive_grouped(net, x, splits), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_split_bn_differs_from_plain_bn_when_group_statistics_differ() -> None:
    net, x = TinyKeyNet().train(), _inputs(12)
    plain, split = net(x), split_bn_forward(net, x, 3)
    # the first and last rows differ in scale by 15x: their groups' statistics are far apart
    assert (plain - split).abs().max() > 0.3


def test_split_bn_rejects_groups_of_one_sample_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"params\.shuffle_bn_splits.*batch of 6.*8 BatchNorm groups"):
        split_bn_forward(TinyKeyNet().train(), _inputs(6), 8)
    with pytest.raises(ConfigError, match=r"params\.shuffle_bn_splits.*multiple of --nproc 2.*got 3"):
        shuffle_bn_forward(nn.Identity(), _inputs(6), DistContext(0, 2), torch.Generator(), 3)


# ------------------------------------------------------------------ one process: shuffle + split


@torch.no_grad()
def test_one_process_shuffle_bn_groups_a_random_permutation_and_undoes_it() -> None:
    net, x, n, groups = TinyKeyNet().train(), _inputs(12), 12, 3
    got = shuffle_bn_forward(net, x, DistContext(), torch.Generator().manual_seed(5), groups)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))  # the same draw
    expected = naive_grouped(net, x, list(perm.tensor_split(groups)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # rows in the original order
    assert not torch.allclose(got, split_bn_forward(net, x, groups), atol=1e-3)  # really shuffled
    # a per-sample function comes back exactly, in order, for tuples of outputs too
    a, b = shuffle_bn_forward(lambda t: (t * 10, t.flatten(1).sum(1)), x, DistContext(), torch.Generator(), 4)
    assert torch.equal(a, x * 10) and torch.equal(b, x.flatten(1).sum(1))


# ------------------------------------------------------------------ every MoCo-family key encoder

MOCO_FAMILY = ("mocov2", "densecl", "houghcl", "regioncl_m", "regioncl_d", "vmoco", "videomoco")
SYNC = ("simclr", "byol", "simsiam", "cyborgs", "regioncl_s", "vsimclr", "vbyol")  # ParamCrop: a generator on these


def test_every_method_declares_its_batchnorm_as_its_official_code() -> None:
    for name in METHODS.names():
        assert METHODS.get(name).batchnorm in BATCHNORM_MODES, name
    assert {n: METHODS.get(n).batchnorm for n in MOCO_FAMILY} == dict.fromkeys(MOCO_FAMILY, "shuffle")
    assert {n: METHODS.get(n).batchnorm for n in (*SYNC, "brave")} == dict.fromkeys((*SYNC, "brave"), "sync")


def _tiny(name: str, splits: int) -> nn.Module:
    cls = METHODS.get(name)
    params = {"hidden_dim": 16, "out_dim": 8, "queue_size": 32, "shuffle_bn_splits": splits}
    if cls.modality == "image":
        view = {"size": 32, "blur_p": 0.0}
        params |= {"views": {"views": view, "cells": [1, 2]} if name.startswith("regioncl") else view}
        params |= {"dense_hidden_dim": 16} if "dense_hidden_dim" in cls.Config.__dataclass_fields__ else {}
        backbone = BACKBONES.get("resnet_micro")(widths=(8, 8, 8, 16))
    else:
        params |= {"drop": 2, "adversarial_from": 0.0} if name == "videomoco" else {}
        backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 8, 16))
    torch.manual_seed(0)
    return method_from_params(name, params, backbone, MethodContext(steps_per_epoch=2, epochs=2, batch_size=8))


def _batch(modality: str, n: int = 8) -> ImageBatch | VideoBatch:
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        images = torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8, generator=g)
        return ImageBatch(images, torch.zeros(n, dtype=torch.long), torch.arange(n))
    video = torch.randint(0, 256, (n, 3, 32, 40, 40), dtype=torch.uint8, generator=g)
    return VideoBatch(video, torch.arange(n), torch.arange(n), looped=torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize("name", MOCO_FAMILY)
def test_every_moco_family_key_forward_runs_under_shuffle_bn(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's keys (and DenseCL's dense key outputs) come from one shuffle-BN key forward
    with the configured splits, and equal the key network run group by group on that permutation."""
    m = _tiny(name, splits=2).train()
    calls: list[tuple[int, Tensor]] = []

    def spy(fn, x, dist_ctx, generator, splits):  # type: ignore[no-untyped-def]
        calls.append((splits, x))
        return shuffle_bn_forward(fn, x, dist_ctx, generator, splits)

    monkeypatch.setattr(mocov2_module, "shuffle_bn_forward", spy)
    out = m.training_step(_batch(m.modality), 1, torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss) and len(calls) == 1 and calls[0][0] == 2
    # on that key view, the keys equal the key network run on each half of the permuted batch
    x = calls[0][1]  # the step's key view
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        if hasattr(m, "dense"):
            k = m.dense.encode_key(m, x, g)  # global, dense grid, pooled dense and C5: one forward
            keys, want = k.emb, [torch.empty_like(t) for t in (k.emb, k.grid, k.pooled, k.c5)]
            for r in perm.tensor_split(2):
                o = m.dense.heads(m.key_backbone.forward_stages(x[r])[-1], m.key_projector, m.dense.key_head)
                for w, t in zip(want, (o.emb, o.grid, o.pooled, o.c5), strict=True):
                    w[r] = t
            want_emb = want[0]
            for got, w in zip((k.grid, k.pooled, k.c5), want[1:], strict=True):
                torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)
        else:
            keys = m.encode_key(x, g)
            want_emb = torch.empty_like(keys)
            for r in perm.tensor_split(2):
                want_emb[r] = F.normalize(m.key_projector(m.key_backbone(x[r])), dim=1)
        torch.testing.assert_close(keys, want_emb, atol=1e-5, rtol=1e-4)


def test_splits_1_is_plain_batchnorm_over_the_key_batch() -> None:
    m = _tiny("mocov2", splits=1).train()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        plain = F.normalize(m.key_projector(m.key_backbone(x)), dim=1)
        assert torch.equal(m.encode_key(x, torch.Generator()), plain)
        split = _tiny("mocov2", splits=4).train().encode_key(x, torch.Generator().manual_seed(0))
    assert (split - plain).abs().max() > 1e-3  # groups of 2 normalise differently


def test_too_many_splits_for_the_processes_is_an_error_at_construction() -> None:
    cls = METHODS.get("mocov2")
    cfg = from_dict(cls.Config, {"hidden_dim": 8, "out_dim": 4, "queue_size": 8, "shuffle_bn_splits": 3})
    backbone = BACKBONES.get("resnet_micro")(widths=(8, 8, 8, 16))
    with pytest.raises(ConfigError, match=r"shuffle_bn_splits.*--nproc 2"):
        cls(cfg, backbone, MethodContext(DistContext(0, 2)), build_generator("mocov2"))


# ------------------------------------------------------------------ the trainer's SyncBN choice


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_trainer_uses_syncbn_only_for_methods_whose_official_code_does(capsys: pytest.CaptureFixture) -> None:
    """convert_sync_batchnorm only swaps modules, so the CUDA decision is testable on CPU."""
    cuda, two = torch.device("cuda"), DistContext(0, 2)

    def siam() -> nn.Module:
        cls, backbone = METHODS.get("simsiam"), BACKBONES.get("resnet_micro")(widths=(8, 8, 8, 16))
        return cls(
            from_dict(cls.Config, {"dim": 16, "pred_dim": 8}), backbone, MethodContext(), build_generator("simsiam")
        )

    n_bn = _count(siam(), nn.BatchNorm2d) + _count(siam(), nn.BatchNorm1d)
    assert _count(convert_batchnorm(_tiny("mocov2", 2), cuda, two, True), nn.SyncBatchNorm) == 0  # shuffle-BN
    assert _count(convert_batchnorm(siam(), cuda, DistContext(), True), nn.SyncBatchNorm) == 0  # one process
    assert _count(convert_batchnorm(siam(), cuda, two, True), nn.SyncBatchNorm) == n_bn > 0
    # on CPU (gloo) torch has no SyncBN: BatchNorm stays per process, and the run says so
    cpu_siam = siam()
    assert convert_batchnorm(cpu_siam, torch.device("cpu"), two, False) is cpu_siam
    assert _count(cpu_siam, nn.SyncBatchNorm) == 0
    assert "no SyncBN on CPU" in capsys.readouterr().err


# ------------------------------------------------------------------ two processes (gloo)

WORLD, LOCAL, SPLITS = 2, 6, 4  # 2 BN groups of 3 per process


def _worker(rank: int, out_dir: str) -> None:
    ctx = init_process_group("gloo", rank, WORLD, str(Path(out_dir) / "store"))
    torch.set_num_threads(1)
    try:
        x = _inputs(WORLD * LOCAL)[rank * LOCAL : (rank + 1) * LOCAL]
        net = TinyKeyNet().train()
        gen = torch.Generator().manual_seed(100 + rank)  # rank 0's permutation is broadcast
        with torch.no_grad():
            keys = shuffle_bn_forward(net, x, ctx, gen, SPLITS)
            own = shuffle_bn_forward(lambda t: t * 10, x, ctx, torch.Generator().manual_seed(7 + rank), SPLITS)
        torch.save({"keys": keys, "own": own, "x": x}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)


def test_two_process_shuffle_bn_gives_every_sample_its_own_key(tmp_path: Path) -> None:
    # fork: the workers need nothing the parent has not imported (spawn would re-import torchvision)
    mp.start_processes(_worker, (str(tmp_path),), nprocs=WORLD, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x = torch.cat([r["x"] for r in ranks])
    for r in ranks:  # a per-sample key encoder: each sample gets its own output back, in order
        assert torch.equal(r["own"], r["x"] * 10)
    # BN groups: rank r takes perm.view(W, -1)[r] of the global batch (rank 0's draw), 2 groups each
    perm = torch.randperm(WORLD * LOCAL, generator=torch.Generator().manual_seed(100))
    groups = [rows for shard in perm.view(WORLD, -1) for rows in shard.tensor_split(SPLITS // WORLD)]
    assert (perm.view(WORLD, -1)[0] >= LOCAL).any()  # rank 0 normalised some of rank 1's samples
    expected = naive_grouped(TinyKeyNet().train(), x, groups)
    torch.testing.assert_close(torch.cat([r["keys"] for r in ranks]), expected, atol=1e-5, rtol=1e-5)
