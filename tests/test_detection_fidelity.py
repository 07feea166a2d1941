"""Detection fine-tuning pieces pinned to detectron2: ROIAlignV2 pooling (aligned=True) and PreciseBN.

References: detectron2's poolers default to ``ROIAlignV2`` with sampling ratio 0
(facebookresearch/detectron2@02b5c4e:detectron2/config/defaults.py ``MODEL.ROI_BOX_HEAD`` /
``ROI_MASK_HEAD.POOLER_TYPE``); MoCo's detection configs turn PreciseBN on
(facebookresearch/moco@7397dfe:detection/configs/Base-RCNN-C4-BN.yaml ``TEST.PRECISE_BN``), as do
mmselfsup's COCO FPN configs (open-mmlab/mmselfsup@7f1dbc9:configs/benchmarks/detectron2/
coco_R_50_FPN_1x.yaml); PreciseBN is fvcore's ``update_bn_stats``
(facebookresearch/fvcore@3378afe:fvcore/nn/precise_bn.py, ``_PopulationVarianceEstimator``).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from cropbench.evaluations.detection import (
    AlignedMultiScaleRoIAlign,
    DetectionSettings,
    build_detector,
    precise_bn,
)
from cropbench.registry import BACKBONES


def _ramps(side: int) -> torch.Tensor:
    """1×2×side×side: channel 0 is the column index x, channel 1 the row index y."""
    r = torch.arange(side, dtype=torch.float32)
    return torch.stack([r.expand(side, side), r[:, None].expand(side, side)])[None]


def test_aligned_pooler_by_hand_and_against_torchvision_roi_align():
    """Image 256², level '0' stride 4 (64²), level '1' stride 8 (32²). FPN rule
    floor(4 + log2(sqrt(area) / 224)) clamped to [2, 3]: box A 32×32 -> level 2 ('0'), box B
    128×128 -> level 3 ('1'). On a ramp f = x the 4 bins pool to their centres: aligned, box A's
    x from 16/4 − 0.5 = 3.5 to 48/4 − 0.5 = 11.5 -> 4.5, 6.5, 8.5, 10.5; box B's from
    64/8 − 0.5 = 7.5 to 23.5 -> 9.5, 13.5, 17.5, 21.5 (unaligned: +0.5 each)."""
    feats = OrderedDict(
        [("0", torch.cat([_ramps(64)] * 2)), ("1", torch.cat([_ramps(32)] * 2)), ("pool", torch.zeros(2, 2, 1, 1))]
    )
    box_a = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    box_b = torch.tensor([[64.0, 96.0, 192.0, 224.0]])
    pooler = AlignedMultiScaleRoIAlign(["0", "1"], 4, 0)
    out = pooler(feats, [box_a, box_b], [(256, 256), (256, 256)])  # box A in image 0, B in image 1
    assert out.shape == (2, 2, 4, 4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([4.5, 6.5, 8.5, 10.5]))
    assert torch.allclose(out[1, 0, 0], torch.tensor([9.5, 13.5, 17.5, 21.5]))
    assert torch.allclose(out[1, 1, :, 0], torch.tensor([13.5, 17.5, 21.5, 25.5]))  # y: 96/8 − .5 = 11.5 ..
    ref_a = roi_align(feats["0"], torch.tensor([[0.0, *box_a[0]]]), 4, 0.25, 0, aligned=True)
    ref_b = roi_align(feats["1"], torch.tensor([[1.0, *box_b[0]]]), 4, 0.125, 0, aligned=True)
    assert torch.equal(out, torch.cat([ref_a, ref_b]))
    # the broken (torchvision default, aligned=False) pooling is half a cell off
    unaligned = roi_align(feats["0"], torch.tensor([[0.0, *box_a[0]]]), 4, 0.25, 0, aligned=False)
    assert torch.allclose(unaligned[0, 0, 0] - out[0, 0, 0], torch.full((4,), 0.5))


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_both_detector_shapes_pool_with_roialignv2(arch: str):
    s = DetectionSettings(arch=arch, masks=arch == "fpn")
    model = build_detector(BACKBONES.get("resnet_micro")(), 3, s)
    pools = [model.roi_heads.box_roi_pool] + ([model.roi_heads.mask_roi_pool] if s.masks else [])
    assert all(isinstance(p, AlignedMultiScaleRoIAlign) and p.sampling_ratio == 0 for p in pools)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))


def test_precise_bn_sets_the_population_statistics_of_the_batches():
    """Naive reference: concatenate every BN input of all batches (unequal sizes) and take the
    per-channel mean and biased variance."""
    model = _bn_model().train()
    g = torch.Generator().manual_seed(1)
    xs = [3 + 2 * torch.randn(n, 2, 5, 4, generator=g) for n in (4, 2, 3)]
    with torch.no_grad():
        conv1, bn1, relu, conv2 = model[0], model[1], model[2], model[3]
        ref_frozen = _bn_model()  # same weights: precise BN must not change them
        y1 = torch.cat([conv1(x) for x in xs])
        # the second BN sees the first BN normalised with *batch* statistics (train mode)
        y2 = torch.cat(
            [conv2(relu(nn.functional.batch_norm(conv1(x), None, None, bn1.weight, bn1.bias, True))) for x in xs]
        )
    calls = []
    n = precise_bn(model, [(x,) for x in xs], 3, reduce=lambda t: calls.append(t.shape) or t)
    assert n == 2 and len(calls) == 2
    for bn, y in ((model[1], y1), (model[4], y2)):
        assert torch.allclose(bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, y.var(dim=(0, 2, 3), unbiased=False), atol=1e-4)
        assert bn.momentum == 0.1  # restored
    for p, q in zip(model.parameters(), ref_frozen.parameters(), strict=True):
        assert torch.equal(p, q)
    # the naive reference can tell: averaging the unbiased batch variances (older fvcore) differs
    per_batch = torch.stack([conv1(x).detach().var(dim=(0, 2, 3)) for x in xs]).mean(0)
    assert not torch.allclose(model[1].running_var, per_batch, atol=1e-3)


def test_precise_bn_skips_eval_mode_layers_and_zero_iterations():
    model = _bn_model().train()
    model[4].eval()
    before = model[4].running_mean.clone(), model[1].running_mean.clone()
    assert precise_bn(model, [(torch.randn(2, 2, 3, 3),)], 0) == 0
    assert torch.equal(model[1].running_mean, before[1])
    assert precise_bn(model, [(torch.randn(2, 2, 3, 3),)], 1) == 1
    assert torch.equal(model[4].running_mean, before[0]) and not torch.equal(model[1].running_mean, before[1])


def test_paper_settings_run_precise_bn_for_200_batches():
    """detectron2 TEST.PRECISE_BN.NUM_ITER 200 (config/defaults.py), enabled by both configs."""
    from cropbench.config import from_dict
    from cropbench.evaluations import coco, voc

    assert from_dict(coco.CocoSettings, coco.PAPER, "coco PAPER").precise_bn_iters == 200
    assert from_dict(voc.VocSettings, voc.PAPER, "voc PAPER").precise_bn_iters == 200
