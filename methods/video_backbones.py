"""Video backbones: torchvision R3D-18 / R(2+1)D-18 / S3D, pytorchvideo Slow-R50, TSM-ResNet-50
(BraVe's backbone) and a small 3D ResNet sized for the CPU micro scale.

Every video backbone has the image backbones' API with a time axis:

* ``forward(x: B×C×T×H×W) -> B×D`` globally average-pooled features,
* ``forward_features(x) -> B×D×T'×H'×W'`` the last feature map,
* ``feat_dim`` and ``modality = "video"``.

Module names follow the source library (torchvision's ``stem``/``layer1..4``/``features``,
pytorchvideo's ``blocks``), so the state dicts load into those libraries' models (minus the head).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.video.resnet import BasicBlock

from cropbench.registry import BACKBONES


class VideoBackbone(nn.Module, abc.ABC):
    """Base: subclasses implement ``forward_features``; ``forward`` pools it over T, H, W."""

    modality = "video"
    feat_dim: int
    arch: str

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """B×C×T×H×W clips -> B×D×T'×H'×W' feature maps."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"{self.arch}: expected a B×C×T×H×W clip batch, got shape {tuple(x.shape)}")
        return self.forward_features(x).mean(dim=(2, 3, 4))


class VideoResNetBackbone(VideoBackbone):
    """torchvision's VideoResNet (R3D / MC3 / R(2+1)D) without ``avgpool`` and ``fc``."""

    def __init__(self, arch: str, stem: nn.Module, layers: list[nn.Module], feat_dim: int):
        super().__init__()
        self.arch, self.feat_dim = arch, feat_dim
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def _from_torchvision_video(arch: str) -> VideoResNetBackbone:
    m = getattr(torchvision.models.video, arch)()
    return VideoResNetBackbone(arch, m.stem, [m.layer1, m.layer2, m.layer3, m.layer4], m.fc.in_features)


@BACKBONES.register("r3d_18")
def r3d_18(**_: Any) -> VideoResNetBackbone:
    """torchvision R3D-18 (Tran et al. 2018), 512-d; VideoMoCo's second backbone."""
    return _from_torchvision_video("r3d_18")


@BACKBONES.register("r2plus1d_18")
def r2plus1d_18(**_: Any) -> VideoResNetBackbone:
    """torchvision R(2+1)D-18, 512-d; VideoMoCo's main backbone, ParamCrop's R(2+1)D stand-in."""
    return _from_torchvision_video("r2plus1d_18")


class S3DBackbone(VideoBackbone):
    """torchvision S3D (Xie et al. 2018; no gating, unlike ParamCrop's S3D-G), 1024-d."""

    def __init__(self) -> None:
        super().__init__()
        self.arch, self.feat_dim = "s3d", 1024
        self.features = torchvision.models.video.s3d().features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)


@BACKBONES.register("s3d")
def s3d(**_: Any) -> S3DBackbone:
    return S3DBackbone()


