"""Video backbones, VideoMoCo / ParamCrop / BraVe operators and losses against naive references,
and one training step of every registered video method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from cropbench.config import from_dict
from cropbench.methods.base import EpochContext, MethodContext
from cropbench.methods.brave import regression
from cropbench.methods.losses import info_nce
from cropbench.methods.paramcrop import CubeConfig, CubeGenerator, CubeViews, grad_reverse, params_to_cubes
from cropbench.methods.video_backbones import temporal_shift
from cropbench.methods.videomoco import decayed_info_nce, drop_frames
from cropbench.optim import build_optimizer, named_params, set_lr
from cropbench.recipe import OptimConfig
from cropbench.registry import BACKBONES, METHODS
from cropbench.runner import method_from_params
from cropbench.types import VideoBatch
from cropbench.viewplot import draw_epoch_curves
from cropbench.views.generators import frame_differences
from cropbench.views.video import cube_iou

SMALL = {"hidden_dim": 32, "out_dim": 16}


# BraVe's micro views: narrow 8 frames every 2, broad 16 every 3 with a random conv, both 32 px
_IMAGE = {"size": 32, "scale": [0.3, 1.0], "ratio": [0.5, 2.0], "jitter_order": "fixed", "blur_p": 0.5}
NARROW = {"frames": 8, "stride": 2, "image": _IMAGE}
BROAD = {"frames": 16, "stride": 3, "image": {**_IMAGE, "size": 24}, "random_conv_p": 1.0}
TINY_BACKBONE = {"backbone_args": {"widths": [8, 8, 16, 16]}}
DEFAULT_VIEWS = {  # what the tests train on when they name no views (the generator's defaults otherwise)
    "brave": {"narrow": NARROW, "broad": [{"view": BROAD}]},
    "videomoco": {"shared_start": True},  # query and key from one clip, as the entry
}


def _method(name: str, views: dict | None = None, **params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    views = views if views is not None else DEFAULT_VIEWS.get(name, {})
    extra = {"broad_backbones": [TINY_BACKBONE] * len(views["broad"])} if name == "brave" else {}
    ctx = MethodContext(steps_per_epoch=2, epochs=2, batch_size=4)
    heads = {"num_classes": 4} if name == "vsupervised" else SMALL  # a classifier, no projector
    return method_from_params(name, {**heads, **extra, **params, "views": views}, backbone, ctx)


def _paramcrop(framework: str, **cube: object) -> torch.nn.Module:
    """``framework`` with ParamCrop's cube as its generator, built after the heads (as build_method)."""
    m = _method(framework, **({"queue_size": 16, "shuffle_bn_splits": 2} if framework == "vmoco" else {}))
    m.views = CubeViews(from_dict(CubeConfig, cube))
    return m


def _batch(window: int = 49, n: int = 4) -> VideoBatch:
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (n, 3, window, 40, 40), dtype=torch.uint8, generator=g)
    return VideoBatch(video, torch.arange(n), torch.arange(n), looped=torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("r3d_micro", (2, 3, 8, 32, 32)),
        ("r2plus1d_18", (1, 3, 4, 32, 32)),
        ("r3d_18", (1, 3, 4, 32, 32)),
        ("tsm_resnet50", (1, 3, 2, 32, 32)),
    ],
)
def test_video_backbones_pool_clips_to_feat_dim(name, shape):
    net = BACKBONES.get(name)().eval()
    with torch.no_grad():
        assert net(torch.rand(*shape)).shape == (shape[0], net.feat_dim)
    assert net.modality == "video"
    if name in ("r3d_18", "r2plus1d_18"):  # torchvision names, minus the classifier
        import torchvision

        ref = getattr(torchvision.models.video, name)().state_dict()
        assert set(net.state_dict()) == {k for k in ref if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="expected a B×C×T×H×W clip batch"):
        net(torch.rand(1, 3, 32, 32))


