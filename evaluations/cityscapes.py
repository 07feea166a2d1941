"""Cityscapes semantic segmentation transfer: mmseg ``fcn_r50-d8_769x769_40k`` in plain PyTorch.

Protocol (DenseCL's benchmark; mmselfsup ``fcn_r50-d8_4xb2-40k_cityscapes-769x769``): dilated
backbone (output stride 8), FCN head (2 convs, concat input) + auxiliary FCN head on C4 (loss
weight 0.4), SGD lr 0.01 / momentum 0.9 / wd 5e-4, poly 0.9 down to 1e-4, 40k iterations at batch
8; train on RandomResize(2049×1025, ratio 0.5-2) -> RandomCrop 769 (cat_max_ratio 0.75) -> flip ->
PhotoMetricDistortion -> pad; test by sliding 769 windows with stride 513; mIoU over the 19 train
classes (ignore 255), in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cropbench.data import build_dataset
from cropbench.data.cityscapes import IGNORE_INDEX, CityscapesSemantic
from cropbench.data.images import normalize
from cropbench.dist import DistContext
from cropbench.errors import ConfigError, TrainingError
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.detection import (
    InfiniteSampler,
    LossWatch,
    autocast,
    data_parallel,
    log_lr_scaling,
    scaled_lr,
)
from cropbench.evaluations.parallel import ShardDropout2d, keyed_generator
from cropbench.evaluations.segmentation import (
    FCNSegmenter,
    confusion_matrix,
    dilated_copy,
    resize_logits,
    segmentation_metrics,
    slide_inference,
)

# Paper scale: mmseg fcn_r50-d8 769x769 40k (DenseCL benchmarks/detection/README, mmselfsup config).
# Preset "paper" (``eval: {cityscapes: {preset: paper}}``).
PAPER: dict[str, Any] = {
    "dataset": "cityscapes",
    "iterations": 40000,
    "batch_size": 8,
    "crop_size": [769, 769],
    "scale": [2049, 1025],
    "head_channels": 512,
    "aux_channels": 256,
    "test_stride": [513, 513],
    "log_every": 50,
}


@dataclass(frozen=True)
class CityscapesSettings:
    """Micro defaults: embedded 128×256 scenes, resnet_micro (already stride 8), 96-px crops."""

    dataset: str = "synth_cityscapes"
    train_split: str = "train"
    test_split: str = "val"
    iterations: int = 300  # 40k at paper scale
    batch_size: int = 8  # 4 GPUs × 2 images in the mmseg config
    lr: float = 0.01  # at ``lr_batch`` images per iteration; scaled linearly to ``batch_size``
    lr_batch: int = 8  # the mmseg config's 4 GPUs × 2 images, at which lr 0.01 is stated
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9  # PolyLR
    min_lr: float = 1e-4  # PolyLR eta_min
    crop_size: tuple[int, int] = (96, 96)  # (h, w); 769×769 at paper scale
    scale: tuple[int, int] | None = None  # (long, short) resize target (2049, 1025); None: as is
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # re-draw crops where one class covers more than this
    photometric: bool = True  # PhotoMetricDistortion
    head_channels: int = 64  # FCN head width (512 at paper scale)
    aux_channels: int = 32  # auxiliary head width (256 at paper scale)
    aux_weight: float = 0.4
    dropout: float = 0.1
    align_corners: bool = True  # the 769×769 configs set align_corners=True
    test_stride: tuple[int, int] = (64, 64)  # sliding-window stride (513, 513 at paper scale)
    log_every: int = 50
    amp: bool = True  # bf16 autocast on CUDA, for speed (mmseg's config trains in fp32); ignored on CPU


def _rescale_size(h: int, w: int, scale: tuple[int, int] | None, ratio: float) -> tuple[int, int]:
    """mmcv ``rescale`` with keep_ratio: fit (long, short) = scale × ratio, or the image × ratio."""
    if scale is None:
        return max(1, round(h * ratio)), max(1, round(w * ratio))
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize(image: Tensor, label: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Bilinear image (3×H×W float), nearest label (H×W)."""
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def _random_crop(
    image: Tensor, label: Tensor, crop: tuple[int, int], cat_max_ratio: float, gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """mmseg ``RandomCrop``: up to 10 draws until no class covers more than ``cat_max_ratio``."""
    h, w = label.shape
    for _ in range(10):
        y = int(torch.randint(max(h - crop[0], 0) + 1, (), generator=gen))
        x = int(torch.randint(max(w - crop[1], 0) + 1, (), generator=gen))
        window = label[y : y + crop[0], x : x + crop[1]]
        _, counts = window[window != IGNORE_INDEX].unique(return_counts=True)
        if cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio):
            break
    return image[:, y : y + crop[0], x : x + crop[1]], label[y : y + crop[0], x : x + crop[1]]


