"""Mask-pooled contrastive learning (DetCon-B loss) as CYBORGS uses it.

[Hénaff et al., DetCon, ICCV 2021; REPO deepmind/detcon@8a3c5d8] and [Wang, Zhao, Gao, CYBORGS,
ECCV 2022; REPO renwang435/CYBORGS@5737d31 ``model/builder.py``, ``model/losses.py``]:

* ``crop_masks``: carry integer segment maps through the views' crop + resize + flip (nearest);
* ``masks_to_grid``: one-hot the segments, average-pool each to the feature grid, give every cell
  its majority segment (cells that are all "ignore" (-1) stay -1);
* ``sample_segments``: draw R segment ids per view as CYBORGS' ``MaskPooling.sample_masks``:
  without replacement, the present ids first, then absent ones (which pool to zero vectors);
* ``mask_pool``: the mean feature of each sampled segment's cells;
* ``per_slot``: a head applied to each sample slot on its own (CYBORGS ``MLP.forward``: BatchNorm
  statistics per slot over the B images);
* ``hypercolumn``: CYBORGS' features: C3, C4 average-pooled to the C5 grid and concatenated;
* ``detcon_loss``: InfoNCE over segment vectors, positive = the other view's target vector of the
  same segment of the same image, negatives = every other target vector of the (gathered) batch;
  each term weighted by 1 / (online samples of its view sharing its id), CYBORGS ``DetConBLoss``.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from cropbench.dist import DistContext, gather_no_grad
from cropbench.errors import DatasetError
from cropbench.io import save_torch_atomic
from cropbench.types import ImageBatch

IGNORE = -1  # segment id of pixels that belong to no segment (e.g. padding)


def crop_masks(masks: Tensor, boxes: Tensor, flipped: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Nearest-neighbour crop-resize-flip of segment maps, the views' geometry. -> B×h×w long.

    masks: B×H×W integer ids; boxes: B×4 (x0, y0, x1, y1) canvas pixels, pixel k covering [k, k+1);
    output pixel u samples the source pixel containing ``x0 + (u + 0.5)·(x1 - x0)/w``.
    """
    b, hh, ww = masks.shape
    h, w = out_hw
    u = (torch.arange(w, device=masks.device).float() + 0.5) / w  # B×w after broadcasting
    v = (torch.arange(h, device=masks.device).float() + 0.5) / h
    bx = boxes.float().to(masks.device)
    xs = (bx[:, :1] + u * (bx[:, 2:3] - bx[:, :1])).floor().long().clamp(0, ww - 1)  # B×w
    ys = (bx[:, 1:2] + v * (bx[:, 3:4] - bx[:, 1:2])).floor().long().clamp(0, hh - 1)  # B×h
    xs = torch.where(flipped.view(-1, 1).to(masks.device), xs.flip(1), xs)
    rows = torch.gather(masks, 1, ys.unsqueeze(2).expand(-1, -1, ww))  # B×h×W
    return torch.gather(rows, 2, xs.unsqueeze(1).expand(-1, h, -1))


def masks_to_grid(masks: Tensor, grid_hw: tuple[int, int], num_segments: int) -> Tensor:
    """Majority segment id per feature cell: B×H×W ids -> B×gh×gw long (-1: no valid pixel).

    Ids must lie in [-1, num_segments); anything else is an error (the official code silently
    drops ids >= 81, which can leave a view without segments).
    """
    lo, hi = int(masks.min()), int(masks.max())
    if lo < IGNORE or hi >= num_segments:
        raise ValueError(
            f"segment ids must lie in [-1, {num_segments}), got range [{lo}, {hi}]; "
            f"raise num_segments or relabel the masks"
        )
    onehot = F.one_hot((masks + 1).long(), num_segments + 1).permute(0, 3, 1, 2).float()
    area = F.adaptive_avg_pool2d(onehot, grid_hw)  # B×(S+1)×gh×gw, slot 0 = ignore
    best = area[:, 1:].max(dim=1)
    return torch.where(best.values > 0, best.indices, torch.full_like(best.indices, IGNORE))


def segments_present(grid_ids: Tensor, num_segments: int) -> Tensor:
    """Which segment ids occur in each view's grid: B×gh×gw -> B×num_segments bool."""
    b = grid_ids.shape[0]
    present = torch.zeros(b, num_segments + 1, dtype=torch.bool, device=grid_ids.device)
    present.scatter_(1, grid_ids.reshape(b, -1) + 1, True)
    return present[:, 1:]


