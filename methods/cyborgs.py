"""CYBORGS: mask-pooled contrastive learning with masks bootstrapped from the model's own features.

[Wang, Zhao, Gao; ECCV 2022, arXiv 2203.09343; REPO renwang435/CYBORGS@5737d31]

    round 0 (prepare_dataset): masks <- colour k-means of the canvases (or a given mask file)
    each step: views of image + mask (same crop/flip) -> hyper-columns (C3, C4, C5) -> sample 16
               segments per view -> mask-pool -> BYOL heads -> DetCon-B loss vs an EMA target
    every N epochs (on_epoch_start): masks <- k-means of the online network's features, jointly
               over groups of G images, K ~ U[k_lo, k_hi]; saved as <run_dir>/masks/round_RRR.pt

Masks are stored at the resolution they were clustered at (a grid that divides the canvas) and
nearest-upsampled per sample, which is what the official code does once on disk.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from cropbench.data.images import normalize
from cropbench.errors import ConfigError, DatasetError, TrainingError
from cropbench.methods.base import ImageBatch, MethodContext, StepOutput, View
from cropbench.methods.byol import BYOL
from cropbench.methods.heads import byol_mlp
from cropbench.methods.mask_pool import (
    cluster_group,
    crop_masks,
    detcon_loss,
    hypercolumn,
    mask_pool,
    masks_to_grid,
    sample_segments,
    segments_present,
)
from cropbench.methods.momentum import momentum_copy
from cropbench.registry import METHODS
from cropbench.trainer import save_atomic

FeatureFn = Callable[[Tensor], Tensor]  # uint8 G×3×S×S canvases -> G×D×h×w features


def canvas_batches(dataset: Any, batch: int = 256) -> Iterator[Tensor]:
    """The dataset's uint8 canvases in index order, ``batch`` at a time (B×3×S×S)."""
    for start in range(0, len(dataset), batch):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch, len(dataset)))])


def checksum(images: Tensor) -> Tensor:
    """Pixel sum per canvas (B int64): ties a mask to the image it was made for."""
    return images.flatten(1).long().sum(1)


