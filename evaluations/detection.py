"""Detection fine-tuning shared by ``coco`` and ``voc``: torchvision Faster / Mask R-CNN on a copy
of the pretrained backbone, trained with detectron2's solver (SGD, linear warmup, step decay).

Two detector shapes, the two the SSL papers report (MoCo, DenseCL, RegionCL, CYBORGS):

* ``fpn``: R50-FPN (``BackboneWithFPN``; norm in the FPN as ``FPN.NORM: SyncBN``), RPN + RoI heads
  on every FPN level, 2-FC box head, 4-conv mask head (detectron2 ``Base-RCNN-FPN``).
* ``c4``: R50-C4: RPN on C4 (layer3), RoIAlign 14×14, res5 (layer4) + one extra BN as the box head
  (MoCo's ``Res5ROIHeadsExtraNorm``), average pool, linear classifier and box regressor.

All backbone stages train (``FREEZE_AT: 0``) with BatchNorm in train mode (SyncBN when distributed).
RoIs are pooled as detectron2's ``ROIAlignV2`` (``aligned=True``, adaptive sampling ratio 0), the
pooler of every config the papers fine-tune with; after training, PreciseBN recomputes the BN
statistics (``TEST.PRECISE_BN.ENABLED: True`` in MoCo's and mmselfsup's detectron2 configs).

Data-parallel (``data.dist``, world W): rank r takes every W-th position of one global sample
stream (``InfiniteSampler``), so the ranks' local batches together are the one-process batch;
each image's randomness (flip, train size, RPN / RoI fg-bg samples) comes from a generator keyed
by its stream position; BatchNorm is synchronised (torch's SyncBN on GPUs, ``GlooSyncBatchNorm``
on CPU) and PreciseBN weights the global statistics by global counts. What still differs from one
process: torchvision averages each loss over the samples of its own process (the mask loss over
its positive RoIs; the RPN / RoI losses too when an image has fewer than ``*_batch_per_image``
candidates), and a batch is padded to its largest image per process. Measured at micro (3
iterations, batch 4, 2 gloo processes): parameters max |Δ| 1.1e-5, BN running statistics 2.8e-4,
COCO metrics equal (``tests/test_distributed_evals.py``). On CUDA the forward runs under bf16
autocast (``amp``); the loop reads losses back to the host only on logging iterations.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from cropbench.data.coco import collate_detection
from cropbench.dist import DistContext
from cropbench.errors import ConfigError, TrainingError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.parallel import convert_sync_batchnorm, keyed_generator


@dataclass(frozen=True)
class DetectionSettings:
    """Fields shared by ``coco`` and ``voc``. Defaults are the micro scale; ``PAPER`` dicts in
    ``coco.py`` / ``voc.py`` hold the paper-scale values with their sources."""

    dataset: str = "synth_coco"
    train_split: str = "train"
    test_split: str = "val"
    arch: Literal["fpn", "c4"] = "fpn"
    masks: bool = True  # Mask R-CNN (True) or Faster R-CNN
    iterations: int = 300  # micro: ~3 CPU-minutes with resnet_micro (90k / 24k at paper scale)
    batch_size: int = 4  # images per iteration over all ranks (detectron2 IMS_PER_BATCH; 16)
    # BASE_LR at ``lr_batch`` images per iteration; the run uses lr x batch_size / lr_batch (linear
    # scaling, detectron2's REFERENCE_WORLD_SIZE rule). Micro: 0.08 at 16 = 0.02 at its batch 4.
    lr: float = 0.08
    lr_batch: int = 16  # the papers' IMS_PER_BATCH, at which their BASE_LR 0.02 is stated
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to norm parameters (detectron2 WEIGHT_DECAY_NORM 0)
    steps: tuple[int, ...] = (200, 266)  # lr *= gamma here (the 1x schedule's 2/3 and 8/9)
    gamma: float = 0.1
    warmup_iters: int = 50  # detectron2 WARMUP_ITERS: 1000 (FPN) / 100 (VOC C4)
    warmup_factor: float = 0.001
    train_min_sizes: tuple[int, ...] = (96, 112, 128)  # shorter side, one drawn per image
    test_min_size: int = 128
    max_size: int = 256  # longer side cap (1333 at paper scale)
    hflip: bool = True  # RANDOM_FLIP horizontal
    returned_layers: tuple[int, ...] = (3, 4)  # FPN inputs; micro: C4, C5 (strides 4, 8) + P6
    anchor_sizes: tuple[int, ...] = (24, 48, 96)  # one per FPN level (fpn) or all on C4 (c4)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fpn_channels: int = 64  # 256 at paper scale
    box_head_dim: int = 256  # TwoMLPHead width (1024 at paper scale)
    mask_head_channels: int = 32  # 256 at paper scale
    rpn_batch_per_image: int = 128  # 256 at paper scale
    roi_batch_per_image: int = 64  # 512 at paper scale
    rpn_pre_nms_train: int = 1000  # FPN: per level (2000 at paper scale)
    rpn_post_nms_train: int = 500  # 1000 at paper scale
    rpn_pre_nms_test: int = 500  # 1000 at paper scale
    rpn_post_nms_test: int = 300  # 1000 at paper scale
    detections_per_image: int = 100  # DETECTIONS_PER_IMAGE (COCOeval counts up to 100)
    precise_bn_iters: int = 20  # PreciseBN batches after training, at most `iterations` (paper: 200)
    score_thresh: float = 0.05  # SCORE_THRESH_TEST
    log_every: int = 50
    amp: bool = True  # bf16 autocast on CUDA (detectron2 SOLVER.AMP.ENABLED; the papers' configs: fp32); CPU: off


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (FPN level rule, scales inferred from the image size)
    pooling with ``roi_align(..., aligned=True)``: detectron2's ``ROIAlignV2``, which shifts box
    corners by -0.5 px before sampling (``MODEL.ROI_*_HEAD.POOLER_TYPE`` default)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.long)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales, strict=True)):
            idx = torch.where(levels.to(rois.device) == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


def _fpn_parts(body: nn.Module, s: DetectionSettings) -> dict:
    names = [str(i) for i in range(len(s.returned_layers))]
    if len(s.anchor_sizes) != len(names) + 1:  # + the max-pooled extra level (P6)
        raise ConfigError(
            f"anchor_sizes: FPN with returned_layers {list(s.returned_layers)} has "
            f"{len(names) + 1} levels, got {len(s.anchor_sizes)} anchor sizes"
        )
    backbone = BackboneWithFPN(
        body,
        {f"layer{k}": n for k, n in zip(s.returned_layers, names, strict=True)},
        [body.stage_channels[k - 1] for k in s.returned_layers],
        s.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )
    c = s.fpn_channels
    parts = dict(
        backbone=backbone,
        rpn_anchor_generator=AnchorGenerator(
            tuple((a,) for a in s.anchor_sizes), (s.aspect_ratios,) * len(s.anchor_sizes)
        ),
        box_roi_pool=AlignedMultiScaleRoIAlign(names, 7, 0),
        box_head=TwoMLPHead(c * 7 * 7, s.box_head_dim),
    )
    if s.masks:
        parts.update(
            mask_roi_pool=AlignedMultiScaleRoIAlign(names, 14, 0),
            mask_head=MaskRCNNHeads(c, [s.mask_head_channels] * 4, 1),
        )
    return parts


class _C4Body(nn.Module):
    """Stem + layer1..3 of the backbone -> ``{"0": C4}`` (the RPN input of R50-C4)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
        self.layer1, self.layer2, self.layer3 = body.layer1, body.layer2, body.layer3
        self.out_channels = body.stage_channels[2]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"0": self.layer3(self.layer2(self.layer1(self.stem(x))))}


