"""Backbones: torchvision ResNets and a small CIFAR-stem ResNet for the CPU micro scale.

Every image backbone is a ``ResNetBackbone``: it keeps torchvision's module names
(``conv1``, ``bn1``, ``layer1``..``layer4``; no ``fc``) so its ``state_dict`` is a plain
torchvision ResNet state dict (export and detection fine-tuning rely on that), and offers

* ``forward(x) -> (B, D)`` globally average-pooled final features,
* ``forward_stages(x) -> [C2, C3, C4, C5]`` the four stage maps (dense methods, FPN),
* ``feat_dim`` and ``stage_channels``.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from cropbench.config import check_kwargs
from cropbench.registry import BACKBONES


class ResNetBackbone(nn.Module):
    """A ResNet without its classifier, named like torchvision's."""

    modality = "image"

    def __init__(self, arch: str, stem: nn.Module, layers: list[nn.Module], stage_channels: list[int], stride: int):
        super().__init__()
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = stem.conv1, stem.bn1, stem.relu, stem.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_channels = stage_channels
        self.feat_dim = stage_channels[-1]
        self.output_stride = stride  # input pixels per C5 cell

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_stages(x)[-1], 1), 1)


def _from_torchvision(arch: str, model: torchvision.models.ResNet, stride: int) -> ResNetBackbone:
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    chans = [
        layer[-1].conv2.out_channels if isinstance(layer[-1], BasicBlock) else layer[-1].conv3.out_channels
        for layer in layers
    ]
    return ResNetBackbone(arch, model, layers, chans, stride)


@BACKBONES.register("resnet18")
def resnet18(zero_init_residual: bool = False) -> ResNetBackbone:
    """torchvision ResNet-18 (512-d), ImageNet stem."""
    return _from_torchvision("resnet18", torchvision.models.resnet18(zero_init_residual=zero_init_residual), 32)


@BACKBONES.register("resnet50")
def resnet50(zero_init_residual: bool = False) -> ResNetBackbone:
    """torchvision ResNet-50 (2048-d), ImageNet stem."""
    return _from_torchvision("resnet50", torchvision.models.resnet50(zero_init_residual=zero_init_residual), 32)


class _CifarStem(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()


def _make_layer(
    block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    mods = [block(inplanes, planes, stride, downsample)]
    mods += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*mods)


@BACKBONES.register("resnet_micro")
def resnet_micro(
    widths: tuple[int, ...] | list[int] = (16, 32, 64, 128),
    depths: tuple[int, ...] | list[int] = (1, 1, 1, 1),
) -> ResNetBackbone:
    """A narrow ResNet with a CIFAR stem (3x3 conv, no max-pool), sized for 32-px views on a CPU.

    Same module names and BasicBlocks as torchvision's ResNet-18 (which is widths 64..512, depths 2,2,2,2),
    so the dense heads, FPN and export code treat it like any ResNet. Output stride 8.
    """
    stem = _CifarStem(widths[0])
    layers, inplanes = [], widths[0]
    for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
        layers.append(_make_layer(BasicBlock, inplanes, w, d, 1 if i == 0 else 2))
        inplanes = w
    model = ResNetBackbone("resnet_micro", stem, layers, list(widths), 8)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The registered backbone ``name`` built with ``kwargs`` (a recipe's ``backbone_args``); a key
    the backbone does not take is a ``ConfigError`` naming it and the valid ones."""
    factory = BACKBONES.get(name)
    check_kwargs(factory, kwargs, f"backbone_args of {name}")
    return factory(**kwargs)