@torch.no_grad()
def compute_masks(
    dataset: Any,
    features: FeatureFn,
    k_range: tuple[int, int],
    group: int,
    iters: int,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """k-means masks for the whole dataset, groups of ``group`` images in index order. -> N×h×w."""
    out = []
    for images in canvas_batches(dataset, 16 * group):
        feats = features(images.to(device))
        for g0 in range(0, feats.shape[0], group):
            out.append(cluster_group(feats[g0 : g0 + group], k_range, iters, generator).cpu())
    return torch.cat(out).to(torch.int16)


@dataclass
class MaskFile:
    """One round of masks, as saved under ``<run_dir>/masks/``."""

    masks: Tensor  # N×h×w int16 segment ids (-1: none); h, w divide the canvas size
    checksums: Tensor  # N int64: ``checksum`` of the canvas each mask was made for
    round: int = 0
    source: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(
            {
                "masks": self.masks,
                "checksums": self.checksums,
                "round": self.round,
                "source": self.source,
            },
            path,
        )

    @staticmethod
    def load(path: Path) -> MaskFile:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return MaskFile(
                blob["masks"], blob["checksums"], int(blob["round"]), str(blob["source"])
            )
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise DatasetError(
                f"{path}: not a cropbench mask file (masks, checksums, round, source): {e}"
            ) from e


class MaskedImages(Dataset):
    """A canvas dataset whose samples also carry their segment map (CYBORGS' training set)."""

    def __init__(self, base: Any, checksums: Tensor, image_size: int):
        self.base, self.checksums, self.image_size = base, checksums, image_size
        self.masks: Tensor | None = None
        self.source = ""

    def set_masks(self, mf: MaskFile, path: Path) -> None:
        """Validate a mask file against the images, then use it. Mismatch -> DatasetError."""
        n, s = len(self.checksums), self.image_size
        if mf.masks.dim() != 3 or mf.masks.shape[0] != n:
            raise DatasetError(
                f"{path}: masks has shape {tuple(mf.masks.shape)}, "
                f"expected {n}×h×w for the {n} training images"
            )
        h, w = mf.masks.shape[1:]
        if s % h or s % w:
            raise DatasetError(
                f"{path}: mask resolution {h}×{w} does not divide the {s}×{s} canvas"
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
        m = m.repeat_interleave(self.image_size // m.shape[0], 0).repeat_interleave(
            self.image_size // m.shape[1], 1
        )
        return img, label, idx, m

    @staticmethod
    def collate(samples: list[tuple[Tensor, int, int, Tensor]]) -> ImageBatch:
        imgs, labels, idx, masks = zip(*samples, strict=True)
        return ImageBatch(
            torch.stack(imgs),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(idx, dtype=torch.long),
            masks=torch.stack(masks),
        )


@dataclass(frozen=True)
class MaskConfig:
    bootstrap_every: int = 100  # epochs between mask regenerations (CYBORGS boot_freq)
    k_range: tuple[int, int] = (2, 256)  # K ~ U[lo, hi] per group (CYBORGS)
    group_size: int = 16  # images clustered jointly (CYBORGS imgs_per_batch)
    iters: int = 20  # Lloyd iterations (CYBORGS: faiss niter 20)
    stage: int = 1  # forward_stages index: 1 = C3 = R50 layer2 (CYBORGS: layer2.2, stride 8)
    round0_grid: int = 16  # cells per side of the round-0 colour k-means ([UNVERIFIED] choice)
    init_file: str | None = None  # a precomputed round-0 MaskFile (e.g. Felzenszwalb) instead


@METHODS.register("cyborgs")
class CYBORGS(BYOL):
    @dataclass(frozen=True)
    class Config(BYOL.Config):
        masks: MaskConfig = field(default_factory=MaskConfig)
        temperature: float = 0.1  # DetCon-B / CYBORGS loss temperature
        n_sampled: int = 16  # segments sampled per view (DetCon / CYBORGS)
        num_segments: int = 256  # one-hot width: every mask id must be below it
        hyper_stages: tuple[int, ...] = (1, 2, 3)  # C3, C4, C5 = R50 layer2..4 (CYBORGS hooks)
        base_momentum: float = 0.996  # CYBORGS: fixed EMA decay, no cosine ramp
        final_momentum: float = 0.996

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        if cfg.masks.k_range[1] > cfg.num_segments:
            raise ConfigError(
                f"params.masks.k_range: up to {cfg.masks.k_range[1]} clusters, but "
                f"params.num_segments is {cfg.num_segments}"
            )
        in_dim = sum(backbone.stage_channels[s] for s in cfg.hyper_stages)  # hyper-column width
        self.projector = byol_mlp(in_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_projector = momentum_copy(self.projector)
        self.data: MaskedImages | None = None
        self.run_dir = Path(".")
        self.mask_round = -1

    # ------------------------------------------------------------------ masks
    def prepare_dataset(self, dataset: Any, run_dir: Any) -> MaskedImages:
        """Wrap the training set with its round-0 masks (computed once, kept under run_dir)."""
        self.run_dir = Path(run_dir)
        sums = torch.cat([checksum(b) for b in canvas_batches(dataset)])
        self.data = MaskedImages(dataset, sums, int(dataset[0][0].shape[-1]))
        self.load_round(0, torch.device("cpu"), seed=0, save=True)
        return self.data

    def load_round(self, r: int, device: torch.device, seed: int, save: bool) -> None:
        """Masks of round r: from its file if written (resume), else computed (and saved)."""
        path = self.run_dir / "masks" / f"round_{r:03d}.pt"
        if not path.exists() and r == 0 and self.cfg.masks.init_file:
            path = Path(self.cfg.masks.init_file)
        if path.exists():
            mf = MaskFile.load(path)
        else:
            mf = self.compute_round(r, device, seed)
            if save:
                mf.save(path)
        self.data.set_masks(mf, path)
        self.mask_round = r

    def compute_round(self, r: int, device: torch.device, seed: int) -> MaskFile:
        """Round 0: colour k-means; later rounds: k-means of the online backbone's features."""
        mc, was_training = self.cfg.masks, self.training
        gen = torch.Generator(device=device).manual_seed(seed * 1_000 + r)
        feats = self.round0_features if r == 0 else self.backbone_features
        self.eval()  # running BN statistics, as the official extraction subprocess
        try:
            masks = compute_masks(
                self.data.base, feats, mc.k_range, mc.group_size, mc.iters, gen, device
            )
        finally:
            self.train(was_training)
        source = "colour k-means" if r == 0 else f"k-means of forward_stages[{mc.stage}]"
        return MaskFile(masks, self.data.checksums, r, source)

    def round0_features(self, images: Tensor) -> Tensor:
        """Mean RGB (0-1) of each cell of a ``round0_grid``² partition: uint8 G×3×S×S -> G×3×g×g."""
        return F.adaptive_avg_pool2d(images.float() / 255, self.cfg.masks.round0_grid)

    def backbone_features(self, images: Tensor) -> Tensor:
        """The online backbone's ``masks.stage`` map of the canvases (CYBORGS: layer2.2)."""
        return self.backbone.forward_stages(normalize(images))[self.cfg.masks.stage]

    def on_epoch_start(self, epoch: int, trainer: Any) -> None:
        """Every ``bootstrap_every`` epochs the masks are regenerated from the online network."""
        r = epoch // self.cfg.masks.bootstrap_every
        if self.data is not None and r != self.mask_round:
            self.load_round(r, trainer.device, trainer.recipe.train.seed, save=trainer.dist.is_main)

    # ------------------------------------------------------------- training
    def make_views(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        """BYOL's two views; ``prov.extra["mask"]`` is each view's segment map (B×h×w long)."""
        views = super().make_views(batch, generator)
        if batch.masks is not None:
            for v in views:
                v.prov.extra["mask"] = crop_masks(
                    batch.masks, v.prov.boxes, v.prov.flipped, v.prov.output_size
                )
        return views

    def embed(self, view: View, grid: Tensor, ids: Tensor, online: bool) -> Tensor:
        """Segment embeddings of one view: online predictions or target projections. -> B×R×D."""
        backbone, proj = (
            (self.backbone, self.projector)
            if online
            else (self.target_backbone, self.target_projector)
        )
        stages = backbone.forward_stages(view.tensor)
        feats = hypercolumn([stages[s] for s in self.cfg.hyper_stages])  # B×C×h×w
        z = proj(mask_pool(feats, grid, ids).flatten(0, 1))  # (B·R)×D: BN over all segments
        return (self.predictor(z) if online else z).view(*ids.shape, -1)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        if batch.masks is None:
            raise TrainingError(
                "cyborgs: the batch carries no masks; the training set must come "
                "through CYBORGS.prepare_dataset (the trainer does this)"
            )
        cfg, views = self.cfg, self.make_views(batch, generator)
        stride = self.backbone.output_stride
        grids = [
            masks_to_grid(
                v.prov.extra["mask"],
                (v.tensor.shape[2] // stride, v.tensor.shape[3] // stride),
                cfg.num_segments,
            )
            for v in views
        ]
        pid = [sample_segments(g, cfg.n_sampled, cfg.num_segments, generator) for g in grids]
        tid = [
            sample_segments(g, cfg.n_sampled, cfg.num_segments, generator) for g in grids
        ]  # independent
        if all(bool((i < 0).all()) for i in pid):
            raise TrainingError(
                "cyborgs: no view of this batch has a valid segment (all mask ids are -1)"
            )
        p = [self.embed(v, g, i, online=True) for v, g, i in zip(views, grids, pid, strict=True)]
        with torch.no_grad():
            z = [
                self.embed(v, g, i, online=False) for v, g, i in zip(views, grids, tid, strict=True)
            ]
        loss = detcon_loss(
            p[0], p[1], z[0], z[1], pid[0], pid[1], tid[0], tid[1], cfg.temperature, self.ctx.dist
        )
        n_seg = torch.stack(
            [segments_present(g, cfg.num_segments).sum(1).float().mean() for g in grids]
        ).mean()
        return StepOutput(loss, {"momentum": self.momentum_at(step), "segments_per_view": n_seg})
