"""CYBORGS: mask-pooled contrastive learning with masks bootstrapped from the model's own features.

[Wang, Zhao, Gao; ECCV 2022, arXiv 2203.09343; REPO renwang435/CYBORGS@5737d31]

    round 0 (prepare_dataset): masks <- colour k-means of the canvases (or a given mask file)
    each step: views of image + mask (same crop/flip) -> hyper-columns (C3, C4, C5) -> sample 16
               segment ids per view (online and target independently; present ids first, then
               absent ones) -> mask-pool -> BYOL heads applied per sample slot -> DetCon-B loss
               vs an EMA target
    every N epochs (on_epoch_start): masks <- k-means of the online network's features, jointly
               over groups of G images, K ~ U[k_lo, k_hi]; saved as <run_dir>/masks/round_RRR.pt
               (written atomically)

Every pass over the training images (checksums, each round's features) decodes them through a
DataLoader with the recipe's ``data.num_workers`` workers, in index order: the masks do not depend
on the number of workers.

Masks are stored at the resolution they were clustered at (a grid that divides the canvas) and
nearest-upsampled per sample, which is what the official code does once on disk. Bad input: a mask
file that does not match its images is a ``DatasetError`` naming the file; a view whose cells are
all "no segment" (-1) gets zero weight in the loss (DetCon's rule for rois without a positive),
and a batch in which no view has a segment is a ``TrainingError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from cropbench.data.images import normalize
from cropbench.errors import ConfigError, TrainingError
from cropbench.methods.base import EpochContext, MethodContext, StepOutput
from cropbench.methods.byol import BYOL
from cropbench.methods.heads import byol_mlp
from cropbench.methods.mask_pool import (
    MaskedImages,
    MaskFile,
    crop_masks,
    detcon_loss,
    hypercolumn,
    mask_pool,
    masks_to_grid,
    per_slot,
    sample_segments,
    segments_present,
)
from cropbench.methods.momentum import momentum_copy
from cropbench.registry import METHODS
from cropbench.types import ImageBatch, View
from cropbench.views.generators import VIEW_GENERATORS, AsymmetricConfig, AsymmetricPair, ViewGenerator


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means: N×D points -> (labels N, centroids k×D).

    Initial centroids: k distinct points drawn with ``generator`` (faiss' default init); an empty
    cluster keeps its previous centroid.
    """
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({x.shape[0]}), got k={k}")
    pick = torch.randperm(x.shape[0], generator=generator, device=generator.device)[:k]
    centroids = x[pick.to(x.device)].clone()
    for _ in range(iters):
        onehot = F.one_hot(_nearest(x, centroids), k).to(x.dtype)  # N×k
        counts = onehot.sum(0).unsqueeze(1)
        centroids = torch.where(counts > 0, onehot.T @ x / counts.clamp_min(1), centroids)
    return _nearest(x, centroids), centroids


