"""Fidelity of the image methods: each loss against an independent transcription of its official
code, on the same seeded inputs, and each mechanism switched off must change the result.

Official sources (read with ``fetch``; their formulas carried over, not their code):

* SimCLR  google-research/simclr@383d414:tf2/objective.py ``add_contrastive_loss``
* MoCo v2 facebookresearch/moco@132aea9:moco/builder.py ``MoCo.forward``, ``_dequeue_and_enqueue``
* BYOL    deepmind/deepmind-research@d8df415:byol/byol_experiment.py ``_loss_fn`` and
  byol/utils/helpers.py ``regression_loss``, ``l2_normalize``
* SimSiam facebookresearch/simsiam@a7bc177:main_simsiam.py ``train`` and simsiam/builder.py
* RegionCL-M Annbless/RegionCL@61bbcab:openselfsup/models/RegionCLM.py ``forward_train``,
  ``RegionSwapping``; openselfsup/models/necks.py ``RegionCLNonLinearNeckV1``;
  openselfsup/models/heads/contrastive_head.py ``ContrastiveHead``

Inputs are independent draws with odd batch sizes where the method allows them. Tolerances: the
transcriptions run in float64 and ours in float32; measured gaps: losses < 1.6e-6 (values 1-20),
loss-level gradients < 1e-6, RegionCL-M parameter gradients <= 4.3e-6 on entries up to 4.7. So
1e-5 (losses, parameter gradients) and 1e-6 (input gradients), while a wrong weight, pairing or
sign moves the losses by > 1e-2 (the ``broken`` checks; each loss mutated - wrong composite,
positives, weight or pooling - fails these tests).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.backbones import build_backbone
from cropbench.dist import DistContext
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.methods.byol import BYOL
from cropbench.methods.losses import info_nce, negative_cosine, nt_xent, symmetric
from cropbench.methods.momentum import Queue
from cropbench.registry import METHODS
from cropbench.runner import method_from_params
from cropbench.types import ImageBatch

ONE = DistContext()
LOSS_TOL, GRAD_TOL = 1e-5, 1e-6


def _unit_free(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def _method(name: str, cells: list[int] | None = None, **params: object) -> SSLMethod:
    """A small method of the registry on the micro ResNet (32-px views, stride 8: a 4×4 C5;
    RegionCL: region boxes of ``cells`` C5 cells)."""
    cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    base = {"hidden_dim": 32, "out_dim": 16}
    # one key BatchNorm group (the key encoder's split-BN emulation is pinned in its own tests)
    base.update({"queue_size": 24, "dim": 32, "pred_dim": 8, "shuffle_bn_splits": 1})
    view = {"size": 32, "blur_p": 0.0}
    nested = cls.default_views in ("region_swap", "asymmetric_pair", "cyborgs_masks")  # a shared ViewConfig
    views = {"views": view, **({"cells": cells} if cells else {})} if nested else view
    params = {k: v for k, v in {**base, **params}.items() if k in fields}
    torch.manual_seed(0)
    backbone = build_backbone("resnet_micro", widths=(8, 8, 8, 16))
    ctx = MethodContext(steps_per_epoch=10, epochs=1, batch_size=6)
    return method_from_params(name, {**params, "views": views}, backbone, ctx)


def _batch(n: int, seed: int = 0) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8, generator=g)
    return ImageBatch(images, torch.zeros(n, dtype=torch.long), torch.arange(n))


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=0)


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True))


# ------------------------------------------------------------------ SimCLR


def official_simclr(hidden: Tensor, temperature: float) -> Tensor:
    """google-research/simclr@383d414:tf2/objective.py ``add_contrastive_loss``, one replica.

    hidden = [view 1; view 2] (2N×D); logits_aa/bb with the diagonal pushed down by LARGE_NUM,
    loss_a = CE(one-hot, [logits_ab, logits_aa]), loss_b = CE(one-hot, [logits_ba, logits_bb]),
    loss = reduce_mean(loss_a + loss_b).
    """
    large_num = 1e9
    hidden = hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # tf.math.l2_normalize
    h1, h2 = hidden.chunk(2)
    n = h1.shape[0]
    labels = torch.eye(n, 2 * n, dtype=hidden.dtype)
    masks = torch.eye(n, dtype=hidden.dtype)
    aa = h1 @ h1.T / temperature - masks * large_num
    bb = h2 @ h2.T / temperature - masks * large_num
    ab, ba = h1 @ h2.T / temperature, h2 @ h1.T / temperature
    loss_a = -(labels * torch.log_softmax(torch.cat([ab, aa], 1), 1)).sum(1)
    loss_b = -(labels * torch.log_softmax(torch.cat([ba, bb], 1), 1)).sum(1)
    return (loss_a + loss_b).mean()


@pytest.mark.parametrize("n", [3, 7])
def test_nt_xent_is_half_the_official_simclr_loss_with_the_same_gradient_direction(n):
    """Ours is the paper's eq. 1 (mean over the 2N anchors); the official code sums the two views'
    means, so it is exactly 2× ours, and so is its gradient (a constant factor, absorbed by LARS's
    trust ratio; recorded here rather than changed, since the paper defines the 1/2N mean)."""
    g = torch.Generator().manual_seed(n)
    z1, z2 = _unit_free(g, n, 5).requires_grad_(), _unit_free(g, n, 5).requires_grad_()
    ours = nt_xent(z1, z2, 0.1, ONE)
    ref = official_simclr(torch.cat([z1, z2]).double(), 0.1)
    assert abs(2 * ours.item() - ref.item()) < LOSS_TOL
    for a, b in zip(_grads(ours, [z1, z2]), _grads(ref, [z1, z2]), strict=True):
        assert _close(2 * a, b, GRAD_TOL)
    broken = official_simclr(torch.cat([z1, z2.roll(1, 0)]).double(), 0.1)  # wrong positives
    assert abs(2 * ours.item() - broken.item()) > 1e-2


def test_simclr_step_is_the_official_loss_of_its_projections():
    """The method's step = official / 2 on the projections of one forward over both views."""
    m, batch = _method("simclr"), _batch(5)
    v1, v2 = m.make_views(batch, torch.Generator().manual_seed(3))
    z = m.projector(m.backbone(torch.cat([v1.tensor, v2.tensor])))
    ref = official_simclr(z.double(), m.cfg.temperature)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(3))
    assert abs(2 * out.loss.item() - ref.item()) < LOSS_TOL