def test_temporal_shift_matches_a_naive_loop():
    x = torch.randn(2 * 4, 16, 3, 3)  # B=2, T=4
    out = temporal_shift(x, 4, fold_div=8).view(2, 4, 16, 3, 3)
    v = x.view(2, 4, 16, 3, 3)
    for b in range(2):
        for t in range(4):
            for c in range(16):
                if c < 2:
                    ref = v[b, t + 1, c] if t < 3 else torch.zeros(3, 3)
                elif c < 4:
                    ref = v[b, t - 1, c] if t > 0 else torch.zeros(3, 3)
                else:
                    ref = v[b, t, c]
                assert torch.equal(out[b, t, c], ref)


def test_decayed_info_nce_matches_the_formula_and_reduces_to_moco():
    torch.manual_seed(0)
    q, k, queue = torch.randn(3, 5), torch.randn(3, 5), torch.randn(7, 5)
    age, decay, tau = torch.arange(1, 8), 0.9, 0.2
    loss = decayed_info_nce(q, k, queue, age, decay, tau)
    qn, kn, nn_ = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    total = 0.0
    for i in range(3):
        pos = math.exp(float(qn[i] @ kn[i]) / tau)
        neg = sum(math.exp(decay ** int(age[j]) * float(qn[i] @ nn_[j]) / tau) for j in range(7))
        total += -math.log(pos / (pos + neg))
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    assert decayed_info_nce(q, k, queue, age, 1.0, tau).item() == pytest.approx(
        info_nce(q, k, queue, tau).item(), rel=1e-6
    )


def test_videomoco_queue_age_counts_iterations():
    """Official ``count``: each enqueue ages every slot by 1 and sets the written ones to 1; the
    slots still holding random initial keys count the enqueues so far (2 after two steps)."""
    m = _method("videomoco", queue_size=12, drop=2)
    assert m.queue_age().tolist() == [0] * 12
    for _ in range(2):
        m.enqueue(torch.randn(4, 16))  # batch_size 4 per step
    assert m.queue_age().tolist() == [2] * 4 + [1] * 4 + [2] * 4


def test_drop_frames_forward_and_official_custom_backward():
    """tinapan-pt/VideoMoCo@42e069a moco/builder.py ``VideoTopk``: forward replaces the k
    lowest-scoring frames by their mean over (C, H, W); backward returns no clip gradient and
    ``grad_list = torch.sum(grad_output, dim=(1, 3, 4))`` for the scores (all frames)."""
    torch.manual_seed(1)
    x = torch.rand(2, 3, 5, 4, 4, requires_grad=True)
    logits = torch.randn(2, 5, requires_grad=True)
    scores = torch.softmax(logits, dim=1)
    out, dropped = drop_frames(x, scores, drop=2)
    for b in range(2):
        low = set(scores[b].argsort()[:2].tolist())
        assert set(dropped[b].nonzero().flatten().tolist()) == low
        for t in range(5):
            ref = torch.full_like(x[b, :, t], x[b, :, t].mean().item()) if t in low else x[b, :, t]
            assert torch.allclose(out[b, :, t], ref, atol=1e-6)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), scores, retain_graph=True)
    naive = torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            naive[b, t] = sum(g[b, c, t, i, j] for c in range(3) for i in range(4) for j in range(4))
    assert torch.allclose(grad, naive, atol=1e-5)
    assert torch.autograd.grad((out * g).sum(), x, allow_unused=True)[0] is None  # grad_im = None


