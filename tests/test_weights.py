"""cropbench.weights: strict, code-free loading of released checkpoints into our encoders.

Each release layout is rebuilt from the real model definitions (torchvision ResNets / video
ResNets wrapped the way the official code wraps them; random values), saved in the release's
container, converted, loaded with ``strict=True``, and compared tensor by tensor (bit-exact).
Layouts, from the official code:

* MoCo v2: facebookresearch/moco@c567ee4:moco/builder.py (encoder_q / encoder_k / queue,
  ``mlp`` fc = Sequential(Linear, ReLU, Linear)), main_moco.py (DDP ``module.``; checkpoint
  ``{"epoch", "arch", "state_dict", "optimizer"}``), main_lincls.py (keeps ``module.encoder_q``
  minus ``fc``).
* SimSiam: facebookresearch/simsiam@a7bc177:simsiam/builder.py (encoder with a 3-layer fc
  projector, ``predictor``), main_simsiam.py, main_lincls.py (keeps ``module.encoder`` minus fc).
* DenseCL / RegionCL (OpenSelfSup): WXinlong/DenseCL@b64bbb6:openselfsup/models/densecl.py
  (``encoder_q = Sequential(backbone, neck)``, ``self.backbone = encoder_q[0]``, queue, queue2),
  Annbless/RegionCL@61bbcab:openselfsup/models/RegionCLM.py (same, one queue), and both repos'
  tools/extract_backbone_weights.py (``{"state_dict": backbone, "author": ...}``).
* VideoMoCo: tinapan-pt/VideoMoCo@42e069a:moco/builder.py (MoCo around
  ``torchvision.models.video.<arch>``), train.py (netD ``{"epoch", "arch", "state_dict"}``).
* detectron2: facebookresearch/moco@c567ee4:detection/convert-pretrain-to-detectron2.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from cropbench.backbones import build_backbone
from cropbench.errors import CheckpointError
from cropbench.export import detectron2_name, save_detectron2
from cropbench.weights import (
    WeightsError,
    detect_format,
    load_external,
    load_external_encoder,
    torchvision_name,
)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter and buffer (BN statistics and counters included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randint(0, 1000, t.shape, generator=g))
    return module


def ddp(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """DistributedDataParallel's state-dict names."""
    return {f"module.{k}": v for k, v in sd.items()}


class MoCo(nn.Module):
    """The key layout of MoCo's builder (moco/builder.py): two encoders with an mlp fc, a queue."""

    def __init__(self, base: Any, dim: int = 128, k: int = 16, mlp: bool = True, share_k: bool = False):
        super().__init__()
        self.encoder_q = base(num_classes=dim)
        self.encoder_k = self.encoder_q if share_k else base(num_classes=dim)
        if mlp:
            for enc in {id(self.encoder_q): self.encoder_q, id(self.encoder_k): self.encoder_k}.values():
                d = enc.fc.weight.shape[1]
                enc.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), enc.fc)
        self.register_buffer("queue", torch.randn(dim, k))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


class SimSiam(nn.Module):
    """simsiam/builder.py: encoder whose fc is the 3-layer projector, and a 2-layer predictor."""

    def __init__(self, base: Any, dim: int = 64, pred_dim: int = 16):
        super().__init__()
        self.encoder = base(num_classes=dim, zero_init_residual=True)
        d = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
            self.encoder.fc, nn.BatchNorm1d(dim, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(), nn.Linear(pred_dim, dim)
        )


def openselfsup_backbone(base: Any) -> nn.Module:
    """OpenSelfSup's ResNet: torchvision names (norm_cfg BN -> ``bn1``..), no fc."""
    m = base()
    del m.fc
    return m


class DenseCL(nn.Module):
    """openselfsup/models/densecl.py: encoder_q/k = Sequential(backbone, DenseCLNeck), backbone
    aliasing encoder_q[0], two queues."""

    def __init__(self, base: Any, dim: int = 16, k: int = 8):
        super().__init__()

        def neck() -> nn.Module:
            n = nn.Module()
            n.mlp = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, dim))
            n.mlp2 = nn.Sequential(nn.Conv2d(512, 32, 1), nn.ReLU(), nn.Conv2d(32, dim, 1))
            return n

        self.encoder_q = nn.Sequential(openselfsup_backbone(base), neck())
        self.encoder_k = nn.Sequential(openselfsup_backbone(base), neck())
        self.backbone = self.encoder_q[0]
        for name in ("queue", "queue2"):
            self.register_buffer(name, torch.randn(dim, k))
            self.register_buffer(f"{name}_ptr", torch.zeros(1, dtype=torch.long))