class PytorchVideoBackbone(VideoBackbone):
    """A pytorchvideo ``Net`` without its head block."""

    def __init__(self, arch: str, net: nn.Module, feat_dim: int):
        super().__init__()
        self.arch, self.feat_dim = arch, feat_dim
        self.blocks = nn.ModuleList(list(net.blocks)[:-1])

    def forward_features(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@BACKBONES.register("slow_r50")
def slow_r50(**_: Any) -> PytorchVideoBackbone:
    """pytorchvideo Slow-only ResNet-50 (Feichtenhofer et al. CVPR'21 large-scale study), 2048-d."""
    from pytorchvideo.models.resnet import create_resnet

    net = create_resnet(model_depth=50, stem_conv_kernel_size=(1, 7, 7), head_pool_kernel_size=(8, 7, 7))
    return PytorchVideoBackbone("slow_r50", net, 2048)


def temporal_shift(x: Tensor, t: int, fold_div: int = 8) -> Tensor:
    """TSM (Lin et al. ICCV'19): (B·T)×C×H×W; 1/fold_div of the channels move one frame back in
    time, another 1/fold_div one frame forward, zero-filled at the ends; the rest stay."""
    bt, c, h, w = x.shape
    x = x.view(bt // t, t, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]  # frame i sees frame i+1
    out[:, 1:, fold : 2 * fold] = x[:, :-1, fold : 2 * fold]  # frame i sees frame i-1
    out[:, :, 2 * fold :] = x[:, :, 2 * fold :]
    return out.view(bt, c, h, w)


class TSMResNetBackbone(VideoBackbone):
    """TSM-ResNet-50 (BraVe's backbone): a 2D torchvision ResNet-50 run per frame, with a residual
    temporal shift before each bottleneck's first conv; features averaged over frames, 2048-d."""

    def __init__(self, fold_div: int = 8):
        super().__init__()
        self.arch, self.feat_dim, self.fold_div = "tsm_resnet50", 2048, fold_div
        m = torchvision.models.resnet50()
        self.conv1, self.bn1, self.relu, self.maxpool = m.conv1, m.bn1, m.relu, m.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = m.layer1, m.layer2, m.layer3, m.layer4

    def _block(self, block: Bottleneck, x: Tensor, t: int) -> Tensor:
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu(block.bn1(block.conv1(temporal_shift(x, t, self.fold_div))))
        out = block.relu(block.bn2(block.conv2(out)))
        return block.relu(block.bn3(block.conv3(out)) + identity)

    def forward_features(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # frames as a batch
        y = self.maxpool(self.relu(self.bn1(self.conv1(y))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                y = self._block(block, y, t)
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)  # B×2048×T×h×w


@BACKBONES.register("tsm_resnet50")
def tsm_resnet50(fold_div: int = 8, **_: Any) -> TSMResNetBackbone:
    return TSMResNetBackbone(fold_div)


def _conv3d(cin: int, cout: int, mid: int, stride: tuple[int, int] = (1, 1)) -> nn.Module:
    t, s = stride
    return nn.Conv3d(cin, cout, 3, stride=(t, s, s), padding=1, bias=False)


def _conv2plus1d(cin: int, cout: int, mid: int, stride: tuple[int, int] = (1, 1)) -> nn.Module:
    """R(2+1)D: 1×3×3 spatial conv to ``mid`` channels, BN, ReLU, then a 3×1×1 temporal conv."""
    t, s = stride
    return nn.Sequential(
        nn.Conv3d(cin, mid, (1, 3, 3), stride=(1, s, s), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, cout, (3, 1, 1), stride=(t, 1, 1), padding=(1, 0, 0), bias=False),
    )


@BACKBONES.register("r3d_micro")
def r3d_micro(
    widths: tuple[int, ...] | list[int] = (16, 32, 64, 128),
    depths: tuple[int, ...] | list[int] = (1, 1, 1, 1),
    temporal_strides: tuple[int, ...] | list[int] = (1, 1, 2, 2),
    spatial_strides: tuple[int, ...] | list[int] = (1, 2, 2, 1),
    conv: str = "3d",
    **_: Any,
) -> VideoResNetBackbone:
    """A narrow 3D ResNet for 8-frame 24-px clips on a CPU.

    torchvision's R3D-18 design (3×3×3 BasicBlocks, stem stride (1,2,2)) with widths 16..128
    instead of 64..512 and one block per stage; space is halved by the stem, layer2 and layer3
    (24 px -> 3×3 cells), time only by layer3 and layer4, so 8-frame clips keep their motion.
    ``conv="2plus1d"`` gives the R(2+1)D factorisation.
    """
    builders = {"3d": _conv3d, "2plus1d": _conv2plus1d}
    if conv not in builders:
        raise ValueError(f"r3d_micro: conv must be one of {list(builders)}, got {conv!r}")
    stem = nn.Sequential(
        nn.Conv3d(3, widths[0], 3, (1, 2, 2), 1, bias=False),
        nn.BatchNorm3d(widths[0]),
        nn.ReLU(inplace=True),
    )
    layers, cin = [], widths[0]
    for w, d, ts, ss in zip(widths, depths, temporal_strides, spatial_strides, strict=True):
        down = None
        if (ts, ss) != (1, 1) or cin != w:
            down = nn.Sequential(nn.Conv3d(cin, w, 1, (ts, ss, ss), bias=False), nn.BatchNorm3d(w))
        blocks = [BasicBlock(cin, w, builders[conv], (ts, ss), down)]
        blocks += [BasicBlock(w, w, builders[conv], (1, 1)) for _ in range(1, d)]
        layers.append(nn.Sequential(*blocks))
        cin = w
    model = VideoResNetBackbone("r3d_micro", stem, layers, widths[-1])
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