def _photometric(image: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """mmseg ``PhotoMetricDistortion`` on a 3×H×W float 0-255 image, each step with p=0.5:
    brightness ±32, contrast 0.5-1.5 (before or after the colour steps), saturation 0.5-1.5,
    hue ±18/180. Saturation and hue use torchvision's operators, not mmcv's HSV arithmetic."""

    def coin() -> bool:
        return bool(torch.rand((), generator=gen) < 0.5)

    def uniform(a: float, b: float) -> float:
        return float(torch.empty(()).uniform_(a, b, generator=gen))

    if coin():
        image = (image + uniform(-32, 32)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp(0, 255)
    if coin():
        image = TF.adjust_saturation(image / 255, uniform(0.5, 1.5)) * 255
    if coin():
        image = TF.adjust_hue(image / 255, uniform(-18, 18) / 180) * 255
    if not contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp(0, 255)
    return image


def augment(
    image: Tensor, label: Tensor, s: CityscapesSettings, gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """uint8 3×H×W + H×W -> float 3×crop (0-255) + long crop, the mmseg training pipeline; its
    draws come from ``gen`` (the global generator when None)."""
    ratio = float(torch.empty(()).uniform_(*s.ratio_range, generator=gen))
    size = _rescale_size(*label.shape, s.scale, ratio)
    img, lab = _resize(image.float(), label, size)
    img, lab = _random_crop(img, lab, s.crop_size, s.cat_max_ratio, gen)
    if torch.rand((), generator=gen) < 0.5:
        img, lab = img.flip(-1), lab.flip(-1)
    if s.photometric:
        img = _photometric(img, gen)
    ph, pw = s.crop_size[0] - lab.shape[0], s.crop_size[1] - lab.shape[1]
    img = F.pad(img, (0, pw, 0, ph), value=0.0)
    lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
    return img, lab


class _TrainCrops(torch.utils.data.Dataset):
    """Augmented training crops, indexed by (stream position, image index) from ``InfiniteSampler``:
    each crop's draws come from a generator keyed by (seed, position), the same on any rank."""

    def __init__(self, base: torch.utils.data.Dataset, s: CityscapesSettings, seed: int):
        self.base, self.s, self.seed = base, s, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        pos, i = key
        return augment(*self.base[i], self.s, keyed_generator(self.seed, pos))


def train_segmenter(
    model: nn.Module, train: torch.utils.data.Dataset, s: CityscapesSettings, data: EvalData
) -> nn.Module:
    """SGD + poly schedule; CE (ignore 255) on the decode logits + ``aux_weight`` × CE on the
    auxiliary logits, both upsampled to the crop.

    Data-parallel, the union of the ranks' batches is the one-process batch (``InfiniteSampler``),
    crops are drawn per stream position, dropout masks for the whole batch (``ShardDropout2d``),
    BatchNorm over every rank (SyncBN), and each rank's loss is its pixels' CE sum over the global
    count of labelled pixels (× world, as DDP averages): the one-process gradient, up to float
    summation order."""
    ctx = data.dist
    if s.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {s.batch_size} is not divisible by the world size {ctx.world_size}")
    for m in model.modules():
        if isinstance(m, ShardDropout2d):
            m.shard = (ctx.rank, ctx.world_size)
    model = data_parallel(model.to(data.device).train(), data)
    lr = scaled_lr(s.lr, s.batch_size, s.lr_batch)
    if ctx.is_main:
        log_lr_scaling("[seg]", s.lr, s.batch_size, s.lr_batch, data.log)
    watch = LossWatch("[seg]", data.log)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    poly = lambda it: ((lr - s.min_lr) * (1 - it / s.iterations) ** s.power + s.min_lr) / lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
    loader = DataLoader(
        _TrainCrops(train, s, data.seed),
        batch_size=s.batch_size // ctx.world_size,
        num_workers=data.num_workers,
        sampler=InfiniteSampler(len(train), data.seed, ctx.rank, ctx.world_size, positions=True),
        pin_memory=data.device.type == "cuda",
    )
    running = torch.zeros((), device=data.device)
    for it, (images, labels) in zip(range(s.iterations), loader, strict=False):
        images = normalize(images.to(data.device, non_blocking=True))
        labels = labels.to(data.device, non_blocking=True)
        with autocast(s, data.device):
            logits, aux = model(images)
        loss = _seg_loss(logits.float(), aux.float(), labels, s, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()  # no host sync until a logging iteration
        if (it + 1) % s.log_every == 0 or it + 1 == s.iterations:
            mean = _logged_loss(running, (it % s.log_every) + 1, it, ctx, data.device)
            if ctx.is_main:
                data.log(f"[seg] iter {it + 1}/{s.iterations} lr={opt.param_groups[0]['lr']:.4g} loss={mean:.3f}")
                watch.update(it + 1, {"loss": mean})
            running = torch.zeros((), device=data.device)
    return model


def _seg_loss(logits: Tensor, aux: Tensor, labels: Tensor, s: CityscapesSettings, data: EvalData) -> Tensor:
    """CE(decode) + aux_weight × CE(aux) over labelled pixels; over the ranks' union batch when
    data-parallel (see ``train_segmenter``)."""
    size, ctx = labels.shape[-2:], data.dist
    up = lambda x: resize_logits(x, size, s.align_corners)  # noqa: E731
    if not ctx.enabled:
        loss = F.cross_entropy(up(logits), labels, ignore_index=IGNORE_INDEX)
        return loss + s.aux_weight * F.cross_entropy(up(aux), labels, ignore_index=IGNORE_INDEX)
    total = (labels != IGNORE_INDEX).sum().float()
    torch.distributed.all_reduce(total)  # labelled pixels of the global batch
    loss = F.cross_entropy(up(logits), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss + s.aux_weight * F.cross_entropy(up(aux), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss * ctx.world_size / total.clamp(min=1)


def _logged_loss(running: Tensor, n: int, it: int, ctx: DistContext, device: torch.device) -> float:
    """Mean loss of the global batches since the last log; raises on a non-finite one."""
    if ctx.enabled:
        running = running.clone()
        torch.distributed.all_reduce(running)
        running /= ctx.world_size
    mean = float(running) / n  # the one host sync per log_every iterations
    if not math.isfinite(mean):
        raise TrainingError(f"cityscapes fine-tune: non-finite loss in iterations {it + 2 - n}..{it + 1}")
    return mean


@torch.no_grad()
def test_segmenter(
    model: nn.Module,
    test: torch.utils.data.Dataset,
    num_classes: int,
    s: CityscapesSettings,
    data: EvalData,
) -> Tensor:
    """Sliding-window predictions at the test scale, resized to the label size -> K×K confusion."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(data.dist.rank, len(test), data.dist.world_size):
        image, label = test[i]
        img = image.float()
        if s.scale is not None:
            img, _ = _resize(img, None, _rescale_size(*label.shape, s.scale, 1.0))
        logits = slide_inference(
            net,
            normalize(img[None].to(data.device)),
            num_classes,
            s.crop_size,
            s.test_stride,
            s.align_corners,
        )
        pred = resize_logits(logits, tuple(label.shape), s.align_corners).argmax(1)[0].cpu()
        conf += confusion_matrix(pred, label, num_classes, IGNORE_INDEX)
    if data.dist.enabled:
        conf = conf.to(data.device)
        torch.distributed.all_reduce(conf)
    return conf.cpu()


@register_evaluation("cityscapes", CityscapesSettings, metrics=("mIoU", "aAcc"), presets={"paper": PAPER, "micro": {}})
def evaluate(encoder: nn.Module, settings: CityscapesSettings, data: EvalData) -> dict[str, float]:
    """FCN-d8 fine-tune on Cityscapes train (fine); mIoU over the 19 train classes on val (%)."""
    s = settings
    train = build_dataset(s.dataset, s.train_split, data.root, data.scale, "eval.cityscapes.dataset")
    test = build_dataset(s.dataset, s.test_split, data.root, data.scale, "eval.cityscapes.dataset")
    return finetune_and_test(encoder, s, data, train, test)


def finetune_and_test(
    encoder: nn.Module,
    s: CityscapesSettings,
    data: EvalData,
    train: CityscapesSemantic,
    test: CityscapesSemantic,
) -> dict[str, float]:
    """Dilate a copy of ``encoder``, add the FCN heads, fine-tune on ``train``, score ``test``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data.seed)
        body = dilated_copy(encoder, 8)
        model = FCNSegmenter(body, train.num_classes, s.head_channels, s.aux_channels, s.dropout)
        model = train_segmenter(model, train, s, data)
        conf = test_segmenter(model, test, train.num_classes, s, data)
    metrics = segmentation_metrics(conf)
    present = [k for k in range(train.num_classes) if metrics[f"IoU.{k}"] == metrics[f"IoU.{k}"]]
    per_class = ", ".join(f"{train.classes[k]}={metrics[f'IoU.{k}']:.1f}" for k in present)
    data.log(f"[cityscapes] mIoU={metrics['mIoU']:.2f} aAcc={metrics['aAcc']:.2f} ({per_class})")
    return {"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]}