def sample_segments(grid_ids: Tensor, n: int, num_segments: int, generator: torch.Generator) -> Tensor:
    """R = n segment ids per view, as CYBORGS' ``MaskPooling.sample_masks``. -> B×n long.

    n <= num_segments: without replacement, the ids present in the view first, in uniformly random
    order, then ids absent from it (uniformly random too). The official code draws
    ``torch.multinomial(present + 1e-11, n)`` without replacement: the same law up to the 1e-11
    weights. An absent id pools to a zero vector and takes part in the loss like a present one.
    n > num_segments: with replacement among the present ids (the official code's other branch).
    A view with no valid cell gets ids -1 (its terms then carry zero weight in ``detcon_loss``).
    """
    present = segments_present(grid_ids, num_segments).to(generator.device)
    empty = ~present.any(dim=1, keepdim=True)
    if n > num_segments:
        probs = torch.where(empty, torch.ones_like(present), present).float()
        draw = torch.multinomial(probs, n, replacement=True, generator=generator)
    else:  # a random key per id, +1 for present ids: descending keys = present ids first
        keys = torch.rand(present.shape, generator=generator, device=generator.device)
        draw = (keys + present.float()).topk(n, dim=1).indices
    return torch.where(empty, torch.full_like(draw, IGNORE), draw).to(grid_ids.device)


def mask_pool(features: Tensor, grid_ids: Tensor, seg_ids: Tensor) -> Tensor:
    """Mean feature over the cells of each sampled segment: B×C×gh×gw, B×gh×gw, B×R -> B×R×C.

    Segments with no cell in the view (or id -1) pool to zeros.
    """
    cell_ids, seg = grid_ids.flatten(1).unsqueeze(1), seg_ids.unsqueeze(2)
    member = (cell_ids == seg) & (seg >= 0)  # B×R×N
    weights = member.float() / member.sum(2, keepdim=True).clamp_min(1)
    return torch.bmm(weights.to(features.dtype), features.flatten(2).transpose(1, 2))


def per_slot(head: nn.Module, x: Tensor) -> Tensor:
    """Apply ``head`` to each sample slot on its own: B×R×C -> B×R×D.

    CYBORGS ``MLP.forward`` (model/builder.py) runs Linear-BN-ReLU-Linear on ``x[:, r]`` for
    r = 0..R-1, so BatchNorm normalises each slot over the B images (its running statistics are
    updated R times per call), not over all B·R segment vectors as DetCon's haiku MLP does.
    """
    return torch.stack([head(x[:, r]) for r in range(x.shape[1])], dim=1)


def hypercolumn(stages: list[Tensor]) -> Tensor:
    """Average-pool every map to the last one's grid and concatenate channels. -> B×ΣC×h×w."""
    h, w = stages[-1].shape[2:]
    return torch.cat([F.adaptive_avg_pool2d(s, (h, w)) if s.shape[2:] != (h, w) else s for s in stages], dim=1)


def _one_direction(
    pred: Tensor,
    pid: Tensor,
    t_other: Tensor,
    tid_other: Tensor,
    t_same: Tensor,
    tid_same: Tensor,
    offset: int,
    temperature: float,
) -> Tensor:
    """View-a predictions against [other-view targets, same-view targets] of the gathered batch."""
    b, r, _ = pred.shape
    n_all = t_other.shape[0]  # images in the gathered batch
    img = torch.arange(b, device=pred.device) + offset  # local images' rows in the gathered batch
    same_img = img.view(b, 1, 1, 1) == torch.arange(n_all, device=pred.device).view(1, 1, -1, 1)
    p = pid.view(b, r, 1, 1)
    pos = same_img & (p == tid_other.view(1, 1, n_all, -1)) & (p >= 0)  # B×R×B'×R
    self_match = same_img & (p == tid_same.view(1, 1, n_all, -1))  # same view: masked out
    drop_o = (tid_other < 0).view(1, 1, n_all, -1).float()  # targets without a segment
    drop_s = (self_match | (tid_same < 0).view(1, 1, n_all, -1)).float()
    logits_o = torch.einsum("brd,ukd->bruk", pred, t_other) / temperature - 1e9 * drop_o
    logits_s = torch.einsum("brd,ukd->bruk", pred, t_same) / temperature - 1e9 * drop_s
    logits = torch.cat([logits_o, logits_s], dim=2).reshape(b, r, -1)
    labels = torch.cat([pos, torch.zeros_like(self_match)], dim=2).reshape(b, r, -1).float()
    n_pos = labels.sum(-1, keepdim=True)
    labels = labels / n_pos.clamp_min(1)
    # obj_area: online samples of this view and image with the prediction's id (itself included)
    obj_area = (pid.unsqueeze(2) == pid.unsqueeze(1)).float().sum(2)  # B×R, >= 1
    weight = (n_pos.squeeze(-1) > 0).float() / obj_area
    return (-(labels * F.log_softmax(logits, dim=-1)).sum(-1) * weight).mean()