def _videomoco_pair(**params: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    import copy

    m = _method("videomoco", queue_size=16, shuffle_bn_splits=2, drop=2, adversarial_from=0.0, **params)
    return m, copy.deepcopy(m)


def _reference_forward(ref: torch.nn.Module, batch: VideoBatch, seed: int, x_fake_leaf: bool):
    """The step written out by hand: views, generator scores, frame drop, query, key, InfoNCE."""
    gen = torch.Generator().manual_seed(seed)
    v_q, v_k = ref.make_views(batch, gen)
    raw = ref.generator(v_q.tensor)
    with torch.no_grad():
        q_real = F.normalize(ref.encode_query(v_q.tensor), dim=1)
    x_fake = drop_frames(v_q.tensor, raw, 2)[0]
    if x_fake_leaf:
        x_fake = x_fake.detach().requires_grad_()
    q = ref.encode_query(x_fake)
    info = ref.instance_loss(q, ref.encode_key(v_k.tensor, gen))
    return raw, x_fake, q, q_real, info


def test_videomoco_generator_gets_the_reversed_official_topk_gradient():
    """Paper objective ("reverse"): d loss / d scores = −w · Σ_{c,h,w} d InfoNCE / d x_fake, the
    official VideoTopk backward (tinapan-pt/VideoMoCo@42e069a moco/builder.py) behind a gradient
    reversal of strength w: the generator ascends the loss the encoder descends."""
    m, ref = _videomoco_pair(generator_weight=0.5)
    batch = _batch(32)
    captured = []

    def keep(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    m.generator.register_forward_hook(keep)
    m.training_step(batch, 0, torch.Generator().manual_seed(3)).loss.backward()
    _, x_fake, _, _, info = _reference_forward(ref, batch, 3, x_fake_leaf=True)
    (gx,) = torch.autograd.grad(info, x_fake)
    naive = torch.tensor([[-0.5 * gx[b, :, t].sum().item() for t in range(8)] for b in range(4)])
    assert naive.abs().min() > 0
    assert torch.allclose(captured[0].grad, naive, rtol=1e-4, atol=1e-7)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())


def test_videomoco_official_generator_loss_is_l1_plus_infonce_and_spares_the_encoder():
    """generator_loss "official" (tinapan-pt/VideoMoCo@42e069a train.py): the generator steps on
    ∇[−100·L1(q_fake, q_real)] + ∇InfoNCE (loss_d.backward() accumulates into netG before
    optimizer_g.step()); the encoder on ∇InfoNCE only (netD is frozen for loss_g)."""
    m, ref = _videomoco_pair(generator_loss="official")
    batch = _batch(32)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(3))
    out.loss.backward()
    _, _, q, q_real, info = _reference_forward(ref, batch, 3, x_fake_leaf=False)
    l1 = F.l1_loss(F.normalize(q, dim=1), q_real)
    assert torch.allclose(out.logs["loss_generator_l1"], l1.detach())
    gen_ref = torch.autograd.grad(info - 100 * l1, list(ref.generator.parameters()), retain_graph=True)
    enc = [n for n, p in ref.named_parameters() if p.requires_grad and not n.startswith("generator.")]
    params = [dict(ref.named_parameters())[n] for n in enc]
    enc_ref = torch.autograd.grad(info, params, allow_unused=True, retain_graph=True)
    for p, r in zip(m.generator.parameters(), gen_ref, strict=True):
        assert torch.allclose(p.grad, r, rtol=1e-4, atol=1e-6)
    named = dict(m.named_parameters())
    for n, r in zip(enc, enc_ref, strict=True):
        if r is not None:
            assert torch.allclose(named[n].grad, r, rtol=1e-4, atol=1e-6), n
    # the L1 term matters: without it the generator's gradient differs
    only_info = torch.autograd.grad(info, list(ref.generator.parameters()), allow_unused=True)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(gen_ref, only_info, strict=True) if b is not None)


def test_grad_reverse_negates_and_scales_the_gradient():
    x = torch.randn(4, requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(4.0))


