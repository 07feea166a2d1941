"""Fidelity of the video mechanisms: VideoMoCo's decayed queue, BraVe's loss over all view
directions and ParamCrop's cube sampling, each against an independent transcription (official
code where there is one), and each mechanism switched off must change the result.

Official sources (read with ``fetch``):

* VideoMoCo tinapan-pt/VideoMoCo@42e069a:moco/builder.py ``MoCo.forward``, ``_dequeue_and_enqueue``
  (``count``: +1 for every slot at each enqueue, 1 for the slots just written; negatives
  q·(t^count ⊙ queue))
* BraVe deepmind/brave@0ae20d9:brave/models/brave/brave.py ``_build_loss_fn``, ``_regression_loss``,
  ``_safe_norm`` (one ``shared_project`` for every direction, called once per view)
* ParamCrop: no code released (papers.md §1); the naive loop is written from the trilinear
  formula of ``grid_sample`` (align_corners=False, border padding) and our cube parameterisation.

Tolerances: float64 transcriptions vs float32 (losses: measured gaps < 3e-8; BraVe's parameter
gradients: <= 1.1e-6 on entries up to 3.2, so 1e-5) or float64 on both sides (ParamCrop: < 1e-12,
so 1e-10 / 1e-9); a switched-off mechanism moves the result by > 1e-3.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.methods.base import MethodContext
from cropbench.methods.losses import info_nce
from cropbench.methods.paramcrop import CubeConfig, CubeViews, params_to_cubes
from cropbench.registry import BACKBONES, METHODS
from cropbench.runner import method_from_params
from cropbench.types import VideoBatch, View
from cropbench.views.video_transforms import cube_sample

ONE = DistContext()
SMALL = {"hidden_dim": 32, "out_dim": 16}


def _method(name: str, batch_size: int = 4, **params: object) -> nn.Module:
    cls = METHODS.get(name)
    torch.manual_seed(0)
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    fields = set(cls.Config.__dataclass_fields__)
    extra = {"shuffle_bn_splits": 1} if "shuffle_bn_splits" in fields else {}
    if name == "videomoco":  # query and key from one clip, as the entry
        extra["views"] = {"shared_start": True, **params.pop("views", {})}  # type: ignore[dict-item]
    ctx = MethodContext(steps_per_epoch=2, epochs=2, batch_size=batch_size)
    return method_from_params(name, {**SMALL, **extra, **params}, backbone, ctx)


def _paramcrop(framework: str = "vsimclr", **cube: object) -> nn.Module:
    """``framework`` with ParamCrop's cube as its generator, built after the heads (as build_method)."""
    m = _method(framework)
    m.views = CubeViews(from_dict(CubeConfig, cube))
    return m


def _batch(n: int, window: int = 49, seed: int = 0) -> VideoBatch:
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (n, 3, window, 40, 40), dtype=torch.uint8, generator=g)
    return VideoBatch(video, torch.arange(n), torch.arange(n), looped=torch.zeros(n, dtype=torch.bool))


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    return torch.allclose(a.double(), b.double(), atol=tol, rtol=0)


# ------------------------------------------------------------------ VideoMoCo


