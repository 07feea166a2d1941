"""Checkpoint export: detectron2 names against MoCo's conversion rules, torchvision round trip."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision

from cropbench.backbones import resnet18, resnet50, resnet_micro
from cropbench.errors import CropbenchError
from cropbench.export import (
    backbone_state_dict,
    export_checkpoint,
    to_detectron2,
    to_torchvision,
)


def moco_reference_name(k: str) -> str:
    """The renaming of facebookresearch/moco detection/convert-pretrain-to-detectron2.py."""
    old_k = k
    if "layer" not in k:
        k = "stem." + k
    for t in [1, 2, 3, 4]:
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    assert old_k != k
    return k


def _trainer_checkpoint(tmp_path, encoder, name):
    path = tmp_path / "ckpt.pth"
    torch.save(
        {
            "encoder": encoder.state_dict(),
            "backbone": name,
            "backbone_args": {},
            "epoch": 3,
            "recipe": {"method": "simclr"},
            "method": {},
            "optimizer": {},
        },
        path,
    )
    return path


@pytest.mark.parametrize("build,name", [(resnet50, "resnet50"), (resnet18, "resnet18"), (resnet_micro, "resnet_micro")])
def test_detectron2_export_matches_moco_conversion(tmp_path, build, name):
    torch.manual_seed(0)
    enc = build()
    out = export_checkpoint(_trainer_checkpoint(tmp_path, enc, name), "detectron2")
    with open(out, "rb") as f:
        blob = pickle.load(f)
    assert blob["matching_heuristics"] is True and blob["__author__"] == "cropbench"
    sd = enc.state_dict()
    expected = {moco_reference_name(k): v for k, v in sd.items()}
    assert set(blob["model"]) == set(expected)
    for k, v in expected.items():
        assert isinstance(blob["model"][k], np.ndarray)
        np.testing.assert_array_equal(blob["model"][k], v.numpy())


def test_detectron2_names_hand_checked():
    sd = resnet50().state_dict()
    d2 = to_detectron2(sd)
    for tv, dn in [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer1.0.downsample.1.bias", "res2.0.shortcut.norm.bias"),
        ("layer4.2.conv3.weight", "res5.2.conv3.weight"),
        ("layer3.5.bn2.weight", "res4.5.conv2.norm.weight"),
    ]:
        np.testing.assert_array_equal(d2[dn], sd[tv].numpy())


def test_torchvision_export_loads_into_torchvision_resnet(tmp_path):
    torch.manual_seed(0)
    enc = resnet18()
    for m in enc.modules():  # non-trivial BN statistics so a mix-up would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    out = export_checkpoint(_trainer_checkpoint(tmp_path, enc, "resnet18"), "torchvision", tmp_path / "tv.pth")
    tv = torchvision.models.resnet18()
    res = tv.load_state_dict(torch.load(out), strict=False)
    assert set(res.missing_keys) == {"fc.weight", "fc.bias"} and not res.unexpected_keys
    enc.eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = torch.flatten(
        tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))),
        1,
    )
    torch.testing.assert_close(enc(x), feats)


def test_moco_style_checkpoint(tmp_path):
    enc = resnet18()
    sd = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    sd["module.encoder_q.fc.0.weight"] = torch.zeros(4, 512)  # projection head: dropped
    sd.update({f"module.encoder_k.{k}": v + 1 for k, v in enc.state_dict().items() if v.is_floating_point()})
    sd["module.queue"] = torch.zeros(128, 16)
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    out = export_checkpoint(path, "torchvision")
    got = torch.load(out)
    assert set(got) == set(enc.state_dict())
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(got[k], v)


def test_bare_state_dict_and_prefix_strip():
    sd = resnet_micro().state_dict()
    assert set(to_torchvision(backbone_state_dict(sd))) == set(sd)
    assert set(backbone_state_dict({f"module.{k}": v for k, v in sd.items()})) == set(sd)


def test_unmappable_keys_fail_loudly_naming_them():
    sd = dict(resnet_micro().state_dict())
    sd["layer1.0.se.fc1.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(1)
    with pytest.raises(CropbenchError, match=r"head\.weight.*layer1\.0\.se\.fc1\.weight"):
        to_detectron2(sd)
    partial = {k: v for k, v in resnet_micro().state_dict().items() if not k.startswith("layer4")}
    with pytest.raises(CropbenchError, match="layer4"):
        to_torchvision(partial)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(CropbenchError, match="not found"):
        export_checkpoint(tmp_path / "nope.pth", "torchvision")
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, path)
    with pytest.raises(CropbenchError, match="no backbone weights found.*epoch"):
        export_checkpoint(path, "torchvision")
    with pytest.raises(CropbenchError, match="unknown export format 'onnx'"):
        export_checkpoint(path, "onnx")