def test_paramcrop_cubes_by_hand_and_always_inside_the_clip():
    p = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [0.5, 0.5, 0.0, 1.0, 0.5, 0.0],
        ]
    )
    boxes, times = params_to_cubes(p, spatial=(0.4, 1.0), temporal=(0.5, 1.0), window=20, size=(10, 30))
    assert boxes.tolist()[0] == pytest.approx([0, 0, 12, 4])  # smallest cube, first corner
    assert times.tolist()[0] == pytest.approx([0, 10])
    assert boxes.tolist()[1] == pytest.approx([0, 0, 30, 10]) and times.tolist()[1] == pytest.approx([0, 20])
    assert boxes.tolist()[2] == pytest.approx([0, 1.5, 12, 8.5]) and times.tolist()[2] == pytest.approx([5, 20])
    rand = torch.rand(1000, 6)
    b, t = params_to_cubes(rand, (0.35, 1.0), (0.5, 1.0), 16, (40, 40))
    assert b.min() >= 0 and b[:, 2:].max() <= 40 and t.min() >= 0 and t.max() <= 16
    side = (b[:, 2] - b[:, 0]) / 40
    assert side.min() >= 0.35 - 1e-6 and (t[:, 1] - t[:, 0]).min() >= 8 - 1e-5


def test_paramcrop_crop_mlp_ascends_the_loss_the_encoder_descends():
    batch = _batch(32)
    grads = {}
    for w in (1.0, -1.0):  # weight −1: no reversal, the plain gradient of the loss
        m = _paramcrop("vsimclr", grl_weight=w)
        m.training_step(batch, 0, torch.Generator().manual_seed(3)).loss.backward()
        grads[w] = torch.cat([p.grad.flatten() for p in m.views.cube_generator.parameters()])
        enc = torch.cat([p.grad.flatten() for p in m.backbone.parameters()])
        grads[f"enc{w}"] = enc
    assert grads[1.0].abs().sum() > 0
    assert torch.allclose(grads[1.0], -grads[-1.0], atol=1e-6)
    assert torch.allclose(grads["enc1.0"], grads["enc-1.0"], atol=1e-6)  # the encoder is unaffected


def test_paramcrop_logs_epoch_iou_and_draws_the_curve(tmp_path):
    m = _paramcrop("vbyol", blur_p=[0.0, 0.0], solarize_p=[0.0, 0.2])
    batch, g = _batch(32), torch.Generator().manual_seed(0)
    views = m.make_views(batch, g)
    expected = cube_iou(views[0].prov, views[1].prov).mean().item()
    out = m.on_epoch_end(EpochContext(1, run_dir=tmp_path))
    assert out["view_iou"] == pytest.approx(expected, rel=1e-5) and 0 < out["view_centre_distance"] < 2
    assert not list(tmp_path.iterdir())  # a method returns data only; cropbench.viewplot draws its curve
    history = [{"epoch": 1, "view_iou": 0.9, "view_centre_distance": 0.1}, {"epoch": 2, **out}]
    assert draw_epoch_curves(tmp_path, history, m.epoch_curves) == [tmp_path / "paramcrop_views.png"]
    assert (tmp_path / "paramcrop_views.png").read_bytes()[:4] == b"\x89PNG"
    assert m.on_epoch_end(EpochContext(2, run_dir=tmp_path)) == {}  # nothing accumulated since
    assert isinstance(CubeGenerator(4, 8)(torch.randn(3, 4)), torch.Tensor)


