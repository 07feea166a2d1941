"""Cityscapes: labelId -> trainId table, mIoU by hand, sliding window, dilation, loader, e2e."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from torch import nn

from cropbench.backbones import resnet18, resnet50, resnet_micro
from cropbench.config import from_dict
from cropbench.data.cityscapes import CityscapesSemantic, label_id_to_train_id
from cropbench.data.synth_dense import SynthDenseConfig, write_cityscapes
from cropbench.errors import DatasetError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.cityscapes import (
    PAPER,
    CityscapesSettings,
    _random_crop,
    _rescale_size,
    augment,
    evaluate,
)
from cropbench.evaluations.segmentation import (
    FCNSegmenter,
    confusion_matrix,
    dilated_copy,
    segmentation_metrics,
    slide_inference,
)

# cityscapesScripts helpers/labels.py: id -> trainId (255 = ignored in training and evaluation)
OFFICIAL_TRAIN_IDS = {
    0: 255,
    1: 255,
    2: 255,
    3: 255,
    4: 255,
    5: 255,
    6: 255,
    7: 0,
    8: 1,
    9: 255,
    10: 255,
    11: 2,
    12: 3,
    13: 4,
    14: 255,
    15: 255,
    16: 255,
    17: 5,
    18: 255,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    29: 255,
    30: 255,
    31: 16,
    32: 17,
    33: 18,
}
TINY = SynthDenseConfig(image_size=32, train_images=8, val_images=4)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cityscapes(root / "cityscapes", TINY)
    return root


def test_label_map_matches_official_table():
    lut = label_id_to_train_id()
    assert {i: int(lut[i]) for i in range(34)} == OFFICIAL_TRAIN_IDS
    assert (lut[34:] == 255).all()


def test_confusion_and_miou_by_hand():
    label = torch.tensor([[0, 0, 1], [1, 2, 255], [2, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0], [2, 2, 3]])
    conf = confusion_matrix(pred, label, 5)
    keep = label != 255
    np.testing.assert_array_equal(conf.numpy(), sk_confusion_matrix(label[keep], pred[keep], labels=range(5)))
    m = segmentation_metrics(conf)
    # IoU: 1/2, 2/3, 3/4, 0 (predicted, never true), class 4 absent everywhere -> excluded
    assert m["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 4 + 0) / 4)
    assert m["aAcc"] == pytest.approx(100 * 6 / 8) and np.isnan(m["IoU.4"])


class _Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x), self.conv(x)


def test_slide_inference_equals_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model = _Pointwise()
    for h, w in ((37, 53), (10, 12)):  # overlapping windows; an image smaller than the window
        image = torch.randn(1, 3, h, w)
        out = slide_inference(model, image, 4, (16, 16), (11, 11), align_corners=True)
        torch.testing.assert_close(out, model.conv(image).detach())


def test_dilation_matches_torchvision_replace_stride_with_dilation():
    torch.manual_seed(0)
    enc = resnet50()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    ref.load_state_dict(enc.state_dict(), strict=False)
    body = dilated_copy(enc, 8).eval()
    ref.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expect = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(body.forward_stages(x)[-1], expect)
    assert enc.layer4[0].conv2.stride == (2, 2)  # the encoder itself is untouched
    r18 = dilated_copy(resnet18(), 8)
    assert r18.forward_stages(torch.randn(1, 3, 64, 64))[-1].shape[-1] == 8
    assert dilated_copy(resnet_micro(), 8).forward_stages(torch.randn(1, 3, 32, 32))[-1].shape[-1] == 4


def test_paper_settings_are_fcn_r50_d8_769():
    s = from_dict(CityscapesSettings, PAPER, "cityscapes PAPER")
    assert (s.crop_size, s.test_stride, s.iterations, s.batch_size) == ((769, 769), (513, 513), 40000, 8)
    assert (s.lr, s.weight_decay, s.power, s.min_lr, s.aux_weight) == (0.01, 5e-4, 0.9, 1e-4, 0.4)
    model = FCNSegmenter(dilated_copy(resnet50(), 8), 19, s.head_channels, s.aux_channels, s.dropout)
    assert model.decode_head.conv_cat[0].in_channels == 2048 + 512
    assert model.aux_head.convs[0][0].in_channels == 1024


def test_fcn_heads_follow_mmseg_fcn_d8():
    model = FCNSegmenter(resnet_micro(), 19, 64, 32, 0.1)
    assert len(model.decode_head.convs) == 2 and model.decode_head.conv_cat[0].in_channels == 128 + 64
    assert len(model.aux_head.convs) == 1 and model.aux_head.conv_cat is None
    assert model.aux_head.convs[0][0].in_channels == 64  # on C4
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 19, 4, 4) and aux.shape == (2, 19, 8, 8)


def test_rescale_and_crop_by_hand():
    # mmcv keep-ratio rescale of a 2048x1024 frame to (2049, 1025) x ratio
    assert _rescale_size(1024, 2048, (2049, 1025), 1.0) == (1025, 2049)
    assert _rescale_size(1024, 2048, (2049, 1025), 0.5) == (512, 1025)
    assert _rescale_size(128, 256, None, 0.5) == (64, 128)
    label = torch.zeros(40, 40, dtype=torch.long)
    label[20:, 20:] = 1
    torch.manual_seed(0)
    _, crop = _random_crop(torch.zeros(3, 40, 40), label, (16, 16), 0.75)
    counts = torch.bincount(crop.flatten(), minlength=2)
    assert counts.min() > 0 and counts.max() / counts.sum() < 0.75
    s = CityscapesSettings(crop_size=(48, 48), ratio_range=(0.5, 0.5))
    img, lab = augment(torch.zeros(3, 40, 60, dtype=torch.uint8), label.new_ones(40, 60), s)
    assert img.shape == (3, 48, 48) and lab.shape == (48, 48)
    # resized to 20x30, then padded with ignore
    assert set(lab.unique().tolist()) == {1, 255} and (lab[20:] == 255).all()


def test_loader_maps_synthetic_label_ids(cs_root):
    ds = CityscapesSemantic(cs_root / "cityscapes", "train")
    image, label = ds[0]
    label_ids = np.asarray(Image.open(ds.labels[0]))
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)
    np.testing.assert_array_equal(label.numpy(), np.vectorize(lambda i: OFFICIAL_TRAIN_IDS.get(i, 255))(label_ids))
    assert (label[-2:] == 255).all() and (label_ids[-2:] == 1).all()  # the ego-vehicle band
    tv = torchvision.datasets.Cityscapes(str(cs_root / "cityscapes"), "val", target_type=["semantic", "instance"])
    # instanceIds: labelId * 1000 + k for thing classes
    assert np.asarray(tv[0][1][1]).max() >= 24000


def test_bad_input(tmp_path, cs_root):
    with pytest.raises(DatasetError, match="leftImg8bit"):
        CityscapesSemantic(tmp_path, "train")
    ds = CityscapesSemantic(cs_root / "cityscapes", "val")
    good = Image.open(ds.labels[0])
    Image.new("L", (10, 10)).save(ds.labels[0])
    with pytest.raises(DatasetError, match=r"gtFine_labelIds\.png: label map is 10x10 but its image"):
        ds[0]
    Image.new("RGB", good.size).save(ds.labels[0])
    with pytest.raises(DatasetError, match="single-channel"):
        ds[0]
    good.save(ds.labels[0])
    assert ds[0][1].shape == (32, 64)


def test_evaluate_end_to_end_on_real_layout(cs_root):
    s = CityscapesSettings(
        dataset="cityscapes",
        iterations=3,
        batch_size=2,
        crop_size=(32, 32),
        test_stride=(16, 16),
        log_every=1,
    )
    logs: list[str] = []
    enc = resnet_micro()
    m = evaluate(enc, s, EvalData(root=cs_root, log=logs.append))
    assert set(m) == {"mIoU", "aAcc"} and all(0 <= v <= 100 for v in m.values())
    assert any("iter 3/3" in line for line in logs)
    # lr 0.01 is stated at batch 8 (mmseg's 4 GPUs x 2); batch 2 runs 0.0025 and says so
    assert "[seg] lr 0.0025 at batch 2 (linear scaling: lr 0.01 at batch 8 x 2/8)" in logs
    assert evaluate(enc, s, EvalData(root=cs_root, log=logs.append)) == m  # seed-determined on CPU