# ------------------------------------------------------------------ MoCo v2


class OfficialMoCoQueue:
    """facebookresearch/moco@132aea9:moco/builder.py: queue C×K, logits [l_pos, l_neg] / T,
    CE with label 0, then ``queue[:, ptr:ptr + B] = keys.T; ptr = (ptr + B) % K``."""

    def __init__(self, queue_ck: Tensor):
        self.queue, self.ptr = queue_ck.clone(), 0

    def loss(self, q: Tensor, k: Tensor, temperature: float) -> Tensor:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        b, k = keys.shape[0], self.queue.shape[1]
        assert k % b == 0
        self.queue[:, self.ptr : self.ptr + b] = keys.T
        self.ptr = (self.ptr + b) % k


def test_moco_infonce_and_queue_follow_the_official_builder_over_a_wrap():
    """Four steps of B=3 on a K=9 queue (wraps after the third): same loss, gradient, queue."""
    g = torch.Generator().manual_seed(11)
    ours = Queue(9, 6)
    ref = OfficialMoCoQueue(ours.keys.T.double())
    for _ in range(4):
        q = _unit_free(g, 3, 6).requires_grad_()
        k = F.normalize(_unit_free(g, 3, 6), dim=1)
        loss = info_nce(q, k, ours.keys.clone(), 0.2)
        ref_loss = ref.loss(F.normalize(q.double(), dim=1), k.double(), 0.2)
        assert abs(loss.item() - ref_loss.item()) < LOSS_TOL
        assert _close(_grads(loss, [q])[0], _grads(ref_loss, [q])[0], GRAD_TOL)
        ours.enqueue(k, ONE)
        ref.dequeue_and_enqueue(k.double())
        assert torch.allclose(ours.keys.T.double(), ref.queue, atol=1e-7)
        assert int(ours.ptr) == ref.ptr