def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (squared Euclidean) of each row of x. -> N long."""
    return (2 * x @ centroids.T - (centroids**2).sum(1)).argmax(dim=1)


@torch.no_grad()
def cluster_group(feats: Tensor, k_range: tuple[int, int], iters: int, generator: torch.Generator) -> Tensor:
    """Joint k-means over all cells of a group of images (CYBORGS). -> G×h×w long.

    feats: G×D×h×w; cells are L2-normalised; K ~ U[k_lo, k_hi], capped at h·w (CYBORGS caps it at
    the smallest feature map). Ids are shared across the group's images.
    """
    g, d, h, w = feats.shape
    dev = generator.device
    k = int(torch.randint(k_range[0], k_range[1] + 1, (1,), generator=generator, device=dev))
    points = F.normalize(feats.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    labels, _ = kmeans(points, min(k, h * w), iters, generator)
    return labels.view(g, h, w)


FeatureFn = Callable[[Tensor], Tensor]  # uint8 G×3×S×S canvases -> G×D×h×w features


def canvas_batches(dataset: Any, batch: int = 256, num_workers: int = 0, pin_memory: bool = False) -> Iterator[Tensor]:
    """The dataset's uint8 canvases in index order, ``batch`` at a time (B×3×S×S).

    Decoded by ``num_workers`` DataLoader worker processes (0: in this one, the recipe's
    ``data.num_workers``); the DataLoader keeps index order, so the batches do not depend on it.
    """
    loader = DataLoader(
        dataset, batch, shuffle=False, num_workers=num_workers, collate_fn=stack_canvases, pin_memory=pin_memory
    )
    yield from loader


def stack_canvases(samples: list[tuple[Any, ...]]) -> Tensor:
    """Collate only the canvases of (canvas, label, index, ...) samples. -> B×3×S×S uint8."""
    return torch.stack([s[0] for s in samples])


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
    num_workers: int = 0,
) -> Tensor:
    """k-means masks for the whole dataset, groups of ``group`` images in index order. -> N×h×w.

    The canvases are decoded by ``num_workers`` DataLoader workers; the masks do not depend on it.
    """
    out = []
    for images in canvas_batches(dataset, 16 * group, num_workers, pin_memory=device.type == "cuda"):
        feats = features(images.to(device, non_blocking=True))
        for g0 in range(0, feats.shape[0], group):
            out.append(cluster_group(feats[g0 : g0 + group], k_range, iters, generator).cpu())
    return torch.cat(out).to(torch.int16)


def absent_fraction(present: list[Tensor], ids: list[Tensor]) -> Tensor:
    """Share of the sampled ids (>= 0) absent from their view: they pool to zero vectors."""
    ok = torch.cat([i >= 0 for i in ids])
    hit = torch.cat([torch.gather(m, 1, i.clamp_min(0)) for m, i in zip(present, ids, strict=True)])
    return (ok & ~hit).sum() / ok.sum().clamp_min(1)


@dataclass(frozen=True)
class MaskConfig:
    bootstrap_every: int = 100  # epochs between mask regenerations (CYBORGS boot_freq)
    k_range: tuple[int, int] = (2, 256)  # K ~ U[lo, hi] per group (CYBORGS)
    group_size: int = 16  # images clustered jointly (CYBORGS imgs_per_batch)
    iters: int = 20  # Lloyd iterations (CYBORGS: faiss niter 20)
    stage: int = 1  # forward_stages index: 1 = C3 = R50 layer2 (CYBORGS: layer2.2, stride 8)
    round0_grid: int = 16  # cells per side of the round-0 colour k-means ([UNVERIFIED] choice)
    init_file: str | None = None  # a precomputed round-0 MaskFile (e.g. Felzenszwalb) instead


@VIEW_GENERATORS.register("cyborgs_masks")
class MaskedViews(ViewGenerator):
    """The wrapped generator's views, each carrying its crop of the batch's segment maps.

    CYBORGS' masks are *data* (the dataset attaches them, ``prepare_dataset`` bootstraps them from
    the model), not views: this generator only cuts each view's share, with the view's own box
    and flip (nearest neighbour), into ``prov.extra["mask"]`` (B×h×w long).
    """

    Config = AsymmetricConfig
    description = "CYBORGS: BYOL's asymmetric pair, each view carrying its crop of the segment masks"

    def __init__(self, inner: ViewGenerator):
        super().__init__()
        self.inner = inner

    @classmethod
    def from_config(cls, cfg: AsymmetricConfig, stride: int | None = None) -> MaskedViews:
        return cls(AsymmetricPair(cfg))

    def forward(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        views = self.inner(batch, generator)
        if batch.masks is not None:
            for v in views:
                v.prov.extra["mask"] = crop_masks(batch.masks, v.prov.boxes, v.prov.flipped, v.prov.output_size)
        return views


@METHODS.register("cyborgs")
class CYBORGS(BYOL):
    batchnorm = "sync"  # convert_sync_batchnorm [renwang435/CYBORGS@5737d31 main_cyborgs.py]
    default_views = "cyborgs_masks"  # BYOL's asymmetric pair, each view with its crop of the masks

    @dataclass(frozen=True)
    class Config(BYOL.Config):
        masks: MaskConfig = field(default_factory=MaskConfig)
        temperature: float = 0.1  # DetCon-B / CYBORGS loss temperature
        n_sampled: int = 16  # segments sampled per view (DetCon / CYBORGS)
        num_segments: int = 256  # one-hot width: every mask id must be below it
        hyper_stages: tuple[int, ...] = (1, 2, 3)  # C3, C4, C5 = R50 layer2..4 (CYBORGS hooks)
        base_momentum: float = 0.996  # CYBORGS: fixed EMA decay, no cosine ramp
        final_momentum: float = 0.996

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        if cfg.predictor != "mlp":
            raise ConfigError(f"params.predictor: CYBORGS trains BYOL's MLP predictor, got {cfg.predictor!r}")
        super().__init__(cfg, backbone, ctx, views)
        if cfg.masks.k_range[1] > cfg.num_segments:
            raise ConfigError(
                f"params.masks.k_range: up to {cfg.masks.k_range[1]} clusters, but "
                f"params.num_segments is {cfg.num_segments}"
            )
        if cfg.n_sampled < 1 or cfg.temperature <= 0:
            raise ConfigError(
                f"params.n_sampled must be >= 1 and params.temperature > 0, "
                f"got n_sampled={cfg.n_sampled}, temperature={cfg.temperature}"
            )
        in_dim = sum(backbone.stage_channels[s] for s in cfg.hyper_stages)  # hyper-column width
        self.projector = byol_mlp(in_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_projector = momentum_copy(self.projector)
        self.data: MaskedImages | None = None
        self.run_dir = Path(".")
        self.mask_round = -1

    # ------------------------------------------------------------------ masks
    def prepare_dataset(self, dataset: Any, run_dir: Path) -> MaskedImages:
        """Wrap the training set with its round-0 masks (computed once, kept under run_dir)."""
        self.run_dir = Path(run_dir)
        sums = torch.cat([checksum(b) for b in canvas_batches(dataset, num_workers=self.ctx.num_workers)])
        size = int(dataset[0][0].shape[-1])
        self.data = MaskedImages(dataset, sums, size, self.cfg.num_segments)
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
                self.data.base, feats, mc.k_range, mc.group_size, mc.iters, gen, device, self.ctx.num_workers
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

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Every ``bootstrap_every`` epochs the masks are regenerated from the online network."""
        r = ctx.epoch // self.cfg.masks.bootstrap_every
        if self.data is not None and r != self.mask_round:
            self.load_round(r, ctx.device, ctx.seed, save=ctx.dist.is_main)

    # ------------------------------------------------------------- training
    def segment_grid(self, view: View) -> Tensor:
        """The view's segment map reduced to its C5 grid (majority id per cell). -> B×h×w."""
        stride = self.backbone.output_stride
        hw = (view.tensor.shape[2] // stride, view.tensor.shape[3] // stride)
        return masks_to_grid(view.prov.extra["mask"], hw, self.cfg.num_segments)

    def embed(self, view: View, grid: Tensor, ids: Tensor, online: bool) -> Tensor:
        """Segment embeddings of one view: online predictions or target projections. -> B×R×D."""
        backbone = self.backbone if online else self.target_backbone
        proj = self.projector if online else self.target_projector
        stages = backbone.forward_stages(view.tensor)
        feats = hypercolumn([stages[s] for s in self.cfg.hyper_stages])  # B×C×h×w
        z = per_slot(proj, mask_pool(feats, grid, ids))  # B×R×D, BN per slot over B (CYBORGS)
        return per_slot(self.predictor, z) if online else z

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        if batch.masks is None:
            raise TrainingError(
                "cyborgs: the batch carries no masks; the training set must come "
                "through CYBORGS.prepare_dataset (the trainer does this)"
            )
        cfg, views = self.cfg, self.make_views(batch, generator)
        grids = [self.segment_grid(v) for v in views]
        # online and target networks draw their segments independently (CYBORGS builder.py)
        pid = [sample_segments(g, cfg.n_sampled, cfg.num_segments, generator) for g in grids]
        tid = [sample_segments(g, cfg.n_sampled, cfg.num_segments, generator) for g in grids]
        if all(bool((i < 0).all()) for i in pid):
            raise TrainingError("cyborgs: no view of this batch has a valid segment (mask ids -1)")
        p = [self.embed(v, g, i, online=True) for v, g, i in zip(views, grids, pid, strict=True)]
        with torch.no_grad():
            z = [self.embed(v, g, i, online=False) for v, g, i in zip(views, grids, tid, strict=True)]
        loss = detcon_loss(p[0], p[1], z[0], z[1], pid[0], pid[1], tid[0], tid[1], cfg.temperature, self.ctx.dist)
        present = [segments_present(g, cfg.num_segments) for g in grids]
        n_seg = torch.stack([m.sum(1).float().mean() for m in present]).mean()
        logs = {
            "loss_detcon": loss.detach(),
            "momentum": self.momentum_at(step),
            "segments_per_view": n_seg,
            "absent_sampled": absent_fraction(present, pid),
        }
        return StepOutput(loss, logs)
