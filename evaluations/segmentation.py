"""Semantic segmentation parts (mmseg ``fcn_r50-d8`` in plain PyTorch): a dilated backbone, the
FCN decode and auxiliary heads, sliding-window inference, and mIoU from a confusion matrix.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from cropbench.errors import ConfigError, CropbenchError
from cropbench.evaluations.parallel import ShardDropout2d


def _dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    """Stride 1 and dilation ``dilation`` for one ResNet stage (in place). As mmseg's
    ``contract_dilation`` and torchvision's ``replace_stride_with_dilation``, the first block's
    3×3 conv uses the previous dilation (``dilation // 2``)."""
    for i, block in enumerate(stage):
        conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1  # the 3×3 that strides
        if not isinstance(block, BasicBlock | Bottleneck):
            raise ConfigError(f"cannot dilate a {type(block).__name__}: expected ResNet Basic/Bottleneck blocks")
        d = dilation // 2 if i == 0 else dilation
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if i == 0 and block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_copy(encoder: nn.Module, output_stride: int = 8) -> nn.Module:
    """A deep copy of a ``ResNetBackbone`` whose C5 has ``output_stride`` (8: mmseg ``-d8``,
    dilations 1,1,2,4 with strides 1,2,1,1). A backbone already at that stride is copied as is."""
    body = copy.deepcopy(encoder)
    stride = body.output_stride
    if stride == output_stride:
        return body
    if (stride, output_stride) not in ((32, 8), (32, 16)):
        raise ConfigError(f"cannot dilate a backbone of output stride {stride} to {output_stride}")
    if output_stride == 8:
        _dilate_stage(body.layer3, 2)
        _dilate_stage(body.layer4, 4)
    else:
        _dilate_stage(body.layer4, 2)
    body.output_stride = output_stride
    return body


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """mmseg ``FCNHead``: ``num_convs`` 3×3 conv-BN-ReLU, optionally concat the input and fuse
    with one more 3×3, dropout, 1×1 classifier. B×C×h×w -> B×K×h×w."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
    ):
        super().__init__()
        convs = [_conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.conv_cat = _conv_bn_relu(in_channels + channels, channels, 3) if concat_input else None
        self.dropout = ShardDropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(self.dropout(y))


class FCNSegmenter(nn.Module):
    """Dilated backbone + FCN decode head on C5 + auxiliary FCN head on C4 (``fcn_r50-d8``)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        channels: int,
        aux_channels: int,
        dropout: float,
    ):
        super().__init__()
        self.backbone = backbone
        c4, c5 = backbone.stage_channels[2], backbone.stage_channels[3]
        self.decode_head = FCNHead(c5, channels, num_classes, 2, True, dropout)
        self.aux_head = FCNHead(c4, aux_channels, num_classes, 1, False, dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """B×3×H×W -> (decode logits, aux logits), each B×K at the feature resolution."""
        c2, c3, c4, c5 = self.backbone.forward_stages(x)
        return self.decode_head(c5), self.aux_head(c4)


def resize_logits(logits: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def slide_inference(
    model: nn.Module,
    image: Tensor,
    num_classes: int,
    crop: tuple[int, int],
    stride: tuple[int, int],
    align_corners: bool,
) -> Tensor:
    """mmseg ``slide_inference``: average the logits of overlapping ``crop`` windows (the last
    window in each direction is shifted back to fit). 1×3×H×W normalised -> 1×K×H×W logits."""
    _, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = image.new_zeros((1, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            window = image[:, :, y1:y2, x1:x2]
            out = resize_logits(model(window)[0], (y2 - y1, x2 - x1), align_corners)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """K×K int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` skipped."""
    keep = label != ignore_index
    idx = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: Tensor) -> dict[str, float]:
    """mIoU (mean over classes present in prediction or ground truth, as mmseg's ``nanmean``) and
    aAcc (pixel accuracy), in percent; also ``IoU.<k>`` per class (NaN when absent)."""
    c = conf.double().numpy()
    inter = np.diag(c)
    union = c.sum(0) + c.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    if np.all(np.isnan(iou)):
        raise CropbenchError("segmentation metrics: the confusion matrix is empty (every pixel ignored)")
    out = {"mIoU": float(np.nanmean(iou) * 100), "aAcc": float(inter.sum() / c.sum() * 100)}
    out.update({f"IoU.{k}": float(v * 100) for k, v in enumerate(iou)})
    return out