def _c4_parts(body: nn.Module, s: DetectionSettings) -> dict:
    if s.masks:
        raise ConfigError("arch 'c4' is implemented for Faster R-CNN only; set masks: false or arch: fpn")
    c5 = body.stage_channels[3]
    res5 = nn.Sequential(body.layer4, nn.BatchNorm2d(c5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return dict(
        backbone=_C4Body(body),
        rpn_anchor_generator=AnchorGenerator((tuple(s.anchor_sizes),), (s.aspect_ratios,)),
        box_roi_pool=AlignedMultiScaleRoIAlign(["0"], 14, 0),
        box_head=res5,
        box_predictor=None,
        box_head_out=c5,
    )


class KeyedFgBgSampler(BalancedPositiveNegativeSampler):
    """torchvision's ``BalancedPositiveNegativeSampler`` (the same counts: up to
    ``batch_size_per_image × positive_fraction`` positives, negatives fill the rest) drawing each
    image's random subset from that image's own generator (``generators``, set before a training
    forward); with ``generators`` None it is torchvision's sampler (the global generator)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.generators is None:
            return super().__call__(matched_idxs)
        pos_masks, neg_masks = [], []
        for matched, gen in zip(matched_idxs, self.generators, strict=True):
            positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), generator=gen)[:num_pos].to(matched.device)]
            neg = negative[torch.randperm(negative.numel(), generator=gen)[:num_neg].to(matched.device)]
            pos_masks.append(torch.zeros_like(matched, dtype=torch.uint8).index_fill_(0, pos, 1))
            neg_masks.append(torch.zeros_like(matched, dtype=torch.uint8).index_fill_(0, neg, 1))
        return pos_masks, neg_masks


def use_image_generators(model: nn.Module, gens: list[torch.Generator] | None) -> None:
    """Key a training forward's randomness by image: the train-size choice of torchvision's
    transform, then the RPN's and the RoI heads' fg/bg samples, each image from its generator (in
    the batch's order). None restores torchvision's global-generator draws."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    net.rpn.fg_bg_sampler.generators = gens
    net.roi_heads.fg_bg_sampler.generators = gens
    if gens is None:
        net.transform.__dict__.pop("torch_choice", None)
        return
    per_image = iter(gens)
    net.transform.torch_choice = lambda k: k[
        int(torch.empty(()).uniform_(0.0, float(len(k)), generator=next(per_image)))
    ]


def build_detector(encoder: nn.Module, num_classes: int, s: DetectionSettings) -> GeneralizedRCNN:
    """Faster / Mask R-CNN on a deep copy of ``encoder`` (``num_classes`` excludes background)."""
    body = copy.deepcopy(encoder)
    parts = _fpn_parts(body, s) if s.arch == "fpn" else _c4_parts(body, s)
    head_out = parts.pop("box_head_out", s.box_head_dim)
    parts["box_predictor"] = FastRCNNPredictor(head_out, num_classes + 1)
    kwargs = dict(
        min_size=s.train_min_sizes,
        max_size=s.max_size,
        rpn_pre_nms_top_n_train=s.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=s.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=s.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=s.rpn_post_nms_test,
        rpn_batch_size_per_image=s.rpn_batch_per_image,
        box_batch_size_per_image=s.roi_batch_per_image,
        box_score_thresh=s.score_thresh,
        box_detections_per_img=s.detections_per_image,
        **parts,
    )
    if s.masks:
        model = MaskRCNN(
            mask_predictor=MaskRCNNPredictor(s.mask_head_channels, s.mask_head_channels, num_classes + 1),
            **kwargs,
        )
    else:
        model = FasterRCNN(**kwargs)
    for head in (model.rpn, model.roi_heads):
        old = head.fg_bg_sampler
        head.fg_bg_sampler = KeyedFgBgSampler(old.batch_size_per_image, old.positive_fraction)
    return model


def lr_factor(it: int, s: DetectionSettings) -> float:
    """detectron2 ``WarmupMultiStepLR``: linear warmup from ``warmup_factor``, ×gamma per step."""
    decay = s.gamma ** sum(it >= m for m in s.steps)
    if it < s.warmup_iters:
        alpha = it / s.warmup_iters
        return decay * (s.warmup_factor * (1 - alpha) + alpha)
    return decay


def _optimizer(model: nn.Module, s: DetectionSettings) -> torch.optim.SGD:
    norm, other = [], []
    for m in model.modules():
        params = [p for p in m.parameters(recurse=False) if p.requires_grad]
        (norm if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm) else other).extend(params)
    groups = [
        {"params": other, "weight_decay": s.weight_decay},
        {"params": norm, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=scaled_lr(s.lr, s.batch_size, s.lr_batch), momentum=s.momentum)


def scaled_lr(lr: float, batch_size: int, lr_batch: int) -> float:
    """Linear lr scaling (Goyal et al. 2017; detectron2 ``DefaultTrainer.auto_scale_workers``):
    ``lr`` is stated for ``lr_batch`` images per iteration; ``batch_size`` images get
    ``lr x batch_size / lr_batch``."""
    if batch_size < 1 or lr_batch < 1:
        raise ConfigError(f"batch_size ({batch_size}) and lr_batch ({lr_batch}) must be >= 1")
    return lr * batch_size / lr_batch


class LossGrowthWarning(UserWarning):
    """A fine-tune loss far above its first logged value: the lr is likely too high for the batch."""


@dataclass
class LossWatch:
    """Warns once when the total logged loss exceeds ``factor`` x its first logged value, naming the
    term that grew most (a single small term, e.g. the RPN box loss, is too noisy to watch alone)."""

    name: str  # "[det]" / "[seg]": the log prefix
    log: Callable[[str], None]
    factor: float = 10.0
    first: dict[str, float] = field(default_factory=dict)
    warned: bool = False

    def update(self, it: int, values: dict[str, float]) -> None:
        if not self.first:
            self.first = dict(values)
        start, now = sum(self.first.values()), sum(values.values())
        if self.warned or start <= 0 or now <= self.factor * start:
            return
        self.warned = True
        term = max(values, key=lambda k: values[k] - self.first.get(k, 0.0))
        msg = (
            f"{self.name} loss grew from {start:.3g} (first logged) to {now:.3g} at iteration {it}, more than "
            f"{self.factor:g}x ({term}: {self.first.get(term, 0.0):.3g} -> {values[term]:.3g}): the fine-tune lr "
            "is probably too high for its batch"
        )
        self.log(f"WARNING: {msg}")
        warnings.warn(msg, LossGrowthWarning, stacklevel=2)


def log_lr_scaling(tag: str, lr: float, batch_size: int, lr_batch: int, log: Callable[[str], None]) -> float:
    """Log the lr the fine-tune uses, and how it follows from the recipe's lr; returns it."""
    used = scaled_lr(lr, batch_size, lr_batch)
    rule = f" (linear scaling: lr {lr:g} at batch {lr_batch} x {batch_size}/{lr_batch})"
    rule = "" if batch_size == lr_batch else rule
    log(f"{tag} lr {used:.4g} at batch {batch_size}{rule}")
    return used


class InfiniteSampler(Sampler):
    """Endless reshuffled passes over the dataset (detectron2 TrainingSampler), one rank's share.

    The passes form one global stream of indices; rank r takes stream positions r, r + world, ...
    So local batch ``it`` of B/world items on each rank is, over the ranks, exactly the
    one-process batch ``it`` of B items (stream positions it·B .. it·B + B − 1), whatever the
    dataset size. ``positions=True`` yields (stream position, index) pairs, for randomness keyed
    by the position (``parallel.keyed_generator``)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, positions: bool = False):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.positions = positions

    def __iter__(self) -> Iterator:
        g = torch.Generator().manual_seed(self.seed)
        stream = (i for _ in itertools.count() for i in torch.randperm(self.size, generator=g).tolist())
        for pos, i in enumerate(stream):
            if pos % self.world_size == self.rank:
                yield (pos, i) if self.positions else i


def stream_positions(it: int, local_batch: int, ctx: DistContext) -> list[int]:
    """Global stream positions of local batch ``it`` on this rank (see ``InfiniteSampler``)."""
    return [(it * local_batch + j) * ctx.world_size + ctx.rank for j in range(local_batch)]


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Flip a 3×H×W image and its target (xyxy boxes, N×H×W masks) left-right."""
    w = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    out["boxes"] = boxes
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


def _to_device(
    images: list[Tensor],
    targets: list[dict],
    s: DetectionSettings,
    gens: list[torch.Generator],
    device: torch.device,
) -> tuple[list[Tensor], list[dict]]:
    """uint8 images -> float 0..1 on device (the model normalises), random flips (one generator
    per image, keyed by its stream position), targets moved."""
    out_i, out_t = [], []
    for img, tgt, gen in zip(images, targets, gens, strict=True):
        if s.hflip and torch.rand((), generator=gen) < 0.5:
            img, tgt = hflip(img, tgt)
        out_i.append(img.to(device, non_blocking=True).float() / 255.0)
        out_t.append({k: v.to(device, non_blocking=True) for k, v in tgt.items()})
    return out_i, out_t


def data_parallel(model: nn.Module, data: EvalData) -> nn.Module:
    """DDP over ``data.dist`` with SyncBN (backbone, FPN, heads: the papers' configs): torch's
    ``SyncBatchNorm`` on GPUs, ``parallel.GlooSyncBatchNorm`` on CPU (torch's refuses CPU)."""
    if not data.dist.enabled:
        return model
    model = convert_sync_batchnorm(model, data.device)
    device_ids = [data.device] if data.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def autocast(s: DetectionSettings | object, device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA when the settings' ``amp`` is on; a no-op on CPU."""
    enabled = device.type == "cuda" and bool(getattr(s, "amp", True))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_detector(model: GeneralizedRCNN, dataset: Dataset, s: DetectionSettings, data: EvalData) -> nn.Module:
    """Fine-tune every layer for ``s.iterations`` steps; returns the (maybe DDP-wrapped) model."""
    ctx = data.dist
    if s.batch_size % ctx.world_size:
        raise ConfigError(f"batch_size {s.batch_size} is not divisible by the world size {ctx.world_size}")
    model = data_parallel(model.to(data.device).train(), data)
    if ctx.is_main:
        log_lr_scaling("[det]", s.lr, s.batch_size, s.lr_batch, data.log)
    watch = LossWatch("[det]", data.log)
    opt = _optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: lr_factor(it, s))
    local = s.batch_size // ctx.world_size
    loader = DataLoader(
        dataset,
        batch_size=local,
        collate_fn=collate_detection,
        sampler=InfiniteSampler(len(dataset), data.seed, ctx.rank, ctx.world_size),
        num_workers=data.num_workers,
        pin_memory=data.device.type == "cuda",
    )
    running: dict[str, Tensor] = {}
    for it, (images, targets) in zip(range(s.iterations), loader, strict=False):
        gens = [keyed_generator(data.seed, 7919, p) for p in stream_positions(it, local, ctx)]
        images, targets = _to_device(images, targets, s, gens, data.device)
        use_image_generators(model, gens)  # then the size choice and the fg/bg samples
        with autocast(s, data.device):
            # loss_classifier, loss_box_reg, [loss_mask], loss_objectness, loss_rpn_box_reg
            losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in losses.items():  # device tensors: no host sync until a logging iteration
            running[k] = running.get(k, 0.0) + v.detach().float()
        if (it + 1) % s.log_every == 0 or it + 1 == s.iterations:
            _log_losses(it, running, s, opt, watch, data)
            running = {}
    _precise_bn_pass(model, dataset, s, data)
    use_image_generators(model, None)
    return model


def _log_losses(
    it: int,
    running: dict[str, Tensor],
    s: DetectionSettings,
    opt: torch.optim.Optimizer,
    watch: LossWatch,
    data: EvalData,
) -> None:
    """The mean of each loss term since the last log (rank 0's); raises on a non-finite one."""
    n = (it % s.log_every) + 1
    means = {k: float(v) / n for k, v in running.items()}  # the one host sync per log_every iterations
    if not all(math.isfinite(v) for v in means.values()):
        raise TrainingError(
            f"detection fine-tune: non-finite loss in iterations {it + 2 - n}..{it + 1}: "
            f"{ {k: round(v, 4) for k, v in means.items()} }"
        )
    if data.dist.is_main:
        parts = " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in means.items())
        data.log(f"[det] iter {it + 1}/{s.iterations} lr={opt.param_groups[0]['lr']:.4g} {parts}")
        watch.update(it + 1, means)


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers in training mode (fvcore ``get_bn_modules``)."""
    return [m for m in model.modules() if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable[tuple],
    iters: int,
    reduce: Callable[[Tensor], Tensor] | None = None,
    count: Callable[[int], int] | None = None,
) -> int:
    """PreciseBN (fvcore ``update_bn_stats`` as detectron2's ``hooks.PreciseBN`` runs it): with
    the weights fixed, set each training-mode BatchNorm's running statistics to the population
    statistics of ``iters`` batches: mean = count-weighted mean of batch means, var = E[x²] −
    E[x]² (batch variances un-Bessel-corrected). ``batches`` yields ``model``'s positional
    arguments; ``reduce`` (e.g. a mean over ranks) is applied to the (mean, E[x²]) estimates;
    ``count`` maps a layer's local sample count to the count its statistics span (the global
    batch's, for BatchNorm synchronised over ranks). Returns how many BatchNorm layers were updated."""
    bns = _bn_layers(model)
    if not bns or iters < 1:
        return 0
    counts: dict[nn.Module, int] = {}
    size = count or (lambda n: n)
    hooks = [
        bn.register_forward_pre_hook(lambda m, inp: counts.__setitem__(m, size(inp[0].numel() // inp[0].shape[1])))
        for bn in bns
    ]
    momenta, tot = [bn.momentum for bn in bns], [0] * len(bns)
    est = [torch.zeros(2, *bn.running_mean.shape, dtype=torch.float64) for bn in bns]  # mean, E[x²]
    try:
        for bn in bns:
            bn.momentum = 1.0  # running stats = this batch's (var Bessel-corrected, as torch stores it)
        for args in itertools.islice(batches, iters):
            counts.clear()
            model(*args)
            for i, bn in enumerate(bns):
                n = counts.get(bn)
                if n is None:  # unused in this forward
                    continue
                tot[i] += n
                m, v = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
                est[i] += (torch.stack([m, m.square() + v * (n - 1) / n]) - est[i]) * (n / tot[i])
    finally:
        for h in hooks:
            h.remove()
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
    for i, bn in enumerate(bns):
        if tot[i]:
            e = reduce(est[i]) if reduce is not None else est[i]
            bn.running_mean.copy_(e[0])
            bn.running_var.copy_(e[1] - e[0].square())
    return len(bns)


def _precise_bn_pass(model: nn.Module, dataset: Dataset, s: DetectionSettings, data: EvalData) -> None:
    """PreciseBN over ``min(precise_bn_iters, iterations)`` fresh training batches (detectron2
    builds a new train loader), on the unwrapped model. Data-parallel, BatchNorm is synchronised
    (``data_parallel``): every rank sees the global batch's statistics and weights them by the
    global count, so every rank computes the one-process estimate."""
    iters = min(s.precise_bn_iters, s.iterations)
    if iters < 1:
        return
    ctx = data.dist
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    loader = DataLoader(
        dataset,
        batch_size=s.batch_size // ctx.world_size,
        collate_fn=collate_detection,
        sampler=InfiniteSampler(len(dataset), data.seed + 1, ctx.rank, ctx.world_size),
        num_workers=data.num_workers,
        pin_memory=data.device.type == "cuda",
    )
    local = s.batch_size // ctx.world_size

    def batches() -> Iterator[tuple]:
        for it, (images, targets) in enumerate(loader):
            gens = [keyed_generator(data.seed, 104729, p) for p in stream_positions(it, local, ctx)]
            batch = _to_device(images, targets, s, gens, data.device)
            use_image_generators(net, gens)
            yield batch

    def global_count(n: int) -> int:  # SyncBN: each layer's statistics span every rank's batch
        t = torch.tensor([n], device=data.device if data.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return int(t)

    n = precise_bn(net, batches(), iters, count=global_count if ctx.enabled else None)
    data.log(f"[det] PreciseBN: {n} BatchNorm layers over {iters} batches")


def _gather(items: list, data: EvalData) -> list:
    if not data.dist.enabled:
        return items
    out: list[list | None] = [None] * data.dist.world_size
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    s: DetectionSettings,
    data: EvalData,
    convert: Callable[[int, dict[str, Tensor]], list],
) -> list:
    """Run the detector on every image (each rank a share) at ``test_min_size``; ``convert(index,
    output)`` turns one image's output (boxes xyxy, labels, scores[, masks N×1×H×W]) into result
    records right away, so full-size masks are never kept. Returns all ranks' records."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    net.eval()
    net.transform.min_size = (s.test_min_size,)
    indices = list(range(data.dist.rank, len(dataset), data.dist.world_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=s.batch_size,
        collate_fn=collate_detection,
        num_workers=data.num_workers,
    )
    records: list = []
    for b, (images, _) in enumerate(loader):
        outputs = net([img.to(data.device, torch.float32) / 255.0 for img in images])
        for j, out in enumerate(outputs):
            records += convert(indices[b * s.batch_size + j], {k: v.cpu() for k, v in out.items()})
    return _gather(records, data)
