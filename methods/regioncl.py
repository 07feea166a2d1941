"""RegionCL: region swapping on three frameworks.

[Xu, Zhang, Zhang, Tao; ECCV 2022, arXiv 2111.12309]

Every variant adds a third view to its framework's two: the *composite* of view 1, where a
grid-aligned box of image i is replaced by the same box of its partner image (``region_swap``).
The composite goes through the online backbone; its C5 map is pooled outside the box (canvas,
source i) and inside it (paste, source partner[i]), and a region term pulls each region to its
source image's view-2 embedding:

* ``regioncl_m`` (MoCo v2): region InfoNCE against the queue + the other region of the same
  composite (stop-gradient), as the official RegionCL-M [REPO Annbless/RegionCL@61bbcab].
* ``regioncl_d`` (DenseCL): DenseCL's global + dense terms + the same region InfoNCE.
* ``regioncl_s`` (SimSiam): SimSiam's loss + each region's prediction regressing the stop-gradient
  projection of its source image's view 2 (SimSiam has no negatives).

The official code releases only -M; how -D and -S attach the region term is [UNVERIFIED] and is
recorded as a deviation in ``benchmarks/regioncl/entry.yaml``.
The box size is the ``region_swap`` generator's (``params.views.cells``, with the wrapped pair's
``params.views.views``); the methods hold the region term's weight (``region_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, StepOutput
from cropbench.methods.densecl import DenseBranch, DenseCL
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.region_swap import (
    box_to_cells,
    partner_permutation,
    region_infonce,
    region_pool,
    region_regression,
    sample_region_box,
    swap_regions,
    view_box_to_canvas,
)
from cropbench.methods.simsiam import SimSiam
from cropbench.registry import METHODS
from cropbench.types import ImageBatch, View
from cropbench.views.generators import VIEW_GENERATORS, PairViews, ViewGenerator
from cropbench.views.image import ViewConfig


@dataclass(frozen=True)
class RegionSwapConfig:
    """The recipe's ``views`` for ``region_swap``: the wrapped pair's views and the box size."""

    views: ViewConfig = field(default_factory=ViewConfig)  # the wrapped pair's (MoCo v2 aug_plus)
    cells: tuple[int, int] = (3, 6)  # box side in C5 cells, [lo, hi): official cutMixLower/Upper


@VIEW_GENERATORS.register("region_swap")
class RegionSwapViews(ViewGenerator):
    """The wrapped generator's views, then the composite of the first (query) one: a grid-aligned
    box of image i replaced by the same box of its partner (RegionCL §3.1, ``region_swap``).

    Provenance of the composite: region box (view px, the same for the batch), partner, the hole
    in each canvas and where the pasted content came from (canvas px).
    """

    Config = RegionSwapConfig
    description = "RegionCL: a view pair plus a composite of the first view with a grid-aligned region swapped"

    def __init__(self, inner: ViewGenerator, stride: int, cells: tuple[int, int]):
        super().__init__()
        self.inner, self.stride, self.cells = inner, stride, cells

    @classmethod
    def from_config(cls, cfg: RegionSwapConfig, stride: int | None = None) -> RegionSwapViews:
        if stride is None:
            raise ConfigError("views.generator: region_swap needs a backbone with an output stride")
        return cls(PairViews(cfg.views), stride, cfg.cells)

    @property
    def grid_size(self) -> int | None:
        return getattr(getattr(self.inner, "cfg", None), "size", None)

    def forward(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        views = self.inner(batch, generator)
        return [*views, self.region_view(views[0], generator)]

    def region_view(self, v: View, generator: torch.Generator) -> View:
        b, _, h, w = v.tensor.shape
        box = sample_region_box((h, w), self.stride, self.cells, generator)
        partner = partner_permutation(b).to(v.tensor.device)
        # the hole in image i's canvas; the pasted content sits at hole[partner] in the partner's
        hole = view_box_to_canvas(box, v.prov.boxes, v.prov.flipped, (h, w))  # B×4
        extra = {
            "region_box": box.to(v.tensor.device).expand(b, 4),  # view pixels, same for the batch
            "partner": partner,  # the image the pasted region comes from
            "region_canvas_box": hole,
            "paste_source_box": hole[partner],
        }
        return View(swap_regions(v.tensor, box, partner), replace(v.prov, extra=extra))


def region_features(backbone: nn.Module, mix: View) -> tuple[Tensor, Tensor]:
    """Composite -> (canvas B×C, paste B×C) pooled from ``backbone``'s C5."""
    c5 = backbone.forward_stages(mix.tensor)[-1]
    cells = box_to_cells(mix.prov.extra["region_box"][0].cpu(), backbone.output_stride)
    return region_pool(c5, cells)


