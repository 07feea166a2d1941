"""Weighted k-nearest-neighbour classification on frozen features (InstDisc; MoCo's CIFAR colab).

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018),
Sec. 3.5: for a query, take the k training features with the highest cosine similarity s_i, let each
vote for its class with weight exp(s_i / T), predict the class with the largest summed weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cropbench.errors import ConfigError
from cropbench.evaluations.base import EvalData, register_evaluation
from cropbench.evaluations.features import FEATURE_PRESETS, extract_features, topk_accuracy


@dataclass(frozen=True)
class KnnSettings:
    """kNN protocol. Defaults follow MoCo's CIFAR colab demo (k=200, T=0.1; InstDisc used k=200 with
    T=0.07); a paper-scale recipe that follows DINO sets k=20, T=0.07 and says so."""

    dataset: str = "synth_images"  # registered dataset; bank = train_split, queries = val_split
    k: int = 200  # neighbours per query (MoCo colab ``knn_k``)
    temperature: float = 0.1  # vote weight exp(sim / T) (MoCo colab ``knn_t``)
    resize: int = 36  # shorter side before the centre crop; paper scale: 256
    crop: int = 32  # centre crop = the micro view size; paper scale: 224
    batch_size: int = 256  # images per extraction batch
    train_split: str = "train"
    val_split: str = "val"
    chunk_size: int = 256  # queries per similarity block: bounds memory at chunk_size × N_bank floats


@torch.no_grad()
def knn_scores(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 256,
) -> Tensor:
    """Summed vote weights per class.

    bank: N×D, bank_labels: N int64, queries: Q×D (features need not be normalised; they are
    L2-normalised here). Returns Q×C float scores; argmax is the prediction.
    """
    if not 1 <= k <= bank.shape[0]:
        raise ConfigError(f"knn: k must be in 1..{bank.shape[0]} (the bank size), got {k}")
    if temperature <= 0:
        raise ConfigError(f"knn: temperature must be > 0, got {temperature}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float().to(bank.device), dim=1)
    bank_labels = bank_labels.to(bank.device)
    out = []
    for q in queries.split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # q×k cosine similarities of the nearest neighbours
        weight = (sim / temperature).exp()  # q×k
        votes = F.one_hot(bank_labels[idx], num_classes).float()  # q×k×C
        out.append((votes * weight.unsqueeze(-1)).sum(dim=1))  # q×C
    return torch.cat(out)


@register_evaluation("knn", KnnSettings, metrics=("top1", "top5"), presets=FEATURE_PRESETS)
def evaluate_knn(encoder: nn.Module, settings: KnnSettings, data: EvalData) -> dict[str, float]:
    """Weighted kNN (k, T) on frozen, L2-normalised pooled features; top-1/top-5 in percent."""
    kw = dict(resize=settings.resize, crop=settings.crop, batch_size=settings.batch_size)
    bank, bank_labels = extract_features(encoder, settings.dataset, data, settings.train_split, **kw)
    queries, labels = extract_features(encoder, settings.dataset, data, settings.val_split, **kw)
    num_classes = int(max(bank_labels.max(), labels.max())) + 1
    device = torch.device(data.device)
    scores = knn_scores(
        bank.to(device),
        bank_labels,
        queries,
        num_classes,
        settings.k,
        settings.temperature,
        settings.chunk_size,
    )
    return topk_accuracy(scores.cpu(), labels, (1, 5))