def test_brave_loss_is_the_mean_of_both_directions():
    torch.manual_seed(0)
    h, z = torch.randn(6, 8), torch.randn(6, 8)
    naive = sum(0.5 * float(((h[i] / h[i].norm() - z[i] / z[i].norm()) ** 2).sum()) for i in range(6)) / 6
    assert regression(h, z).item() == pytest.approx(naive, rel=1e-5)
    m = _method("brave")
    batch, g = _batch(), torch.Generator().manual_seed(1)
    loss = m.training_step(batch, 0, g).loss
    narrow, broad = m.make_views(batch, torch.Generator().manual_seed(1))
    z_n, z_b = (
        m.projector(m.backbone(narrow.tensor)),
        m.projector(m.broad_backbones[0](broad.tensor)),
    )
    ref = (regression(m.predictor(z_n), z_b) + regression(m.predictor(z_b), z_n)) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_brave_views_start_together_and_diff_is_a_frame_difference():
    m = _method("brave", views={"narrow": NARROW, "broad": [{"modality": "diff", "view": BROAD}]})
    batch = _batch()
    narrow, diff = m.make_views(batch, torch.Generator().manual_seed(2))
    t_n, t_b = narrow.prov.extra["time"], diff.prov.extra["time"]
    first = lambda t, stride: t[:, 0] - 0.5 + stride / 2  # noqa: E731 - first sampled frame
    assert torch.equal(first(t_n, 2), first(t_b, 3))  # the narrow and broad clips start together
    assert diff.tensor.shape[2] == 16 and narrow.tensor.shape[2] == 8
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 2, 4, 2, 2)
    assert torch.equal(frame_differences(x), torch.ones(1, 2, 3, 2, 2))


def test_brave_predictor_gradient_is_scaled_before_the_optimizer():
    """deepmind/brave@0ae20d9:brave/training/optimizers.py chains ``_scale_by_module_name``
    ((r'.*predictor.*', 10.0), brave/models/brave/config.py) *before* ``optax.lars``: the
    predictor's gradients are x10 (so LARS's trust ratio normalises most of it), not its lr.
    Plain SGD (lr 1, no momentum or decay) makes the step the scaled gradient itself."""
    m = _method("brave")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.training_step(_batch(), 0, torch.Generator().manual_seed(1)).loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    opt = build_optimizer(m.param_groups(), named_params(m), OptimConfig(momentum=0.0, weight_decay=0.0), 1.0)
    set_lr(opt, 1.0, 1.0)
    assert all(g["lr"] == 1.0 for g in opt.param_groups)  # one lr for all
    opt.step()
    for n, p in m.named_parameters():
        if n in grads:
            scale = 10.0 if n.startswith("predictor.") else 1.0
            assert torch.allclose(before[n] - p.detach(), scale * grads[n], rtol=1e-5, atol=1e-7), n
    assert any(n.startswith("predictor.") and g.abs().sum() > 0 for n, g in grads.items())


def test_videomoco_query_and_key_share_their_clip():
    m = _method("videomoco", queue_size=16, drop=2)
    q, k = m.make_views(_batch(32), torch.Generator().manual_seed(0))
    assert torch.equal(q.prov.extra["time"], k.prov.extra["time"])
    assert not torch.equal(q.prov.boxes, k.prov.boxes)


VIDEO_METHODS = [
    "vsimclr",
    "vmoco",
    "vbyol",
    "videomoco",
    "brave",
    "vsupervised",
]


def test_the_list_covers_every_registered_video_method():
    assert {n for n in METHODS.names() if getattr(METHODS.get(n), "modality", "") == "video"} == set(VIDEO_METHODS)


@pytest.mark.parametrize("name", [*VIDEO_METHODS, "paramcrop+vsimclr", "paramcrop+vmoco", "paramcrop+vbyol"])
def test_every_video_method_takes_a_finite_training_step(name, tmp_path):
    params = {"queue_size": 16, "shuffle_bn_splits": 2} if "moco" in name else {}  # batch 4
    if name == "videomoco":
        params.update(drop=2, adversarial_from=0.0)
    m = _paramcrop(name[len("paramcrop+") :]) if name.startswith("paramcrop+") else _method(name, **params)
    batch = _batch(49 if name == "brave" else 32)
    before = [p.detach().clone() for p in m.backbone.parameters()]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    out = m.training_step(batch, 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    m.after_step(1)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, m.backbone.parameters(), strict=True))
    assert m.encoder is m.backbone and m.modality == "video"
    assert isinstance(m.on_epoch_end(EpochContext(0, run_dir=Path(tmp_path))), dict)
