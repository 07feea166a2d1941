"""Action recognition on UCF101 / HMDB51: frozen linear probe or full fine-tuning, video-level
accuracy from clip predictions averaged over ``test_clips`` temporal × ``test_crops`` spatial views.

* ``linear`` (BraVe's released evaluator, papers.md §4.3): frozen encoder features of
  ``train_clips`` augmented clips per training video, augmented as BraVe's ``_transform_train``
  (random temporal position, random crop of area 0.3-1 and aspect 0.5-2, flip, colour
  augmentation p 0.8 and grey p 0.2: ``brave_color_augment``), ``StandardScaler`` +
  ``LinearSVC(C)`` (BraVe: C = 1e-4), or a softmax regression (``classifier: logistic``).
  Features are extracted once and cached.
* ``finetune``: a copy of the encoder + dropout + linear head, trained end to end on random clips
  (crop of area 0.3-1, aspect 3/4-4/3, flip; SGD momentum 0.9, cosine lr), tested with the same
  multi-clip protocol.
* Test: ``test_clips`` clip starts from pytorchvideo's ``ConstantClipsPerVideoSampler``
  (10 at paper scale) × 1 or 3 spatial crops (pySlowFast's 3-crop); SVM scores / softmax
  probabilities are averaged per video. ``split: all`` runs the three official splits and
  reports their mean (``top1``) and each (``top1_split1``..3): papers mix split 1 and the mean.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.data import build_dataset, dataset_folder
from cropbench.data.video import VideoClips, Window, clip_batches, with_window
from cropbench.dist import DistContext, all_reduce_grads, barrier
from cropbench.errors import ConfigError
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.features import weights_hash
from cropbench.evaluations.parallel import (
    ShardDropout,
    all_agree,
    batch_sizes,
    convert_sync_batchnorm,
    gather_batches,
    owns,
)
from cropbench.io import save_torch_atomic
from cropbench.views.image import ViewConfig, adjust_hue, to_gray
from cropbench.views.video import VideoViewConfig, make_video_view
from cropbench.views.video_transforms import (
    KINETICS_MEAN,
    KINETICS_STD,
    eval_views,
    normalize_video,
    spatial_crops,
)

FIELD = "eval.ucf101.dataset / eval.hmdb51.dataset"  # names the setting in dataset errors


@dataclass(frozen=True)
class ActionSettings:
    """Protocol settings; defaults are the micro scale's, paper values in the comments."""

    dataset: str = "synth_ucf101"
    mode: Literal["linear", "finetune"] = "linear"
    split: Literal["1", "2", "3", "all"] = "1"  # official split; "all" = 3-split mean
    image_size: int = 32  # decoded canvas side (shorter side + centre crop); paper 128 / 256
    crop: int = 24  # network input side; BraVe 224, VideoMoCo / ParamCrop 112
    frames: int = 8  # BraVe 32, VideoMoCo 16-32
    stride: int = 2  # BraVe 2
    test_clips: int = 4  # BraVe / pySlowFast: 10
    test_crops: Literal[1, 3] = 1  # BraVe / pySlowFast: 3
    train_clips: int = 2  # linear: augmented clips per training video (BraVe: 10 augmented epochs)
    classifier: Literal["svm", "logistic"] = "svm"  # BraVe: StandardScaler + LinearSVC
    svm_c: float = 1e-4  # BraVe README numbers use C = 1e-4
    logistic_epochs: int = 100
    ft_epochs: int = 10  # fine-tune epochs (ParamCrop authors' codebase: 300)
    ft_lr: float = 0.02  # at ft_batch
    ft_batch: int = 16
    ft_weight_decay: float = 1e-4
    ft_dropout: float = 0.5  # ParamCrop authors' codebase: 0.5
    batch_size: int = 32  # clips per forward pass when extracting features / testing

    def __post_init__(self) -> None:
        if self.crop > self.image_size:
            raise ConfigError(f"eval: crop ({self.crop}) must be <= image_size ({self.image_size})")
        if min(self.frames, self.stride, self.test_clips, self.train_clips, self.batch_size) < 1:
            raise ConfigError("eval: frames, stride, test_clips, train_clips and batch_size must be >= 1")

    @property
    def span(self) -> int:
        return (self.frames - 1) * self.stride + 1


@dataclass(frozen=True)
class UCF101Settings(ActionSettings):
    dataset: str = "synth_ucf101"  # "ucf101" for the real dataset


