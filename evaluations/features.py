"""Frozen-feature extraction shared by the kNN and linear protocols, cached on disk.

Protocol (torchvision / MoCo ``main_lincls`` validation transform): ``Resize(resize)`` of the
shorter side, ``CenterCrop(crop)``, ImageNet mean/std; 256/224 at paper scale. The dataset loader
already resizes the shorter side and centre-crops a square canvas (``to_canvas``), so the loader is
built with ``image_size=resize`` and the centre crop to ``crop`` happens batched on the device.

Features are cached under ``data.cache_dir/features/<key>.pt``, keyed by a hash of the encoder's
weights and buffers, the dataset (name, resolved folder, split), the transform and the numeric mode
(bf16 on CUDA, fp32 on CPU); the file is written to a temporary name and renamed into place. A
dataset rewritten in place at the same path is not detected: clear the cache after doing that.

Data-parallel (``data.dist`` with world > 1): rank r encodes the extraction batches r, r + world,
... of the one-process pass (``parallel.shard_batches``: the same batches, so the same features,
bit for bit on CPU) and every rank receives all rows in dataset order (``gather_batches``). The
ranks use the cache only when every rank can read it (``all_agree``); rank 0 alone writes it, and
the others wait for the write (barrier) so that a following read finds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from cropbench.data import build_dataset, dataset_folder
from cropbench.data.images import collate_images, normalize
from cropbench.dist import barrier
from cropbench.errors import ConfigError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.parallel import all_agree, batch_sizes, gather_batches, shard_batches
from cropbench.io import save_torch_atomic

# The frozen-feature protocols' named data settings (``knn`` and ``linear`` presets): ImageNet at
# Resize(256) + CentreCrop(224) (MoCo main_lincls validation transform), CIFAR-10 at its 32 px.
FEATURE_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"dataset": "imagenet", "resize": 256, "crop": 224},
    "cifar10": {"dataset": "cifar10", "resize": 32, "crop": 32},
}

# The micro frozen-feature resolution, shared by the kNN and linear defaults: the 64-px synthetic canvas
# at 1x, centre crop 7/8 of it as ImageNet's 224/256 (why not 36/32: knn.KnnSettings' docstring).
MICRO_RESIZE, MICRO_CROP = 64, 56

# bump when the extraction changes: old cache files are then ignored
CACHE_VERSION = 2  # 2: ImageFolder labels from the training split's class index


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's class, and every state-dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_key(
    encoder: nn.Module,
    dataset: str,
    split: str,
    folder: Path,
    resize: int,
    crop: int,
    device: torch.device,
) -> str:
    """Hex key of one cached feature set (see the module docstring for what it covers)."""
    parts = {
        "v": CACHE_VERSION,
        "weights": weights_hash(encoder),
        "dataset": dataset,
        "split": split,
        "folder": str(Path(folder).resolve()),
        "resize": resize,
        "crop": crop,
        "mode": "bf16" if device.type == "cuda" else "fp32",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _load_cached(path: Path, data: EvalData) -> tuple[Tensor, Tensor] | None:
    """The cached (features, labels), or None when there is no readable cache file."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["feats"], blob["labels"]
    except Exception as e:  # a damaged file is recomputed (and atomically replaced), not fatal
        data.log(f"features: ignoring unreadable cache file {path}: {e}")
        return None


@torch.no_grad()
def _forward_all(encoder: nn.Module, loader: DataLoader, crop: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Run the frozen encoder over the loader: -> (N×D float32 features, N int64 labels) on CPU."""
    cuda = device.type == "cuda"
    feats, labels = [], []
    for batch in loader:
        x = batch.images.to(device, non_blocking=True)  # B×3×r×r uint8 (r = resize)
        x = normalize(TF.center_crop(x, [crop, crop]))  # B×3×c×c float
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            f = encoder(x)  # B×D
        feats.append(f.float().cpu())
        labels.append(batch.labels.cpu())
    if not feats:  # a rank with no batch (fewer batches than ranks)
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def extract_features(
    encoder: nn.Module,
    dataset: str,
    data: EvalData,
    split: str = "train",
    resize: int = MICRO_RESIZE,
    crop: int = MICRO_CROP,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Frozen features of a dataset split -> (N×D float32, N int64), from the cache if it has them.

    The encoder is put in ``eval()`` mode (BN running statistics, as all frozen protocols) and moved
    to ``data.device`` (and to channels_last on CUDA); its train/eval mode is restored afterwards.
    """
    if crop > resize:
        raise ConfigError(f"feature extraction for {dataset!r}: crop ({crop}) must be <= resize ({resize})")
    if batch_size < 1:
        raise ConfigError(f"feature extraction for {dataset!r}: batch_size must be >= 1, got {batch_size}")
    device = torch.device(data.device)
    path = None
    if data.cache_dir is not None:
        key = feature_cache_key(
            encoder, dataset, split, dataset_folder(dataset, data.root, data.scale), resize, crop, device
        )
        path = Path(data.cache_dir) / "features" / f"{key}.pt"
        cached = _load_cached(path, data)
        if all_agree(cached is not None, data.dist, device):
            data.log(f"features: cache hit for {dataset}/{split} ({path.name})")
            return cached
    ds = build_dataset(dataset, split, data.root, data.scale, image_size=resize)
    feats, labels = _extract_sharded(encoder, ds, crop, batch_size, data)
    if path is not None:
        if data.dist.is_main:
            save_torch_atomic({"feats": feats, "labels": labels}, path)
            data.log(f"features: extracted {dataset}/{split} {tuple(feats.shape)} -> {path}")
        barrier(data.dist)  # the file is complete before any rank looks for it again
    return feats, labels


def _extract_sharded(encoder: nn.Module, ds: Any, crop: int, batch_size: int, data: EvalData) -> tuple[Tensor, Tensor]:
    """This rank's batches of the one-process pass through the frozen encoder, gathered from every
    rank in dataset order -> (N×D float32, N int64) on CPU."""
    device = torch.device(data.device)
    indices = shard_batches(len(ds), batch_size, data.dist)
    loader = DataLoader(
        torch.utils.data.Subset(ds, indices) if data.dist.enabled else ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=data.num_workers,
        collate_fn=getattr(ds, "collate", collate_images),
        pin_memory=device.type == "cuda",
    )
    was_training = encoder.training
    encoder.eval().to(device)
    if device.type == "cuda":
        encoder.to(memory_format=torch.channels_last)
    try:
        feats, labels = _forward_all(encoder, loader, crop, device)
    finally:
        encoder.train(was_training)
    sizes, ctx = batch_sizes(len(ds), batch_size), data.dist
    return gather_batches(feats, sizes, ctx, device), gather_batches(labels, sizes, ctx, device)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose label is in the k highest scores (scores N×C, labels N) -> {"top1"..}.

    With fewer than k classes, top-k counts every row as correct (k is clipped to C).
    """
    if scores.shape[0] != labels.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"topk_accuracy: {scores.shape[0]} score rows for {labels.shape[0]} labels")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # N×k, best first
    hit = top == labels.view(-1, 1)
    n = labels.shape[0]
    return {f"top{k}": int(hit[:, :k].any(dim=1).sum()) * 100.0 / n for k in ks}