def test_mocov2_step_is_the_official_loss_and_enqueues_its_keys():
    """The step's loss = official logits on q (recomputed) and k (read back from the queue)."""
    m, batch = _method("mocov2"), _batch(5)
    ref = OfficialMoCoQueue(m.queue.keys.T.double())
    v_q, _ = m.make_views(batch, torch.Generator().manual_seed(4))
    with torch.no_grad():
        q = F.normalize(m.projector(m.backbone(v_q.tensor)), dim=1)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(4))
    k = m.queue.keys[:5].double()  # the step enqueued its keys at slots 0..4
    assert abs(out.loss.item() - ref.loss(q.double(), k, m.cfg.temperature).item()) < LOSS_TOL


# ------------------------------------------------------------------ BYOL and SimSiam


def official_byol(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """deepmind-research@d8df415:byol: l2_normalize = x·rsqrt(max(Σx², 1e-12));
    regression_loss = Σ(x̂ − ŷ)²; repr_loss = mean(rl(p1, sg z2) + rl(p2, sg z1))."""

    def l2n(x: Tensor) -> Tensor:
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-12))

    def rl(x: Tensor, y: Tensor) -> Tensor:
        return ((l2n(x) - l2n(y)) ** 2).sum(-1)

    return (rl(p1, z2.detach()) + rl(p2, z1.detach())).mean()


def official_simsiam(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """facebookresearch/simsiam@a7bc177: builder returns z detached; criterion = CosineSimilarity
    (x·y / max(‖x‖‖y‖, eps)); loss = −(cos(p1, z2).mean() + cos(p2, z1).mean()) · 0.5."""

    def cos(x: Tensor, y: Tensor) -> Tensor:
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-8)

    z1, z2 = z1.detach(), z2.detach()
    return -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5


@pytest.mark.parametrize("which", ["byol", "simsiam"])
def test_regression_losses_match_the_official_code_and_stop_gradients(which):
    """Predictions p = W·z (so z gets gradient only through p, as in the models), B = 5."""
    g = torch.Generator().manual_seed(5)
    w = _unit_free(g, 6, 6).requires_grad_()
    z1, z2 = _unit_free(g, 5, 6).requires_grad_(), _unit_free(g, 5, 6).requires_grad_()
    p1, p2 = z1 @ w, z2 @ w
    if which == "byol":
        ours = BYOL.regression_loss(None, p1, p2, z1, z2)  # type: ignore[arg-type]
        ref = official_byol(p1.double(), p2.double(), z1.double(), z2.double())
        broken = official_byol(p1.double(), p2.double(), z2.double(), z1.double())  # same view
    else:
        ours = symmetric(negative_cosine, p1, p2, z1, z2, weight=0.5)
        ref = official_simsiam(p1.double(), p2.double(), z1.double(), z2.double())
        broken = official_simsiam(p1.double(), p2.double(), z2.double(), z1.double())
    assert abs(ours.item() - ref.item()) < LOSS_TOL
    for a, b in zip(_grads(ours, [w, z1, z2]), _grads(ref, [w, z1, z2]), strict=True):
        assert _close(a, b, GRAD_TOL)
    assert abs(ours.item() - broken.item()) > 1e-2


def test_byol_and_simsiam_steps_are_the_official_losses_of_their_branches():
    byol, simsiam, batch = _method("byol"), _method("simsiam"), _batch(5)
    v1, v2 = byol.make_views(batch, torch.Generator().manual_seed(6))
    with torch.no_grad():
        p1, p2 = byol.online(v1.tensor), byol.online(v2.tensor)
        z1, z2 = byol.target(v1.tensor), byol.target(v2.tensor)
    ref = official_byol(p1.double(), p2.double(), z1.double(), z2.double())
    out = byol.training_step(batch, 0, torch.Generator().manual_seed(6))
    assert abs(out.loss.item() - ref.item()) < LOSS_TOL
    v1, v2 = simsiam.make_views(batch, torch.Generator().manual_seed(6))
    with torch.no_grad():
        z1, z2 = simsiam.project(v1.tensor), simsiam.project(v2.tensor)
        p1, p2 = simsiam.predict(z1), simsiam.predict(z2)
    ref = official_simsiam(p1.double(), p2.double(), z1.double(), z2.double())
    out = simsiam.training_step(batch, 0, torch.Generator().manual_seed(6))
    assert abs(out.loss.item() - ref.item()) < LOSS_TOL


# ------------------------------------------------------------------ RegionCL-M