@dataclass(frozen=True)
class HMDB51Settings(ActionSettings):
    dataset: str = "synth_hmdb51"  # "hmdb51" for the real dataset


def clip_starts(n_frames: int, span: int, clips: int) -> list[int]:
    """Start frames of ``clips`` evenly spaced clips of ``span`` frames, by pytorchvideo's
    ``ConstantClipsPerVideoSampler`` (run in frame units): start_k = k·max(n − span, 0)/clips."""
    sampler = ConstantClipsPerVideoSampler(clip_duration=span, clips_per_video=clips)
    starts = []
    for _ in range(clips):
        info = sampler(0, n_frames, None)
        starts.append(int(math.floor(info.clip_start_sec)))
        if info.is_last_clip:
            break
    return starts


def _chunks(x: Tensor, n: int) -> list[Tensor]:
    return list(x.split(n)) if x.shape[0] else []


@torch.no_grad()
def encode(encoder: nn.Module, views: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """N×3×T×h×w -> N×D float32 features on CPU (bf16 autocast on CUDA)."""
    out = []
    for chunk in _chunks(views, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder(chunk.to(device)).float().cpu())
    return torch.cat(out)


def test_video_views(ds: VideoClips, s: ActionSettings) -> Iterator[tuple[Tensor, int, bool]]:
    """Per decodable test video: its (clips·crops)×3×T×crop×crop views, label, whether looped.

    Undecodable videos are skipped (the dataset warns, counts and names them)."""
    crops = spatial_crops(ds.image_size, s.crop, s.test_crops)
    for i in range(len(ds)):
        views = _test_views(ds, i, s, crops)
        if views is not None:
            yield views


def _u(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _per_clip(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def tf_adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """``tf.image.adjust_saturation`` in closed form: HSV saturation S -> clip(S·f, 0, 1) at
    fixed hue and value V, i.e. each channel c -> V − (V − c)·min(f, V / (V − min)); a pixel
    with V <= 0 has S = 0 in TF's HSV and comes back grey (V, V, V). x: B×3×..., factor: B."""
    v = x.max(dim=1, keepdim=True).values
    span = v - x.min(dim=1, keepdim=True).values
    ratio = torch.minimum(_per_clip(factor, x), v / span.clamp(min=1e-12))
    out = torch.where(span > 0, v - (v - x) * ratio, x)
    return torch.where(v > 0, out, v.expand_as(x))


def brave_color_ops(x: Tensor, delta: Tensor, sat: Tensor, con: Tensor, hue: Tensor) -> Tensor:
    """TF's colour ops in BraVe's order on B×3×T×H×W clips, per-clip parameters (B each):
    brightness + delta, saturation ×sat, contrast ×con about each frame's per-channel mean (TF's
    ``adjust_contrast`` per image), hue + hue turns, then clip to [0, 1] (TF clips only here)."""
    y = tf_adjust_saturation(x + _per_clip(delta, x), sat)
    mean = y.mean(dim=(3, 4), keepdim=True)
    y = mean + (y - mean) * _per_clip(con, y)
    return adjust_hue(y, hue.to(x.device, x.dtype)).clamp(0, 1)


def brave_color_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """BraVe's evaluator colour augmentation on B×3×T×H×W clips in [0, 1], one draw per clip
    for all its frames (deepmind/brave@0ae20d9 brave/datasets/augmentations.py
    ``_color_default_augm`` with prob_color_augment 0.8, prob_color_drop 0.2): with p 0.8
    ``brave_color_ops`` with delta U(±32/255), saturation and contrast U(0.6, 1.4), hue U(±0.2);
    then, independently, with p 0.2 grey (``tf.image.rgb_to_grayscale`` weights)."""
    n = x.shape[0]
    coin = torch.rand(n, generator=generator) < 0.8
    delta, sat = _u(n, -32 / 255, 32 / 255, generator), _u(n, 0.6, 1.4, generator)
    con, hue = _u(n, 0.6, 1.4, generator), _u(n, -0.2, 0.2, generator)
    x = torch.where(_per_clip(coin, x) > 0, brave_color_ops(x, delta, sat, con, hue), x)
    gray = torch.rand(n, generator=generator) < 0.2
    return torch.where(_per_clip(gray, x) > 0, to_gray(x).expand_as(x), x)


class TrainBatch(NamedTuple):
    views: Tensor  # B×3×frames×crop×crop, normalised (this rank's rows when sharded)
    labels: Tensor  # B
    batch_size: int  # rows of the one-process batch (over every rank)


def train_batches(
    ds: VideoClips,
    s: ActionSettings,
    epoch: int,
    generator: torch.Generator,
    shuffle: bool,
    keep: Callable[[int], bool] | None = None,
    rows: slice = slice(None),
) -> Iterator[TrainBatch | None]:
    """One pass of random augmented training clips (random temporal position in the video, crop
    of area 0.3-1, flip; in linear mode BraVe's aspect 0.5-2 and colour augmentation) ->
    ``TrainBatch``es of B×3×T×crop×crop views and B labels.

    ``keep(j)`` (data-parallel extraction): whether this rank needs batch ``j``. A batch it does not
    keep is not decoded and yields None, but its random draws (which depend on the batch's shape
    only) are replayed on a zero batch, so every later batch gets the one-process draws.

    ``rows`` (data-parallel fine-tuning, e.g. ``slice(rank, None, world)``): decode only these rows
    of each batch and yield their views, drawn for the whole batch (the rows of other ranks are
    zeros): the same views as the one-process batch's rows, since every view operation is per clip."""
    brave = s.mode == "linear"  # BraVe's evaluator (brave/evaluate/evaluate_video_embedding.py)
    ratio = (0.5, 2.0) if brave else (3 / 4, 4 / 3)
    aug = VideoViewConfig(
        s.frames,
        s.stride,
        ViewConfig(size=s.crop, scale=(0.3, 1.0), ratio=ratio, jitter_p=0.0, gray_p=0.0, blur_p=0.0),
        temporal="start",
    )
    ds = with_window(ds, Window(s.span, 1))
    ds.set_epoch(epoch)
    order = torch.randperm(len(ds), generator=generator) if shuffle else torch.arange(len(ds))
    size = s.ft_batch if shuffle else s.batch_size
    for j, idx in enumerate(_chunks(order, size)):
        if shuffle and len(idx) < 2:  # BatchNorm needs two samples
            continue
        if keep is not None and not keep(j):
            zeros = torch.zeros(len(idx), 3, s.span, s.image_size, s.image_size, dtype=torch.uint8)
            _augment(zeros, aug, brave, generator)  # the draws only
            yield None
            continue
        if rows == slice(None):
            batch = ds.collate([ds[int(i)] for i in idx])
            yield TrainBatch(_augment(batch.video, aug, brave, generator), batch.labels, len(idx))
            continue
        full = torch.zeros(len(idx), 3, s.span, s.image_size, s.image_size, dtype=torch.uint8)
        mine = idx[rows]
        labels = torch.zeros(0, dtype=torch.long)
        if len(mine):
            batch = ds.collate([ds[int(i)] for i in mine])
            full[rows], labels = batch.video, batch.labels
        yield TrainBatch(_augment(full, aug, brave, generator)[rows], labels, len(idx))


def _augment(video: Tensor, aug: VideoViewConfig, brave: bool, generator: torch.Generator) -> Tensor:
    """uint8 B×3×T×S×S windows -> normalised B×3×frames×crop×crop training views."""
    views = make_video_view(video, aug, generator).tensor
    if brave:  # colour ops act on [0, 1] clips: undo the normalisation, augment, redo it
        views = normalize_video(brave_color_augment(_unnormalize(views), generator))
    return views


def _unnormalize(x: Tensor) -> Tensor:
    m = torch.tensor(KINETICS_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    return x * torch.tensor(KINETICS_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1) + m


# ---------------------------------------------------------------- linear protocol


def _cache_path(encoder: nn.Module, s: ActionSettings, split: str, data: EvalData) -> Path | None:
    if data.cache_dir is None:
        return None
    protocol = {
        k: v
        for k, v in asdict(s).items()
        if not k.startswith(("ft_", "logistic", "svm", "classifier", "split", "mode"))
    }
    parts = {
        "v": 2,  # 2: BraVe's colour augmentation of the training clips
        "weights": weights_hash(encoder),
        "protocol": protocol,
        "split": split,
        "seed": data.seed,
        "folder": str(dataset_folder(s.dataset, data.root, data.scale, FIELD).resolve()),
        "mode": data.device.type,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return Path(data.cache_dir) / "features" / f"action-{key}.pt"


def linear_features(encoder: nn.Module, s: ActionSettings, fold: str, data: EvalData) -> dict[str, Tensor]:
    """Frozen features of one split (cached): train N×D + labels; test V×K×D + labels.

    Data-parallel: the training batches (one pass per ``train_clips``) and the test videos are dealt
    round-robin over the ranks and gathered in order (``parallel.gather_batches``): the same
    batches and random draws as one process, so the same features. Rank 0 writes the cache."""
    ctx, device = data.dist, torch.device(data.device)
    path = _cache_path(encoder, s, fold, data)
    if path is not None and all_agree(path.exists(), ctx, device):
        data.log(f"{s.dataset} split {fold}: cached features {path.name}")
        return torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(data.seed)
    train = build_dataset(s.dataset, f"train{fold}", data.root, data.scale, FIELD, image_size=s.image_size)
    test = build_dataset(s.dataset, f"test{fold}", data.root, data.scale, FIELD, image_size=s.image_size)
    per_pass = batch_sizes(len(train), s.batch_size)
    xs, ys = [], []
    for epoch in range(s.train_clips):
        keep = lambda j, e=epoch: owns(e * len(per_pass) + j, ctx)  # noqa: E731
        for out in train_batches(train, s, epoch, gen, shuffle=False, keep=keep if ctx.enabled else None):
            if out is not None:
                xs.append(encode(encoder, out[0], s.batch_size, device))
                ys.append(out[1])
    sizes = per_pass * s.train_clips
    train_x = gather_batches(_cat(xs, 2), sizes, ctx, device)
    train_y = gather_batches(_cat(ys, 1, torch.int64), sizes, ctx, device)
    test_x, test_y, looped = sharded_test(test, s, lambda v: encode(encoder, v, s.batch_size, device), data)
    if looped:
        data.log(f"{s.dataset} split {fold}: {looped} test video(s) shorter than {s.span} frames looped")
    out = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "looped": torch.tensor(looped)}
    if path is not None:
        if ctx.is_main:
            save_torch_atomic(out, path)
        barrier(ctx)
    return out


def _cat(parts: list[Tensor], dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """torch.cat, or an empty ``dim``-D tensor for a rank that got no batch."""
    return torch.cat(parts) if parts else torch.zeros((0,) * dim, dtype=dtype)


def sharded_test(
    ds: VideoClips, s: ActionSettings, score: Callable[[Tensor], Tensor], data: EvalData
) -> tuple[Tensor, Tensor, int]:
    """``score`` ((clips·crops)×3×T×h×w views -> K×W) of every decodable test video, videos dealt
    round-robin over the ranks and gathered in order -> (V×K×W, V labels, looped videos).
    Undecodable videos are skipped (the dataset warns, counts and names them)."""
    ctx, device = data.dist, torch.device(data.device)
    crops = spatial_crops(ds.image_size, s.crop, s.test_crops)
    rows: list[Tensor | None] = []
    labels, looped = [], []
    for i in range(len(ds)):
        if not owns(i, ctx):
            continue
        views = _test_views(ds, i, s, crops)
        rows.append(None if views is None else score(views[0]))
        labels.append(-1 if views is None else views[1])
        looped.append(views is not None and views[2])
    like = next((r for r in rows if r is not None), None)
    local = torch.stack([r if r is not None else torch.zeros_like(like) for r in rows]) if like is not None else None
    x = gather_batches(local if local is not None else torch.zeros(0, 0, 0), [1] * len(ds), ctx, device)
    y = gather_batches(torch.tensor(labels, dtype=torch.int64), [1] * len(ds), ctx, device)
    n_looped = gather_batches(torch.tensor(looped, dtype=torch.int64), [1] * len(ds), ctx, device)
    ok = y >= 0
    return x[ok], y[ok], int(n_looped.sum())


def _test_views(ds: VideoClips, i: int, s: ActionSettings, crops: Any) -> tuple[Tensor, int, bool] | None:
    """Test video ``i``'s (clips·crops)×3×T×crop×crop views, label, whether looped; None when
    it cannot be decoded."""
    frames = ds.full_video(i)
    if frames is None:
        return None
    starts = clip_starts(frames.shape[0], s.span, s.test_clips)
    clips, looped = clip_batches(ds, i, Window(s.frames, s.stride), starts)
    return eval_views(clips, crops, s.crop), ds.items[i].label, looped


def fit_classifier(x: Tensor, y: Tensor, num_classes: int, s: ActionSettings, seed: int) -> Callable[[Tensor], Tensor]:
    """Train on N×D features -> a function mapping M×D features to M×C class scores."""
    if s.classifier == "svm":
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        clf = make_pipeline(StandardScaler(), LinearSVC(C=s.svm_c, max_iter=10000, random_state=seed))
        clf.fit(x.numpy(), y.numpy())
        present = torch.as_tensor(clf.classes_)

        def svm_scores(f: Tensor) -> Tensor:
            d = torch.as_tensor(clf.decision_function(f.numpy()), dtype=torch.float32)
            d = d.view(f.shape[0], -1) if d.dim() == 2 else torch.stack([-d, d], dim=1)
            full = torch.full((f.shape[0], num_classes), -1e9)
            full[:, present] = d
            return full

        return svm_scores
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=s.logistic_epochs)
    xn = (x - mean) / std

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(xn), y) + 1e-4 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda f: torch.softmax(head((f - mean) / std), dim=1).detach()


def video_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """scores V×K×C (K views per video), labels V -> video top-1 (view mean) and clip top-1."""
    video = (scores.mean(dim=1).argmax(dim=1) == labels).float().mean().item() * 100
    clip = (scores.argmax(dim=2) == labels[:, None]).float().mean().item() * 100
    return {"top1": video, "clip_top1": clip}


def linear_split(encoder: nn.Module, s: ActionSettings, fold: str, data: EvalData) -> dict[str, float]:
    feats = linear_features(encoder, s, fold, data)
    num_classes = int(max(feats["train_y"].max(), feats["test_y"].max())) + 1
    score = fit_classifier(feats["train_x"], feats["train_y"], num_classes, s, data.seed)
    v, k, d = feats["test_x"].shape
    return video_accuracy(score(feats["test_x"].reshape(v * k, d)).view(v, k, -1), feats["test_y"])


# ---------------------------------------------------------------- fine-tuning protocol


def finetune_split(encoder: nn.Module, s: ActionSettings, fold: str, data: EvalData) -> dict[str, float]:
    """Fine-tune a copy of the encoder + dropout + linear head on split ``fold``; test (the test
    videos dealt round-robin over the ranks, ``sharded_test``)."""
    device = torch.device(data.device)
    train = build_dataset(s.dataset, f"train{fold}", data.root, data.scale, FIELD, image_size=s.image_size)
    test = build_dataset(s.dataset, f"test{fold}", data.root, data.scale, FIELD, image_size=s.image_size)
    model = finetune_model(encoder, s, train, data).eval()

    @torch.no_grad()
    def probabilities(views: Tensor) -> Tensor:  # K×C softmax scores of one video's views
        logits = torch.cat([model(c.to(device)).float().cpu() for c in _chunks(views, s.batch_size)])
        return torch.softmax(logits, dim=1)

    scores, labels, _ = sharded_test(test, s, probabilities, data)
    return video_accuracy(scores, labels)


def finetune_model(encoder: nn.Module, s: ActionSettings, train: VideoClips, data: EvalData) -> nn.Module:
    """SGD (momentum 0.9, cosine per step) on a copy of the encoder + dropout + linear head.

    Data-parallel: rank r takes rows r::world of each one-process batch (views drawn for the whole
    batch, ``train_batches(rows=...)``), BatchNorm is synchronised over the ranks, dropout masks are
    drawn for the whole batch (``ShardDropout``), and each rank's loss is its CE sum over the global
    batch size (× world: the gradient all-reduce averages): the one-process step, up to float
    summation order."""
    ctx, device = data.dist, torch.device(data.device)
    gen = torch.Generator().manual_seed(data.seed)
    torch.manual_seed(data.seed)
    dropout = ShardDropout(s.ft_dropout)
    dropout.shard = (ctx.rank, ctx.world_size)
    model = nn.Sequential(copy.deepcopy(encoder), dropout, nn.Linear(encoder.feat_dim, train.num_classes))
    model = model.to(device)
    if ctx.enabled:
        model = convert_sync_batchnorm(model, device)
    opt = torch.optim.SGD(model.parameters(), lr=s.ft_lr, momentum=0.9, weight_decay=s.ft_weight_decay)
    total, step = s.ft_epochs * max(1, math.ceil(len(train) / s.ft_batch)), 0
    rows = slice(ctx.rank, None, ctx.world_size) if ctx.enabled else slice(None)
    model.train()
    for epoch in range(s.ft_epochs):
        for views, labels, n in train_batches(train, s, epoch, gen, shuffle=True, rows=rows):
            for g in opt.param_groups:  # cosine schedule per step
                g["lr"] = s.ft_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            dropout.batch_size = n
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(views.to(device, non_blocking=True)).float()
            loss = _finetune_loss(logits, labels.to(device, non_blocking=True), n, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_grads(model.parameters(), ctx)
            opt.step()
            step += 1
    return model


def _finetune_loss(logits: Tensor, labels: Tensor, batch_size: int, ctx: DistContext) -> Tensor:
    """Mean CE over the batch; data-parallel, this rank's CE sum × world / the global batch size."""
    if not ctx.enabled:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") * (ctx.world_size / batch_size)


def evaluate_action(encoder: nn.Module, s: ActionSettings, data: EvalData) -> dict[str, float]:
    """Top-1 (video level) on split ``s.split`` or the mean over the three splits."""
    if getattr(encoder, "modality", "video") != "video":
        raise ConfigError(f"{s.dataset}: expected a video encoder (B×C×T×H×W input), got {type(encoder).__name__}")
    folds = ["1", "2", "3"] if s.split == "all" else [s.split]
    was_training = encoder.training
    encoder.eval().to(torch.device(data.device))
    try:
        run = linear_split if s.mode == "linear" else finetune_split
        per_fold = [run(encoder, s, f, data) for f in folds]
    finally:
        encoder.train(was_training)
    out = {k: float(np.mean([r[k] for r in per_fold])) for k in per_fold[0]}
    if len(folds) > 1:
        out.update({f"top1_split{f}": r["top1"] for f, r in zip(folds, per_fold, strict=True)})
    data.log(f"{s.dataset} {s.mode} split {s.split}: " + ", ".join(f"{k}={v:.2f}" for k, v in out.items()))
    return out


# Named fine-tune protocols (``eval: {ucf101: {preset: slowfast_finetune}}``), the dataset added per evaluation.
ACTION_PRESETS: dict[str, dict[str, Any]] = {
    # pySlowFast finetune_ucf_Slow_R50 (protocols.md 1c): SGD 0.01 cosine 200 epochs, dropout 0.8, wd 0, batch 64
    "slowfast_finetune": {"mode": "finetune", "split": "1", "image_size": 256, "crop": 224, "frames": 8,
                          "stride": 8, "test_clips": 10, "test_crops": 3, "ft_epochs": 200, "ft_lr": 0.01,
                          "ft_batch": 64, "ft_weight_decay": 0.0, "ft_dropout": 0.8},
    # the one-GPU scale's fine-tune: 16 x 112 px clips, 100 epochs at batch 32, split 1
    "small_finetune": {"mode": "finetune", "split": "1", "image_size": 128, "crop": 112, "frames": 16,
                       "stride": 2, "test_clips": 10, "test_crops": 3, "ft_epochs": 100, "ft_lr": 0.05,
                       "ft_batch": 32},
}  # fmt: skip


def _presets(dataset: str) -> dict[str, dict[str, Any]]:
    """The paper-scale presets on the real dataset, and ``micro``: the embedded synthetic videos with
    the linear protocol's SVM at C=0.01 (every micro video entry's setting)."""
    presets = {name: {"dataset": dataset, **values} for name, values in ACTION_PRESETS.items()}
    return {**presets, "micro": {"dataset": f"synth_{dataset}", "svm_c": 0.01}}


@register_evaluation(
    "ucf101", UCF101Settings, modality="video", metrics=("top1", "clip_top1"), presets=_presets("ucf101")
)
def evaluate_ucf101(encoder: nn.Module, settings: UCF101Settings, data: EvalData) -> dict[str, float]:
    """UCF101 action recognition: linear (frozen) or fine-tune, multi-clip video-level top-1."""
    return evaluate_action(encoder, settings, data)


@register_evaluation(
    "hmdb51", HMDB51Settings, modality="video", metrics=("top1", "clip_top1"), presets=_presets("hmdb51")
)
def evaluate_hmdb51(encoder: nn.Module, settings: HMDB51Settings, data: EvalData) -> dict[str, float]:
    """HMDB51 action recognition: linear (frozen) or fine-tune, multi-clip video-level top-1."""
    return evaluate_action(encoder, settings, data)
