"""The detectron2 backend of ``coco`` / ``voc`` (``evaluations/detectron2_backend.py``).

The backend choice and its errors are tested everywhere; the rest needs detectron2 itself, which is
not on PyPI: those tests skip unless it is installed (``tox -e detectron2`` and ``.ci/run`` build it
from ``../shared/vendor/detectron2-02b5c4e2.tar.gz``). Facts checked against detectron2@02b5c4e2
(``checkpoint/c2_model_loading.py`` name matching, ``modeling/backbone/resnet.py``) and MoCo's
conversion (facebookresearch/moco@5df3287:detection/convert-pretrain-to-detectron2.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cropbench.backbones import build_backbone
from cropbench.config import from_dict
from cropbench.errors import ConfigError, CropbenchError
from cropbench.evaluations import coco, voc
from cropbench.evaluations import detectron2_backend as d2

HAVE_D2 = d2.available()
needs_d2 = pytest.mark.skipif(
    not HAVE_D2,
    reason="detectron2 is not installed (not on PyPI): `tox -e detectron2` or .ci/run builds it from "
    "../shared/vendor/detectron2-02b5c4e2.tar.gz",
)


# ---- backend choice (no detectron2 needed) ----


def test_auto_is_torchvision_at_micro_and_detectron2_on_real_data_when_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for installed in (False, True):
        monkeypatch.setattr(d2, "available", lambda installed=installed: installed)
        assert coco.CocoSettings().backend == "torchvision"  # synth_coco: micro
        assert voc.VocSettings().backend == "torchvision"
        real = "detectron2" if installed else "torchvision"
        assert from_dict(coco.CocoSettings, coco.PAPER, "coco").backend == real
        assert from_dict(voc.VocSettings, voc.PAPER, "voc").backend == real
        assert from_dict(coco.CocoSettings, {"backend": "torchvision", "dataset": "coco"}, "c").backend == "torchvision"


def test_detectron2_without_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d2, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"eval\.voc\.backend: 'detectron2' is not installed.*shared/vendor"):
        from_dict(voc.VocSettings, {"backend": "detectron2"}, "voc")
    with pytest.raises(ConfigError, match="backend"):
        from_dict(coco.CocoSettings, {"backend": "mmdet"}, "coco")


def test_config_names() -> None:
    s = coco.CocoSettings()
    assert d2.zoo_config(s) == "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
    assert d2.zoo_config(voc.VocSettings()) == "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
    # torchvision layer k is detectron2 res{k+1}; strides 4..32 (R50), 1..8 (micro: no max-pool)
    assert d2._levels("resnet50", (1, 2, 3, 4)) == [("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)]
    assert d2._levels("resnet_micro", (3, 4)) == [("res4", 4), ("res5", 8)]


# ---- with detectron2 ----


def _cfg(arch: str, settings: object, **kw: object) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    enc = build_backbone(arch, **kw)
    with torch.no_grad():  # non-trivial BN statistics, so a BN mix-up shows
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return enc, d2.build_cfg(enc, settings, 10, torch.device("cpu"))


@needs_d2
def test_real_detectron2_load_of_our_exported_pkl(tmp_path: Path) -> None:
    """``cropbench export --format detectron2`` of a ResNet-50 checkpoint, loaded by detectron2's
    ``DetectionCheckpointer`` into the paper's Mask R-CNN R50-FPN: every backbone tensor arrives,
    and the bottom-up ResNet computes what our encoder computes (STRIDE_IN_1X1 False, BN names)."""
    from detectron2.modeling import build_model

    from cropbench.cli import cli

    settings = from_dict(coco.CocoSettings, {**coco.PAPER, "backend": "torchvision"}, "coco")
    enc, cfg = _cfg("resnet50", settings)
    torch.save({"encoder": enc.state_dict(), "backbone": "resnet50"}, tmp_path / "checkpoint.pt")
    res = CliRunner().invoke(
        cli, ["export", str(tmp_path / "checkpoint.pt"), "--format", "detectron2", "--out", str(tmp_path / "r50.pkl")]
    )
    assert res.exit_code == 0, res.output
    with open(tmp_path / "r50.pkl", "rb") as f:
        arrays = pickle.load(f)["model"]
    model = build_model(cfg).eval()
    assert d2.load_backbone(model, tmp_path / "r50.pkl", arrays) == len(arrays) == len(enc.state_dict()) == 318
    x = torch.randn(1, 3, 96, 128)
    enc.eval()
    with torch.no_grad():
        ours = enc.forward_stages(x)[-1]
        theirs = model.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@needs_d2
def test_a_key_detectron2_cannot_place_is_an_error(tmp_path: Path) -> None:
    """detectron2 only logs an unmatched key; ``load_backbone`` refuses it (here: a renamed one)."""
    from detectron2.modeling import build_model

    from cropbench.export import save_detectron2, to_detectron2

    enc, cfg = _cfg("resnet_micro", voc.VocSettings())
    sd = enc.state_dict()
    arrays = to_detectron2(sd)
    save_detectron2(sd, tmp_path / "ok.pkl")
    model = build_model(cfg).eval()
    assert d2.load_backbone(model, tmp_path / "ok.pkl", arrays) == len(arrays)  # res5 into the C4 RoI head
    bad = {("res5.0.conv9.weight" if k == "res5.0.conv1.weight" else k): v for k, v in arrays.items()}
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": bad, "__author__": "test", "matching_heuristics": True}, f)
    with pytest.raises(CropbenchError, match=r"did not load bad\.pkl fully: not placed \['res5\.0\.conv9\.weight"):
        d2.load_backbone(build_model(cfg).eval(), tmp_path / "bad.pkl", bad)


@needs_d2
@pytest.mark.parametrize(
    ("arch", "kw"), [("resnet_micro", {}), ("resnet_micro", {"depths": (2, 1, 1, 2)}), ("resnet18", {})]
)
def test_micro_and_basicblock_backbones_compute_what_ours_compute(arch: str, kw: dict, tmp_path: Path) -> None:
    """The micro ResNet (CIFAR stem, no max-pool) rebuilt in detectron2, and ResNet-18 through
    detectron2's own builder, give our encoder's C5 on the same weights (C4: res5 in the RoI head)."""
    from detectron2.modeling import build_model

    from cropbench.export import save_detectron2, to_detectron2

    enc, cfg = _cfg(arch, voc.VocSettings(), **kw)
    save_detectron2(enc.state_dict(), tmp_path / "w.pkl")
    model = build_model(cfg).eval()
    d2.load_backbone(model, tmp_path / "w.pkl", to_detectron2(enc.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    enc.eval()
    with torch.no_grad():
        ours = enc.forward_stages(x)
        c4 = model.backbone(x)["res4"]
        c5 = model.roi_heads.res5[:-1](c4)  # without MoCo's extra norm
    torch.testing.assert_close(c4, ours[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c5, ours[3], rtol=1e-4, atol=1e-4)
    assert isinstance(model.roi_heads.res5[-1], torch.nn.BatchNorm2d)  # Res5ROIHeadsExtraNorm


@needs_d2
def test_coco_end_to_end_on_micro_data_with_detectron2() -> None:
    """A few detectron2 iterations from the micro encoder, scored by detectron2's COCOEvaluator."""
    from cropbench.evaluations.base import EvalData

    s = from_dict(
        coco.CocoSettings,
        {"backend": "detectron2", "iterations": 2, "steps": [1], "warmup_iters": 1, "precise_bn_iters": 1},
        "coco",
    )
    root = Path(os.environ.get("CROPBENCH_DATA", Path.home() / ".cache" / "cropbench" / "data"))
    torch.manual_seed(0)
    logs: list[str] = []
    enc = build_backbone("resnet_micro")
    metrics = coco.evaluate(enc, s, EvalData(root=root, log=logs.append))
    assert sorted(metrics) == sorted(coco.METRICS)
    assert all(np.isnan(v) or 0.0 <= v <= 100.0 for v in metrics.values())
    assert logs == [f"[d2] loaded {len(enc.state_dict())} backbone tensors from the exported .pkl; 2 iterations"]


@needs_d2
def test_voc_end_to_end_on_micro_data_with_detectron2() -> None:
    """VOC07+12 trainval registered per year, C4 with the extra norm, PascalVOCDetectionEvaluator
    (11-point AP for 2007) on VOC2007 test: the metrics the torchvision path reports."""
    from cropbench.evaluations.base import EvalData

    s = from_dict(
        voc.VocSettings,
        {"backend": "detectron2", "iterations": 1, "steps": [1], "warmup_iters": 1, "precise_bn_iters": 1},
        "voc",
    )
    root = Path(os.environ.get("CROPBENCH_DATA", Path.home() / ".cache" / "cropbench" / "data"))
    torch.manual_seed(0)
    metrics = voc.evaluate(build_backbone("resnet_micro"), s, EvalData(root=root, log=lambda _: None))
    assert sorted(metrics) == ["AP", "AP50", "AP75"] and all(0.0 <= v <= 100.0 for v in metrics.values())