def moco_to_detectron2(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """Independent reference: MoCo's convert-pretrain-to-detectron2.py rules, as string replaces."""
    model = {}
    for k, v in state_dict.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[k] = v.numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def prefixed(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def count(sd: dict[str, Any], prefix: str) -> int:
    return sum(k.startswith(prefix) for k in sd)


# ----------------------------------------------------------------------------------------------
# The release files (built once per module)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Tensor], dict[str, int]]]:
    """name -> (file, expected backbone tensors (torchvision names), expected dropped groups)."""
    root = tmp_path_factory.mktemp("releases")
    out = {}
    r18 = torchvision.models.resnet18

    moco = randomize(MoCo(r18), 1).state_dict()
    sd = ddp(moco)
    torch.save(  # 2020 releases predate torch's zip format: write the legacy container
        {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
        root / "moco_v2.pth.tar",
        _use_new_zipfile_serialization=False,
    )
    backbone = {k: v for k, v in prefixed(sd, "module.encoder_q.").items() if not k.startswith("fc.")}
    drops = {"module.encoder_k.*": count(sd, "module.encoder_k."), "module.encoder_q.fc.*": 4, "module.queue*": 2}
    out["mocov2"] = (root / "moco_v2.pth.tar", backbone, drops)

    with open(root / "moco_v2.d2.pkl", "wb") as f:
        pickle.dump(moco_to_detectron2(sd), f)
    out["detectron2"] = (root / "moco_v2.d2.pkl", backbone, {"stem.fc.*": 4})

    sd = ddp(randomize(SimSiam(r18), 2).state_dict())
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd}, root / "simsiam.pth.tar")
    backbone = {k: v for k, v in prefixed(sd, "module.encoder.").items() if not k.startswith("fc.")}
    drops = {
        "module.encoder.fc.*": count(sd, "module.encoder.fc."),
        "module.predictor.*": count(sd, "module.predictor."),
    }
    out["simsiam"] = (root / "simsiam.pth.tar", backbone, drops)

    sd = randomize(DenseCL(r18), 3).state_dict()
    meta = {"epoch": 200, "iter": 1000, "mmcv_version": "1.0.3", "time": "Thu Dec 30 2021"}
    torch.save({"meta": meta, "state_dict": sd, "optimizer": {"state": {}}}, root / "densecl_epoch_200.pth")
    backbone = prefixed(sd, "backbone.")
    drops = {"encoder_k.*": count(sd, "encoder_k."), "encoder_q.*": count(sd, "encoder_q."), "queue*": 4}
    out["openselfsup"] = (root / "densecl_epoch_200.pth", backbone, drops)

    torch.save({"state_dict": backbone, "author": "DenseCL"}, root / "densecl_r18_extracted.pth")
    out["openselfsup_backbone"] = (root / "densecl_r18_extracted.pth", backbone, {})

    sd = randomize(r18(), 4).state_dict()
    torch.save(sd, root / "resnet18-supervised.pth")
    out["torchvision"] = (
        root / "resnet18-supervised.pth",
        {k: v for k, v in sd.items() if "fc." not in k},
        {"fc.*": 2},
    )

    timm = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    timm |= {"head.fc.weight": sd["fc.weight"], "head.fc.bias": sd["fc.bias"]}
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": timm, "version": 2}, root / "timm.pth.tar")
    out["timm"] = (root / "timm.pth.tar", {k: v for k, v in sd.items() if "fc." not in k}, {"head.*": 2})
    return out


@pytest.mark.parametrize(
    "fmt", ["mocov2", "simsiam", "openselfsup", "openselfsup_backbone", "torchvision", "timm", "detectron2"]
)
def test_release_layout_loads_bit_exact(releases: dict, fmt: str) -> None:
    path, expected, drops = releases[fmt]
    state, prov = load_external(path, "resnet18")
    enc = build_backbone("resnet18")
    enc.load_state_dict(state, strict=True)
    got = enc.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        ref = torch.as_tensor(v)
        assert got[k].dtype == ref.dtype and torch.equal(got[k], ref), k
    assert prov.format == fmt and prov.format_source == "auto"
    assert prov.dropped == drops and prov.n_dropped == sum(drops.values())
    assert prov.file == path.name and prov.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov.filled == () and prov.cast == {} and prov.mapping.startswith(f"{fmt}: ")
    json.dumps(prov.to_dict())  # auto worked: detect_format raises when two signatures match


def test_explicit_format_overrides_detection(releases: dict) -> None:
    path, expected, _ = releases["torchvision"]  # a timm ResNet with 'fc' has the same layout
    state, prov = load_external(path, "resnet18", format="timm")
    assert prov.format == "timm" and prov.format_source == "explicit"
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    _, prov = load_external(releases["openselfsup"][0], "resnet18", format="regioncl")
    assert prov.format == "openselfsup" and prov.format_source == "explicit"
    with pytest.raises(
        WeightsError, match=r"250 keys are neither backbone keys .*simsiam: module\.encoder_k\.bn1\.bias"
    ):
        load_external(releases["mocov2"][0], "resnet18", format="simsiam")  # wrong layout: keys listed
    with pytest.raises(WeightsError, match="unknown weights format 'mocov3'.*valid: auto, cropbench"):
        load_external(path, "resnet18", format="mocov3")


def test_resnet50_torchvision_supervised(tmp_path: Path) -> None:
    """The supervised row: torchvision ResNet-50's layout (zip container, fc dropped)."""
    sd = randomize(torchvision.models.resnet50(), 5).state_dict()
    torch.save(sd, tmp_path / "resnet50-supervised.pth")
    state, prov = load_external(tmp_path / "resnet50-supervised.pth", "resnet50")
    enc = build_backbone("resnet50")
    enc.load_state_dict(state, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in enc.state_dict().items())
    assert len(state) == len(sd) - 2 and prov.dropped == {"fc.*": 2}


def test_videomoco_r2plus1d(tmp_path: Path) -> None:
    """VideoMoCo's netD checkpoint around torchvision's R(2+1)D-18 maps onto our r2plus1d_18.

    encoder_k shares encoder_q's tensors here (as at MoCo's initialisation) to keep the file small;
    that the momentum encoder is dropped rather than loaded is tested on the MoCo v2 layout."""
    base = torchvision.models.video.r2plus1d_18
    sd = ddp(randomize(MoCo(base, mlp=False, share_k=True), 6).state_dict())
    torch.save({"epoch": 200, "arch": "r2plus1d_18", "state_dict": sd}, tmp_path / "netD.pth.tar")
    state, prov = load_external(tmp_path / "netD.pth.tar", "r2plus1d_18")
    enc = build_backbone("r2plus1d_18")
    enc.load_state_dict(state, strict=True)
    assert all(torch.equal(v, sd[f"module.encoder_q.{k}"]) for k, v in enc.state_dict().items())
    assert prov.format == "videomoco" and prov.dropped["module.encoder_q.fc.*"] == 2


def test_videomoco_other_architecture_is_refused(tmp_path: Path) -> None:
    """A VideoMoCo file of another architecture: named by its 'arch' entry, else by its keys."""
    micro = randomize(build_backbone("r3d_micro", conv="2plus1d"), 11).state_dict()
    sd = {f"module.encoder_q.{k}": v for k, v in micro.items()} | {"module.queue": torch.ones(2, 4)}
    path = _save(tmp_path / "netD.pth.tar", {"epoch": 1, "arch": "r2plus1d_18", "state_dict": sd})
    with pytest.raises(WeightsError, match="holds a 'r2plus1d_18' backbone.*'r3d_micro'.*architectures differ"):
        load_external(path, "r3d_micro", {"conv": "2plus1d"})
    path = _save(tmp_path / "no_arch.pth.tar", {"epoch": 1, "state_dict": sd})  # no 'arch': the keys decide
    with pytest.raises(
        WeightsError,
        match=r"r2plus1d_18 encoder; backbone keys \d+ missing: layer1\.1\.conv1\.0\.0\.weight.*wrong shapes: "
        r"layer1\.0\.conv1\.0\.0\.weight \(36, 16, 1, 3, 3\) \(expected \(144, 64, 1, 3, 3\)\)",
    ):
        load_external(path, "r2plus1d_18")
    state, prov = load_external(path, "r3d_micro", {"conv": "2plus1d"})
    assert (
        prov.format == "videomoco" and prov.dropped == {"module.queue*": 1} and "module.encoder_q.<key>" in prov.mapping
    )
    assert all(torch.equal(state[k], v) for k, v in micro.items())


def test_cropbench_checkpoint(tmp_path: Path) -> None:
    enc = randomize(build_backbone("resnet_micro"), 7)
    blob = {"epoch": 1, "encoder": enc.state_dict(), "backbone": "resnet_micro", "backbone_args": {}, "method": {}}
    torch.save(blob, tmp_path / "checkpoint.pt")
    loaded, prov = load_external_encoder(tmp_path / "checkpoint.pt", "resnet_micro")
    assert prov.format == "cropbench" and prov.n_dropped == 0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(WeightsError, match="holds a 'resnet_micro' backbone.*'resnet18'"):
        load_external(tmp_path / "checkpoint.pt", "resnet18")


def test_two_keys_for_one_backbone_key_is_an_error(tmp_path: Path) -> None:
    enc = build_backbone("resnet_micro")
    blob = {"model": {detectron2_name(k): v.numpy() for k, v in enc.state_dict().items()}}
    blob["model"]["conv1.weight"] = blob["model"]["stem.conv1.weight"]  # already a torchvision name
    (tmp_path / "dup.pkl").write_bytes(pickle.dumps(blob))
    with pytest.raises(WeightsError, match=r"two keys map to the backbone key conv1\.weight"):
        load_external(tmp_path / "dup.pkl", "resnet_micro")


# ----------------------------------------------------------------------------------------------
# detectron2: the inverse of our export
# ----------------------------------------------------------------------------------------------


def test_detectron2_names_invert_our_export() -> None:
    keys = list(torchvision.models.resnet50().state_dict())
    keys = [k for k in keys if not k.startswith("fc.")]
    assert [torchvision_name(detectron2_name(k)) for k in keys] == keys
    # hand-written pairs (MoCo's conversion rules)
    assert torchvision_name("stem.conv1.norm.running_var") == "bn1.running_var"
    assert torchvision_name("res5.2.conv3.norm.bias") == "layer4.2.bn3.bias"
    assert torchvision_name("res2.0.shortcut.weight") == "layer1.0.downsample.0.weight"
    assert torchvision_name("res3.0.shortcut.norm.weight") == "layer2.0.downsample.1.weight"


def test_detectron2_export_roundtrip(tmp_path: Path) -> None:
    enc = randomize(build_backbone("resnet_micro"), 8)
    out = save_detectron2(enc.state_dict(), tmp_path / "ours.d2.pkl")
    state, prov = load_external(out, "resnet_micro")
    assert prov.format == "detectron2"
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())


