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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.methods.base import ImageBatch, StepOutput, View
from cropbench.methods.densecl import DenseCL
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


@dataclass(frozen=True)
class RegionConfig:
    cells: tuple[int, int] = (3, 6)  # box side in C5 cells, [lo, hi): official cutMixLower/Upper
    weight: float = 1.0  # region term weight (official RegionCL-M: instance + region, 1 each)


class RegionSwap:
    """Mixin: the composite view and its canvas / paste features.

    Needs ``backbone`` (a ``ResNetBackbone``) and ``cfg.region`` (a ``RegionConfig``).
    """

    backbone: nn.Module
    cfg: Any  # the method's Config, with a ``region: RegionConfig`` field

    def make_views(self, batch: ImageBatch, generator: torch.Generator) -> list[View]:
        """The base method's two views, then the composite built on the first (query) one."""
        views = super().make_views(batch, generator)  # type: ignore[misc]  # the base method's, by MRO
        return [*views, self.region_view(views[0], generator)]

    def region_view(self, v: View, generator: torch.Generator) -> View:
        """Composite of ``v``; provenance: region box (view px), partner, boxes in canvas px."""
        b, _, h, w = v.tensor.shape
        stride = self.backbone.output_stride
        box = sample_region_box((h, w), stride, self.cfg.region.cells, generator)
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

    def region_features(self, mix: View) -> tuple[Tensor, Tensor]:
        """Composite -> (canvas B×C, paste B×C) pooled from the online backbone's C5."""
        c5 = self.backbone.forward_stages(mix.tensor)[-1]
        cells = box_to_cells(mix.prov.extra["region_box"][0].cpu(), self.backbone.output_stride)
        return region_pool(c5, cells)


class _QueueRegionLoss(RegionSwap):
    """Region InfoNCE with the MoCo v2 projector and queue (RegionCL-M and -D)."""

    def region_loss(self, mix: View, keys: Tensor) -> Tensor:
        canvas, paste = self.region_features(mix)
        # one MLP pass over both regions, as the official neck
        z = F.normalize(self.projector(torch.cat([canvas, paste])), dim=1)
        c, p = z.chunk(2)
        queue = self.queue.keys.clone()
        return region_infonce(c, p, keys, queue, mix.prov.extra["partner"], self.cfg.temperature)


@METHODS.register("regioncl_m")
class RegionCLM(_QueueRegionLoss, MoCoV2):
    @dataclass(frozen=True)
    class Config(MoCoV2.Config):
        region: RegionConfig = field(default_factory=RegionConfig)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k, v_mix = self.make_views(batch, generator)
        q = self.encode_query(v_q.tensor)  # B×D
        k = self.encode_key(v_k.tensor, generator)  # B×D, no gradient
        loss_i, loss_r = self.instance_loss(q, k), self.region_loss(v_mix, k)
        self.enqueue(k)  # only the clean keys are enqueued (official)
        logs = {"loss_instance": loss_i.detach(), "loss_region": loss_r.detach()}
        return StepOutput(loss_i + self.cfg.region.weight * loss_r, logs)


@METHODS.register("regioncl_d")
class RegionCLD(_QueueRegionLoss, DenseCL):
    @dataclass(frozen=True)
    class Config(DenseCL.Config):
        region: RegionConfig = field(default_factory=RegionConfig)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k, v_mix = self.make_views(batch, generator)
        loss, logs, k = self.dense_step(v_q, v_k, generator)  # (1-λ)·global + λ·dense
        loss_r = self.region_loss(v_mix, k.emb)
        self.enqueue_dense(k)
        logs = {**logs, "loss_region": loss_r.detach()}
        return StepOutput(loss + self.cfg.region.weight * loss_r, logs)


@METHODS.register("regioncl_s")
class RegionCLS(RegionSwap, SimSiam):
    @dataclass(frozen=True)
    class Config(SimSiam.Config):
        region: RegionConfig = field(default_factory=RegionConfig)

    def training_step(self, batch: ImageBatch, step: int, generator: torch.Generator) -> StepOutput:
        v1, v2, v_mix = self.make_views(batch, generator)
        z1, z2 = self.project(v1.tensor), self.project(v2.tensor)
        loss_s = self.siamese_loss(self.predict(z1), self.predict(z2), z1, z2)
        canvas, paste = self.region_features(v_mix)
        p_c, p_p = self.predict(self.projector(torch.cat([canvas, paste]))).chunk(2)
        loss_r = region_regression(p_c, p_p, z2, v_mix.prov.extra["partner"])
        logs = {"loss_siamese": loss_s.detach(), "loss_region": loss_r.detach()}
        return StepOutput(loss_s + self.cfg.region.weight * loss_r, logs)