def queue_region_loss(m: MoCoV2, mix: View, keys: Tensor) -> Tensor:
    """Region InfoNCE with the MoCo v2 projector and queue of ``m`` (RegionCL-M and -D)."""
    canvas, paste = region_features(m.backbone, mix)
    # one MLP pass over both regions, as the official neck
    z = F.normalize(m.projector(torch.cat([canvas, paste])), dim=1)
    c, p = z.chunk(2)
    return region_infonce(c, p, keys, m.queue.keys.clone(), mix.prov.extra["partner"], m.cfg.temperature)


@METHODS.register("regioncl_m")
class RegionCLM(MoCoV2):
    default_views = "region_swap"

    @dataclass(frozen=True)
    class Config(MoCoV2.Config):
        region_weight: float = 1.0  # region term weight (official RegionCL-M: instance + region, 1 each)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k, v_mix = self.make_views(batch, generator)
        q = self.encode_query(v_q.tensor)  # B×D
        k = self.encode_key(v_k.tensor, generator)  # B×D, no gradient
        loss_i, loss_r = self.instance_loss(q, k), queue_region_loss(self, v_mix, k)
        self.enqueue(k)  # only the clean keys are enqueued (official)
        logs = {"loss_instance": loss_i.detach(), "loss_region": loss_r.detach()}
        return StepOutput(loss_i + self.cfg.region_weight * loss_r, logs)


@METHODS.register("regioncl_d")
class RegionCLD(MoCoV2):
    """MoCo v2 with DenseCL's dense branch (``DenseBranch``) and the region term."""

    default_views = "region_swap"

    @dataclass(frozen=True)
    class Config(DenseCL.Config):
        region_weight: float = 1.0  # region term weight (official RegionCL-M: instance + region, 1 each)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)
        self.dense = DenseBranch(cfg, backbone.feat_dim)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.dense.head, self.dense.key_head)]

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k, v_mix = self.make_views(batch, generator)
        loss, logs, k = self.dense.step(self, v_q, v_k, generator)  # (1-λ)·global + λ·dense
        loss_r = queue_region_loss(self, v_mix, k.emb)
        self.dense.enqueue(self, k)
        logs = {**logs, "loss_region": loss_r.detach()}
        return StepOutput(loss + self.cfg.region_weight * loss_r, logs)


@METHODS.register("regioncl_s")
class RegionCLS(SimSiam):
    default_views = "region_swap"

    @dataclass(frozen=True)
    class Config(SimSiam.Config):
        region_weight: float = 1.0  # region term weight (official RegionCL-M: instance + region, 1 each)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2, v_mix = self.make_views(batch, generator)
        z1, z2 = self.project(v1.tensor), self.project(v2.tensor)
        loss_s = self.siamese_loss(self.predict(z1), self.predict(z2), z1, z2)
        canvas, paste = region_features(self.backbone, v_mix)
        p_c, p_p = self.predict(self.projector(torch.cat([canvas, paste]))).chunk(2)
        loss_r = region_regression(p_c, p_p, z2, v_mix.prov.extra["partner"])
        logs = {"loss_siamese": loss_s.detach(), "loss_region": loss_r.detach()}
        return StepOutput(loss_s + self.cfg.region_weight * loss_r, logs)