def test_detectron2_without_bn_counters_fills_and_reports(tmp_path: Path) -> None:
    """detectron2's own converted files carry no num_batches_tracked: filled with 0, reported."""
    enc = randomize(build_backbone("resnet_micro"), 9)
    sd = {k: v for k, v in enc.state_dict().items() if not k.endswith("num_batches_tracked")}
    blob = {"model": {detectron2_name(k): v.numpy() for k, v in sd.items()}, "__author__": "torchvision"}
    (tmp_path / "r.pkl").write_bytes(pickle.dumps(blob, protocol=5))
    state, prov = load_external(tmp_path / "r.pkl", "resnet_micro")
    counters = [k for k in enc.state_dict() if k.endswith("num_batches_tracked")]
    assert prov.filled == tuple(counters) and all(int(state[k]) == 0 for k in counters)
    assert all(torch.equal(state[k], v) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------
# Strictness: every problem is an error naming the keys
# ----------------------------------------------------------------------------------------------


def micro_moco() -> dict[str, Tensor]:
    """A MoCo v2 state dict (no DDP wrapper) around our resnet_micro: small and fast."""

    def micro(num_classes: int) -> nn.Module:
        m = build_backbone("resnet_micro")
        m.fc = nn.Linear(m.feat_dim, num_classes)
        return m

    return randomize(MoCo(micro), 10).state_dict()


def _moco_variant(tmp_path: Path, edit: Any) -> Path:
    """The DDP-wrapped micro MoCo v2 release, checked to load, then edited by ``edit``."""
    sd = ddp(micro_moco())
    state, _ = load_external(_save(tmp_path / "ok.pth.tar", {"state_dict": sd}), "resnet_micro")
    assert all(torch.equal(v, sd[f"module.encoder_q.{k}"]) for k, v in state.items())  # unedited: loads
    edit(sd)
    return _save(tmp_path / "edited.pth.tar", {"state_dict": sd})


def test_without_ddp_wrapper(tmp_path: Path) -> None:
    """Single-process MoCo runs save 'encoder_q.*' without 'module.' (facebookresearch/moco issue #84);
    a DataParallel-saved supervised model has 'module.conv1.weight', ...: both load."""
    sd = micro_moco()
    state, prov = load_external(_save(tmp_path / "moco.pth.tar", {"state_dict": sd}), "resnet_micro")
    assert all(torch.equal(v, sd[f"encoder_q.{k}"]) for k, v in state.items())
    assert prov.format == "mocov2" and prov.mapping.startswith("mocov2: encoder_q.<key>")
    assert set(prov.dropped) == {"encoder_k.*", "encoder_q.fc.*", "queue*"}
    sup = ddp({k: v for k, v in sd.items() if k.startswith("encoder_k.")})
    sup = {k.replace("module.encoder_k.", "module."): v for k, v in sup.items()}
    state, prov = load_external(_save(tmp_path / "dp.pth", sup), "resnet_micro")
    assert prov.format == "torchvision" and prov.dropped == {"module.fc.*": 4}
    assert all(torch.equal(v, sd[f"encoder_k.{k}"]) for k, v in state.items())


def _save(path: Path, blob: Any) -> Path:
    torch.save(blob, path)
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = _moco_variant(tmp_path, lambda sd: sd.pop("module.encoder_q.layer3.0.bn2.running_mean"))
    with pytest.raises(
        WeightsError, match=r"edited\.pth\.tar does not fit .* 1 missing: layer3\.0\.bn2\.running_mean$"
    ):
        load_external(path, "resnet_micro")


def test_unknown_backbone_key_is_named(tmp_path: Path) -> None:
    path = _moco_variant(tmp_path, lambda sd: sd.update({"module.encoder_q.layer4.1.conv1.weight": torch.ones(1)}))
    with pytest.raises(WeightsError, match=r"1 unexpected: layer4\.1\.conv1\.weight$"):
        load_external(path, "resnet_micro")


def test_unknown_non_backbone_key_is_named(tmp_path: Path) -> None:
    path = _moco_variant(tmp_path, lambda sd: sd.update({"module.predictor.0.weight": torch.ones(1)}))
    with pytest.raises(WeightsError, match=r"1 keys are neither backbone keys .*mocov2: module\.predictor\.0\.weight$"):
        load_external(path, "resnet_micro")


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    path = _moco_variant(tmp_path, lambda sd: sd.update({"module.encoder_q.conv1.weight": torch.ones(16, 3, 7, 7)}))
    with pytest.raises(
        WeightsError, match=r"1 with wrong shapes: conv1\.weight \(16, 3, 7, 7\) \(expected \(16, 3, 3, 3\)\)$"
    ):
        load_external(path, "resnet_micro")


def test_openselfsup_duplicate_backbone_must_agree(releases: dict, tmp_path: Path) -> None:
    blob = torch.load(releases["openselfsup"][0], weights_only=True)
    blob["state_dict"]["encoder_q.0.layer1.0.conv1.weight"] = (
        blob["state_dict"]["encoder_q.0.layer1.0.conv1.weight"] + 1
    )
    torch.save(blob, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match=r"backbone\.\* and encoder_q\.0\.\* differ.*layer1\.0\.conv1\.weight"):
        load_external(tmp_path / "x.pth", "resnet18")


def test_unrecognised_file_lists_keys_and_formats(tmp_path: Path) -> None:
    torch.save({"net": {"blocks.0.weight": torch.ones(1)}, "step": 3}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"formats tried: cropbench, mocov2, .*detectron2.*\[net, step\]"):
        load_external(tmp_path / "other.pth", "resnet18")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_external(tmp_path / "absent.pth", "resnet18")
    torch.save({"a": torch.ones(3)}, tmp_path / "t.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "t.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable"):
        load_external(tmp_path / "cut.pth", "resnet18")
    (tmp_path / "notes.pkl").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pkl: not a readable pickle"):
        load_external(tmp_path / "notes.pkl", "resnet18")
    objarr = {"model": {"stem.conv1.weight": np.array(["a", 1], dtype=object)}}
    (tmp_path / "obj.pkl").write_bytes(pickle.dumps(objarr))
    with pytest.raises(WeightsError, match="stem.conv1.weight is a ndarray, expected a tensor or numeric"):
        load_external(tmp_path / "obj.pkl", "resnet18")


# ----------------------------------------------------------------------------------------------
# Safety: a malicious pickle never runs
# ----------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(target, "w"): the file appearing means code ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self) -> tuple:
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned_pkl"
    blob = {"model": {"stem.conv1.weight": np.zeros(1)}, "__author__": Payload(target)}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(blob))
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused: .*(io|builtins)\.open"):
        load_external(tmp_path / "evil.pkl", "resnet18")
    assert not target.exists()
    pickle.loads((tmp_path / "evil.pkl").read_bytes()).get("__author__").close()  # the payload is live:
    assert target.exists()  # a plain unpickler runs it


def test_malicious_torch_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned_pt"
    for name, zipped in (("evil.pth", True), ("evil_legacy.pth.tar", False)):
        blob = {"state_dict": {"module.encoder_q.conv1.weight": torch.ones(1)}, "arch": Payload(target)}
        torch.save(blob, tmp_path / name, _use_new_zipfile_serialization=zipped)
        with pytest.raises(CheckpointError, match=rf"{name}: refused: .*open"):
            load_external(tmp_path / name, "resnet18")
        assert not target.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)["arch"].close()  # the payload is live
    assert target.exists()