class OfficialDecayedQueue:
    """VideoMoCo's builder: queue C×K, ``count`` int per slot (0 at start); logits
    [q·k, q·(t^count ⊙ queue)] / T, CE label 0; enqueue: count += 1, count[new] = 1."""

    def __init__(self, queue_ck: Tensor):
        self.queue, self.ptr = queue_ck.clone(), 0
        self.count = torch.zeros(queue_ck.shape[1], dtype=torch.int64)

    def loss(self, q: Tensor, k: Tensor, t: float, temperature: float) -> Tensor:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        weight = torch.mul(self.queue, t ** (1.0 * self.count))
        l_neg = torch.einsum("nc,ck->nk", q, weight.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    def enqueue(self, keys: Tensor) -> None:
        b = keys.shape[0]
        self.count += 1
        self.queue[:, self.ptr : self.ptr + b] = keys.T
        self.count[self.ptr : self.ptr + b] = 1
        self.ptr = (self.ptr + b) % self.queue.shape[1]


def test_videomoco_decayed_queue_matches_the_official_count():
    """Seven steps of B=4 on K=12 with t = 0.9: at every step, from the first (a queue of random
    initial keys, count 0) through the wrap-around, loss, query gradient and per-slot ages equal
    the official ones (a never-written slot counts the enqueues so far, as official ``count``)."""
    m = _method("videomoco", queue_size=12, drop=2, decay=0.9)
    ref = OfficialDecayedQueue(m.queue.keys.T.double())
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        q = torch.randn(4, 16, generator=g).requires_grad_()
        k = F.normalize(torch.randn(4, 16, generator=g), dim=1)
        ours = m.instance_loss(q, k)
        official = ref.loss(F.normalize(q.double(), dim=1), k.double(), 0.9, m.cfg.temperature)
        assert abs(ours.item() - official.item()) < 1e-5
        (g_ours,) = torch.autograd.grad(ours, q)
        (g_ref,) = torch.autograd.grad(official, q)
        assert _close(g_ours, g_ref, 1e-6)
        plain = info_nce(q, k, m.queue.keys.clone(), m.cfg.temperature)  # decay off
        assert (abs(plain.item() - ours.item()) > 1e-3) == (step > 0)  # all ages 0 at the first step
        m.enqueue(k)
        ref.enqueue(k.double())
        assert torch.equal(m.queue_age(), ref.count)


def test_videomoco_step_uses_the_decayed_queue_and_differs_with_decay_off():
    """The method's step (before the generator acts) = official loss on q, k (read back from the
    queue); the same step with t = 1 gives another loss."""
    losses = {}
    for decay in (0.9, 1.0):
        m = _method("videomoco", queue_size=12, drop=2, decay=decay)
        ref = OfficialDecayedQueue(m.queue.keys.T.double())
        g = torch.Generator().manual_seed(2)
        for _ in range(3):  # fill the queue with decorrelated keys
            k0 = F.normalize(torch.randn(4, 16, generator=g), dim=1)
            m.enqueue(k0)
            ref.enqueue(k0.double())
        batch = _batch(4, window=32)
        v_q, _ = m.make_views(batch, torch.Generator().manual_seed(3))
        with torch.no_grad():
            q = F.normalize(m.projector(m.backbone(v_q.tensor)), dim=1)
        out = m.training_step(batch, 0, torch.Generator().manual_seed(3))
        k = m.queue.keys[:4].double()
        official = ref.loss(q.double(), k, decay, m.cfg.temperature)
        assert abs(out.loss.item() - official.item()) < 1e-5
        losses[decay] = out.loss.item()
    assert abs(losses[0.9] - losses[1.0]) > 1e-3


# ------------------------------------------------------------------ BraVe


def official_brave_regression(x: Tensor, y: Tensor, epsilon: float = 1e-5) -> Tensor:
    """brave.py ``_regression_loss``: x / safe_norm(x), y / safe_norm(y) (norm floored at eps),
    mean over the batch of 0.5·Σ(x̂ − ŷ)²."""

    def safe_norm(v: Tensor) -> Tensor:
        norm = v.norm(dim=-1, keepdim=True)
        return torch.where(norm <= epsilon, torch.full_like(norm, epsilon), norm)

    return torch.mean(0.5 * ((x / safe_norm(x) - y / safe_norm(y)) ** 2).sum(-1))


def official_brave_loss(m: nn.Module, views: list[View]) -> Tensor:
    """brave.py ``loss_fn`` on our modules: f_n from the narrow backbone, each broad view through
    its own backbone; ``shared_project`` (projector z, predictor h) is called on the broad
    features and again on the narrow ones for every broad view; per broad view the terms
    b->n = rl(h_b, sg z_n) and n->b = rl(h_n, sg z_b); the loss is the mean of all terms."""

    def shared_project(f: Tensor) -> tuple[Tensor, Tensor]:
        z = m.projector(f)
        return z, m.predictor(z)

    narrow, *broad = views
    f_n = m.backbone(narrow.tensor)
    losses = []
    for view, net in zip(broad, m.broad_backbones, strict=True):
        z_b, h_b = shared_project(net(view.tensor))
        z_n, h_n = shared_project(f_n)
        losses += [
            official_brave_regression(h_b.double(), z_n.double().detach()),
            official_brave_regression(h_n.double(), z_b.double().detach()),
        ]
    return torch.stack(losses).mean()


TINY_BACKBONE = {"backbone_args": {"widths": [8, 8, 16, 16]}}
_IMAGE = {"size": 32, "scale": [0.3, 1.0], "ratio": [0.5, 2.0], "jitter_order": "fixed", "blur_p": 0.5}
NARROW = {"frames": 8, "stride": 2, "image": _IMAGE}  # BraVe micro: 8 frames every 2
BROAD = {"frames": 16, "stride": 3, "image": {**_IMAGE, "size": 24}, "random_conv_p": 1.0}  # 16 every 3


def _brave(*modalities: str) -> nn.Module:
    """BraVe with one broad view (and its backbone) per modality."""
    views = {"narrow": NARROW, "broad": [{"view": BROAD, "modality": mod} for mod in modalities]}
    return _method("brave", views=views, broad_backbones=[TINY_BACKBONE] * len(modalities))


@pytest.mark.parametrize("modalities", [["rgb"], ["rgb", "diff"]])
def test_brave_step_is_the_official_loss_over_all_directions(modalities):
    """Loss and every parameter's gradient (both backbones, the shared heads) equal the
    official loss on the same views; with two broad views the mean runs over four terms."""
    m = _brave(*modalities)
    batch = _batch(3)
    params = [p for p in m.parameters() if p.requires_grad]
    views = m.make_views(batch, torch.Generator().manual_seed(4))
    out = m.training_step(batch, 0, torch.Generator().manual_seed(4))
    ref = official_brave_loss(m, views)
    assert abs(out.loss.item() - ref.item()) < 1e-5
    ours = torch.autograd.grad(out.loss, params, allow_unused=True)
    theirs = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert _close(a, b, 1e-5)  # float32 vs float64: measured <= 1.1e-6 on entries <= 3.2
    for i, net in enumerate(m.broad_backbones):  # each broad backbone learns (b->n direction)
        assert any(
            g is not None and g.abs().sum() > 0
            for g in torch.autograd.grad(official_brave_loss(m, views), list(net.parameters()), allow_unused=True)
        ), f"broad backbone {i} gets no gradient"
    # broken: one direction only
    narrow, broad = views[0], views[1]
    z_n = m.projector(m.backbone(narrow.tensor))
    z_b = m.projector(m.broad_backbones[0](broad.tensor))
    one_way = official_brave_regression(m.predictor(z_n).double(), z_b.double().detach())
    assert abs(one_way.item() - ref.item()) > 1e-3


def test_brave_with_the_broad_view_replaced_by_the_narrow_one_differs():
    """Mechanism off: the broad backbone fed the narrow clip gives another loss."""
    m, batch = _brave("rgb"), _batch(3)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(5))
    narrow, _ = m.make_views(batch, torch.Generator().manual_seed(5))
    m.make_views = lambda b, g: [narrow, narrow]  # type: ignore[method-assign]
    off = m.training_step(batch, 0, torch.Generator().manual_seed(5))
    assert abs(out.loss.item() - off.loss.item()) > 1e-3