def official_region_swapping(img: Tensor, box: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """RegionCLM.RegionSwapping given its drawn box (x0, y0, x1, y1 px): randperm = the batch
    reversed, unshuffle = argsort(randperm), img_mix[..., box] = img[randperm][..., box]."""
    b = img.shape[0]
    randperm = torch.arange(b - 1, -1, -1)
    x0, y0, x1, y1 = box
    img_mix = img.clone()
    img_mix[:, :, y0:y1, x0:x1] = img[randperm, :, y0:y1, x0:x1]
    return img_mix, randperm, torch.argsort(randperm)


def official_region_neck(
    mlp: nn.Module, x: Tensor, cells: list[int], randperm: Tensor, unshuffle: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """necks.py RegionCLNonLinearNeckV1.forward with a box: paste = mean inside, canvas = masked
    mean outside, one MLP pass over [canvas; paste], then the shuffled / unshuffled copies."""
    w0, h0, w1, h1 = cells
    mix_mean_shuffle = torch.mean(x[:, :, h0:h1, w0:w1], [2, 3])
    mask = torch.ones_like(x)
    mask[:, :, h0:h1, w0:w1] = 0.0
    origin_mean = torch.sum(x * mask, dim=[2, 3]) / torch.sum(mask, dim=[2, 3])
    origin_mean, mix_mean_shuffle = torch.chunk(mlp(torch.cat([origin_mean, mix_mean_shuffle])), 2)
    return origin_mean, origin_mean[randperm], mix_mean_shuffle[unshuffle], mix_mean_shuffle


def contrastive_head(pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """heads/contrastive_head.py: CE(cat(pos, neg) / T, label 0)."""
    logits = torch.cat((pos, neg), dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(pos.shape[0], dtype=torch.long))


def official_regionclm_loss(
    m: SSLMethod, im_q: Tensor, im_mix: Tensor, k: Tensor, queue_ck: Tensor, box: list[int]
) -> tuple[Tensor, Tensor]:
    """RegionCLM.forward_train on our modules (encoder_q = backbone + projector), given the
    composite and the keys. ``head2`` is never defined in the released code; it is taken to be
    the ContrastiveHead at τ = 0.2 of the config (papers.md §2.2). -> (instance, region)."""
    stride, tau = m.backbone.output_stride, m.cfg.temperature
    im_ref, randperm, unshuffle = official_region_swapping(im_q, box)
    assert torch.equal(im_ref, im_mix)  # our composite is the official one
    norm = lambda t: F.normalize(t, dim=1)  # noqa: E731
    q = norm(m.projector(m.backbone.forward_stages(im_q)[-1].mean(dim=(2, 3))))
    c5 = m.backbone.forward_stages(im_mix)[-1]
    cells = [v // stride for v in box]
    canvas, canvas_sh, paste, paste_sh = map(norm, official_region_neck(m.projector, c5, cells, randperm, unshuffle))
    queue = queue_ck.clone().detach()
    l_pos_region = torch.cat([torch.einsum("nc,nc->n", canvas, k), torch.einsum("nc,nc->n", paste, k)]).unsqueeze(-1)
    l_neg_canvas = torch.cat([torch.einsum("nc,nc->n", canvas, paste_sh.detach()).unsqueeze(-1), canvas @ queue], 1)
    l_neg_paste = torch.cat([torch.einsum("nc,nc->n", paste, canvas_sh.detach()).unsqueeze(-1), paste @ queue], 1)
    instance = contrastive_head(torch.einsum("nc,nc->n", q, k).unsqueeze(-1), q @ queue, tau)
    region = contrastive_head(l_pos_region, torch.cat([l_neg_canvas, l_neg_paste]), tau)
    return instance, region


@pytest.mark.parametrize(("n", "projector_bn"), [(4, False), (6, True)])
def test_regioncl_m_step_is_the_official_forward_train(n, projector_bn):
    """Loss (instance + region, weight 1 each) and the gradient of every online parameter equal
    the official ``forward_train``'s on the same views, box and keys (even batches: the official
    reversal; odd ones use a cyclic partner, a recorded deviation)."""
    m = _method("regioncl_m", cells=[1, 3], projector_bn=projector_bn)
    batch, params = _batch(n, seed=n), [p for p in m.parameters() if p.requires_grad]
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    queue0 = m.queue.keys.T.clone()
    v_q, _, mix = m.make_views(batch, torch.Generator().manual_seed(7))
    out = m.training_step(batch, 0, torch.Generator().manual_seed(7))
    k = m.queue.keys[:n].clone()  # the step's keys, enqueued at slots 0..n-1
    box = mix.prov.extra["region_box"][0].tolist()
    instance, region = official_regionclm_loss(m, v_q.tensor, mix.tensor, k, queue0, box)
    assert abs(out.loss.item() - (instance + region).item()) < LOSS_TOL
    assert abs(out.logs["loss_region"].item() - region.item()) < LOSS_TOL
    assert abs(out.logs["loss_instance"].item() - instance.item()) < LOSS_TOL
    ours = dict(zip(map(id, params), _grads(out.loss, params), strict=True))
    for p, g_ref in zip(online, _grads(instance + region, online), strict=True):
        assert _close(ours[id(p)], g_ref, 1e-5)
    # broken: regions paired with another image's key
    _, wrong = official_regionclm_loss(m, v_q.tensor, mix.tensor, k.roll(1, 0), queue0, box)
    assert abs(wrong.item() - region.item()) > 1e-2


def test_regioncl_m_without_its_region_term_is_moco_v2():
    """Mechanism off (region weight 0): the loss drops to the instance term, which differs."""
    batch = _batch(5)
    full = _method("regioncl_m", cells=[1, 3])
    off = _method("regioncl_m", cells=[1, 3], region_weight=0.0)
    out_full = full.training_step(batch, 0, torch.Generator().manual_seed(8))
    out_off = off.training_step(batch, 0, torch.Generator().manual_seed(8))
    assert abs(out_off.loss.item() - out_off.logs["loss_instance"].item()) < 1e-6
    assert abs(out_full.logs["loss_instance"].item() - out_off.loss.item()) < 1e-6
    region = out_full.logs["loss_region"].item()
    assert abs(out_full.loss.item() - out_off.loss.item() - region) < 1e-5 and region > 0.1


def official_region_box(
    hw: tuple[int, int], stride: int, cells: tuple[int, int], g: torch.Generator
) -> tuple[list[int], list[int], bool]:
    """RegionCLM.RegionSwapping's box draw (32 -> ``stride``): width, height = stride·randint(lo,
    hi); start = round(randint(0, W) / stride)·stride, clipped to W − 1 − width. -> (pixel box,
    the cells its neck pools: start // stride, side // stride; whether the clip applied)."""
    h, w = hw
    bw = stride * torch.randint(cells[0], cells[1], (1,), generator=g).float()
    bh = stride * torch.randint(cells[0], cells[1], (1,), generator=g).float()
    rw = torch.round(torch.randint(0, w, (1,), generator=g).float() / stride) * stride
    rh = torch.round(torch.randint(0, h, (1,), generator=g).float() / stride) * stride
    sw, sh = torch.minimum(rw, w - 1 - bw), torch.minimum(rh, h - 1 - bh)
    px = [int(sw), int(sh), int(sw + bw), int(sh + bh)]
    c0 = [int(sw) // stride, int(sh) // stride]
    pooled = [c0[0], c0[1], c0[0] + int(bw) // stride, c0[1] + int(bh) // stride]
    return px, pooled, bool(rw > w - 1 - bw or rh > h - 1 - bh)


def test_region_box_is_the_official_draw_except_its_off_grid_clip():
    """Same generator, same draws: where the official corner is not clipped the boxes are equal;
    where it is (W − 1 − width), the official pixel box leaves the grid and its neck pools other
    cells than it swapped, while ours clips to W − width (recorded deviation params.views.cells)."""
    from cropbench.methods.region_swap import box_to_cells, sample_region_box

    counts = {"equal": 0, "clipped": 0}
    for seed in range(60):
        ours = sample_region_box((32, 32), 8, (1, 3), torch.Generator().manual_seed(seed))
        px, pooled, clipped = official_region_box((32, 32), 8, (1, 3), torch.Generator().manual_seed(seed))
        if not clipped:
            assert ours.tolist() == px and box_to_cells(ours, 8).tolist() == pooled
            counts["equal"] += 1
        else:
            assert [v // 8 * 8 for v in px] != px  # off the grid: pixels and cells disagree
            assert all(v % 8 == 0 for v in ours.tolist()) and ours[2] <= 32 and ours[3] <= 32
            counts["clipped"] += 1
    assert counts["equal"] > 10 and counts["clipped"] > 10