def detcon_loss(
    pred1: Tensor,
    pred2: Tensor,
    target1: Tensor,
    target2: Tensor,
    pid1: Tensor,
    pid2: Tensor,
    tid1: Tensor,
    tid2: Tensor,
    temperature: float,
    dist: DistContext | None = None,
) -> Tensor:
    """DetCon-B loss as CYBORGS ``DetConBLoss`` (model/losses.py), both directions summed.

    pred*: B×R×D online predictions of views 1, 2; target*: B×R×D target projections (no grad);
    pid*/tid*: B×R segment ids of the online / target samples, drawn independently (-1 = none).
    For prediction (b, r) of view a: positives are view-b targets of image b with the same id
    (their log-probabilities averaged), logits of view-a targets of image b with the same id are
    masked out, all other gathered targets are negatives. Each term is weighted by
    [has a positive] / obj_area, obj_area = the number of *online* view-a samples of image b with
    that id (the official ``same_obj(pind1, pind1)``; 1 whenever ids are drawn without
    replacement); the terms are averaged over B·R. Our addition for ids -1 (views without any
    segment, which the official data never has): such targets are masked out of the logits and
    such predictions carry zero weight.
    """
    dist = dist or DistContext()
    p1, p2 = F.normalize(pred1.float(), dim=-1), F.normalize(pred2.float(), dim=-1)
    t1 = gather_no_grad(F.normalize(target1.detach().float(), dim=-1), dist)
    t2 = gather_no_grad(F.normalize(target2.detach().float(), dim=-1), dist)
    g1, g2 = gather_no_grad(tid1, dist), gather_no_grad(tid2, dist)
    offset = dist.rank * pred1.shape[0]
    return _one_direction(p1, pid1, t2, g2, t1, g1, offset, temperature) + _one_direction(
        p2, pid2, t1, g1, t2, g2, offset, temperature
    )


# ------------------------------------------------------------------ mask files


@dataclass
class MaskFile:
    """One round of masks, as saved under ``<run_dir>/masks/``."""

    masks: Tensor  # N×h×w int16 segment ids (-1: none); h, w divide the canvas size
    checksums: Tensor  # N int64: ``checksum`` of the canvas each mask was made for
    round: int = 0
    source: str = ""

    def save(self, path: Path) -> None:
        save_torch_atomic(asdict(self), path)

    @staticmethod
    def load(path: Path) -> MaskFile:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return MaskFile(**{k: blob[k] for k in ("masks", "checksums", "round", "source")})
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise DatasetError(f"{path}: not a cropbench mask file (masks, checksums, round, source): {e}") from e


class MaskedImages(Dataset):
    """A canvas dataset whose samples also carry their segment map (CYBORGS' training set)."""

    def __init__(self, base: Any, checksums: Tensor, image_size: int, num_segments: int = 256):
        self.base, self.checksums, self.image_size = base, checksums, image_size
        self.num_segments = num_segments  # ids must lie in [-1, num_segments)
        self.masks: Tensor | None = None
        self.source = ""

    def set_masks(self, mf: MaskFile, path: Path) -> None:
        """Validate a mask file against the images, then use it. Mismatch -> DatasetError."""
        n, s = len(self.checksums), self.image_size
        if mf.masks.dim() != 3 or mf.masks.shape[0] != n:
            raise DatasetError(
                f"{path}: masks has shape {tuple(mf.masks.shape)}, expected {n}×h×w for the {n} training images"
            )
        h, w = mf.masks.shape[1:]
        if s % h or s % w:
            raise DatasetError(f"{path}: mask resolution {h}×{w} does not divide the {s}×{s} canvas")
        lo, hi = int(mf.masks.min()), int(mf.masks.max())
        if lo < -1 or hi >= self.num_segments:
            raise DatasetError(
                f"{path}: segment ids span [{lo}, {hi}], expected [-1, {self.num_segments}) "
                f"(params.num_segments); relabel the masks or raise num_segments"
            )
        bad = (mf.checksums != self.checksums).nonzero()
        if len(bad):
            raise DatasetError(
                f"{path}: mask {int(bad[0])} (and {len(bad) - 1} more) was made for another "
                f"image than training sample {int(bad[0])}; regenerate the masks for this dataset"
            )
        self.masks, self.source = mf.masks, str(path)

    def __len__(self) -> int:
        return len(self.checksums)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, Tensor]:
        img, label, idx = self.base[i]
        if self.masks is None:
            raise DatasetError("MaskedImages: no masks loaded yet (call set_masks)")
        m = self.masks[i].long()
        sy, sx = self.image_size // m.shape[0], self.image_size // m.shape[1]
        return img, label, idx, m.repeat_interleave(sy, 0).repeat_interleave(sx, 1)

    @staticmethod
    def collate(samples: list[tuple[Tensor, int, int, Tensor]]) -> ImageBatch:
        imgs, labels, idx, masks = zip(*samples, strict=True)
        return ImageBatch(
            torch.stack(imgs),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(idx, dtype=torch.long),
            masks=torch.stack(masks),
        )