def test_detect_format_on_bare_objects() -> None:
    with pytest.raises(WeightsError, match="a list, not a dict"):
        detect_format([1, 2])


def test_half_precision_release_is_cast_and_reported(tmp_path: Path) -> None:
    sd = {
        k: v.half() if v.is_floating_point() else v
        for k, v in randomize(build_backbone("resnet_micro"), 12).state_dict().items()
    }
    state, prov = load_external(_save(tmp_path / "fp16.pth", sd), "resnet_micro", format="torchvision")
    n_float = sum(v.is_floating_point() for v in sd.values())
    assert prov.cast == {"float16 -> float32": n_float}
    assert all(
        state[k].dtype == torch.float32 and torch.equal(state[k], v.float())
        for k, v in sd.items()
        if v.is_floating_point()
    )


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> Path:
    """Independent writer from the safetensors spec (huggingface/safetensors README: u64 LE header
    length, JSON header {name: {dtype, shape, data_offsets}}, raw little-endian C-order bytes)."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


def test_safetensors_hub_weights(tmp_path: Path) -> None:
    """timm's hub weights (model.safetensors): a bare state dict with torchvision names and 'fc'."""
    m = randomize(build_backbone("resnet_micro"), 13)
    m.fc = randomize(nn.Linear(128, 10), 14)
    sd = m.state_dict()
    state, prov = load_external(write_safetensors(tmp_path / "model.safetensors", sd), "resnet_micro")
    assert prov.format == "torchvision" and prov.dropped == {"fc.*": 2}  # timm's ResNet layout is torchvision's
    assert all(torch.equal(state[k], v) for k, v in sd.items() if not k.startswith("fc."))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        load_external(tmp_path / "cut.safetensors", "resnet_micro")