# ------------------------------------------------------------------ ParamCrop


def naive_cube(
    video: Tensor,
    p: Tensor,
    spatial: tuple[float, float],
    temporal: tuple[float, float],
    out: tuple[int, int, int],
) -> Tensor:
    """One clip C×T×H×W and its six parameters in (0, 1) -> C×T'×h×w, voxel by voxel.

    Per axis (t, y, x) of extent L: side s = lo + (hi − lo)·p_scale (a fraction of L), centre
    c = s/2 + (1 − s)·p_pos, interval [c − s/2, c + s/2]·L. Output index k of n samples the
    source point a + (k + ½)·(b − a)/n − ½ (pixel centres), clamped to [0, L − 1] (border),
    interpolated trilinearly from the 8 neighbours. Differentiable in ``p``.
    """
    _, t, h, w = video.shape
    lo = [temporal[0], spatial[0], spatial[0]]
    hi = [temporal[1], spatial[1], spatial[1]]
    extent = [t, h, w]
    axes = []
    for a in range(3):
        s = lo[a] + (hi[a] - lo[a]) * p[a]
        c = s / 2 + (1 - s) * p[3 + a]
        first, last = (c - s / 2) * extent[a], (c + s / 2) * extent[a]
        pts = [first + (k + 0.5) * (last - first) / out[a] - 0.5 for k in range(out[a])]
        axes.append([v.clamp(0.0, extent[a] - 1.0) for v in pts])
    res = []
    for pt in axes[0]:
        for py in axes[1]:
            for px in axes[2]:
                acc = torch.zeros(video.shape[0], dtype=video.dtype)
                f = [math.floor(float(v.detach())) for v in (pt, py, px)]
                for dt in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            idx = [min(f[0] + dt, t - 1), min(f[1] + dy, h - 1), min(f[2] + dx, w - 1)]
                            wgt = (
                                (1 - (pt - f[0] - dt).abs())
                                * (1 - (py - f[1] - dy).abs())
                                * (1 - (px - f[2] - dx).abs())
                            )
                            acc = acc + wgt * video[:, idx[0], idx[1], idx[2]]
                res.append(acc)
    return torch.stack(res, dim=1).view(video.shape[0], *out)


def test_paramcrop_cube_sampling_matches_a_naive_trilinear_loop_in_value_and_gradient():
    """params -> ``params_to_cubes`` -> ``cube_sample`` against ``naive_cube``: the sampled
    values and the gradient of a random linear read-out w.r.t. the six crop parameters."""
    g = torch.Generator().manual_seed(6)
    video = torch.rand(3, 2, 6, 7, 9, generator=g, dtype=torch.float64)
    params = torch.rand(3, 6, generator=g, dtype=torch.float64).requires_grad_()
    spatial, temporal, out = (0.35, 1.0), (0.5, 1.0), (3, 4, 5)
    readout = torch.randn(3, 2, *out, generator=g, dtype=torch.float64)
    boxes, times = params_to_cubes(params, spatial, temporal, 6, (7, 9))
    ours = cube_sample(video, boxes, times, out)
    ref = torch.stack([naive_cube(video[i], params[i], spatial, temporal, out) for i in range(3)])
    assert _close(ours, ref, 1e-10)
    (g_ours,) = torch.autograd.grad((ours * readout).sum(), params)
    (g_ref,) = torch.autograd.grad((ref * readout).sum(), params)
    assert _close(g_ours, g_ref, 1e-9)
    assert g_ours.abs().min() > 0  # every parameter moves the cube
    # broken: scale and position swapped
    swapped = torch.cat([params[:, 3:], params[:, :3]], 1)
    wrong = torch.stack([naive_cube(video[i], swapped[i], spatial, temporal, out) for i in range(3)])
    assert not _close(ours, wrong, 1e-3)


def test_paramcrop_with_its_generator_zeroed_gives_other_cubes_and_no_crop_gradient():
    """Mechanism off: a zeroed crop MLP gives every clip and view the same middle cube; the live
    one gives per-clip cubes, and the (reversed) loss gradient reaches its weights."""
    m, batch = _paramcrop(), _batch(3, window=32)
    views = m.make_views(batch, torch.Generator().manual_seed(7))
    loss = m.training_step(batch, 0, torch.Generator().manual_seed(7)).loss
    grads = torch.autograd.grad(loss, list(m.views.cube_generator.parameters()))
    assert all(gr.abs().sum() > 0 for gr in grads)
    with torch.no_grad():
        m.views.cube_generator.net[-1].weight.zero_()
        m.views.cube_generator.net[-1].bias.zero_()
    off = m.make_views(batch, torch.Generator().manual_seed(7))
    for v_on, v_off in zip(views, off, strict=True):
        assert not torch.allclose(v_on.prov.boxes, v_off.prov.boxes, atol=1e-3)
        assert torch.allclose(v_off.prov.boxes, v_off.prov.boxes[:1].expand_as(v_off.prov.boxes))
        assert not torch.allclose(v_on.tensor, v_off.tensor, atol=1e-3)
