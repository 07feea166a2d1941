"""SimCLR, MoCo v2, BYOL, SimSiam: one real training step each on tiny data, the momentum and
queue mechanics by hand, parameter groups, and every entry's recipes validating into Config."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from cropbench.backbones import build_backbone
from cropbench.config import from_dict
from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, SSLMethod
from cropbench.methods.byol import BYOL
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.simsiam import SimSiam
from cropbench.optim import build_optimizer, named_params, set_lr
from cropbench.recipe import SCALES, OptimConfig, load_entry
from cropbench.registry import METHODS
from cropbench.runner import build_generator, generator_config, method_config
from cropbench.types import ImageBatch

BASELINES = ("simclr", "mocov2", "byol", "simsiam")
TINY = {  # head sizes for a fast test; everything else is the paper default
    "simclr": {"hidden_dim": 32, "out_dim": 16},
    "mocov2": {"hidden_dim": 32, "out_dim": 16, "queue_size": 40, "shuffle_bn_splits": 2},  # 8 = 4 per BN group
    "byol": {"hidden_dim": 32, "out_dim": 16},
    "simsiam": {"dim": 32, "pred_dim": 8},
}


def _method(name: str, total_steps: int = 10, **over: object) -> SSLMethod:
    cls = METHODS.get(name)
    cfg = replace(cls.Config(), **{**TINY[name], **over})
    views = build_generator(name, {"views": {"size": 16}} if name == "byol" else {"size": 16})
    torch.manual_seed(0)
    backbone = build_backbone("resnet_micro", widths=(8, 8, 16, 16))
    return cls(cfg, backbone, MethodContext(steps_per_epoch=total_steps, epochs=1, batch_size=8), views)


def _batch(n: int = 8) -> ImageBatch:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 24, 24), dtype=torch.uint8, generator=g)
    return ImageBatch(images, torch.full((n,), -1), torch.arange(n))


@pytest.mark.parametrize("name", BASELINES)
def test_training_step_trains_the_encoder(name: str) -> None:
    method = _method(name)
    views = method.make_views(_batch(), torch.Generator().manual_seed(0))
    assert len(views) == 2 and views[0].tensor.shape == (8, 3, 16, 16)
    assert views[0].prov.boxes.shape == (8, 4)
    opt = torch.optim.SGD([g["params"] for g in method.param_groups()][0], lr=0.1)
    out = method.training_step(_batch(), 0, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    before = method.encoder.conv1.weight.detach().clone()
    out.loss.backward()
    assert method.encoder.conv1.weight.grad.abs().sum() > 0
    opt.step()
    method.after_step(0)
    assert not torch.equal(before, method.encoder.conv1.weight)
    assert method.encoder is method.backbone


def test_simclr_loss_at_init_is_near_log_of_negatives() -> None:
    """At random init all views look alike to the head: NT-Xent ≈ log(2N − 1)."""
    method = _method("simclr", temperature=10.0)
    loss = method.training_step(_batch(), 0, torch.Generator().manual_seed(0)).loss
    assert loss.item() == pytest.approx(torch.log(torch.tensor(15.0)).item(), abs=0.05)


def test_mocov2_momentum_update_and_enqueue_by_hand() -> None:
    method = _method("mocov2", momentum=0.9)
    assert isinstance(method, MoCoV2)
    key_before = [p.detach().clone() for p in method.key_backbone.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(key_before, method.backbone.parameters(), strict=True))
    assert not any(p.requires_grad for p in method.key_backbone.parameters())
    out = method.training_step(_batch(), 0, torch.Generator().manual_seed(0))
    assert int(method.queue.ptr) == 8  # this step's 8 keys were enqueued
    out.loss.backward()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # a stand-in optimizer step
    method.after_step(0)
    for k_old, k_new, q in zip(key_before, method.key_backbone.parameters(), method.backbone.parameters(), strict=True):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    # optimizer sees only the query side
    opt_params = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not opt_params & {id(p) for p in method.key_backbone.parameters()}
    assert "queue.keys" in method.state_dict() and "queue.ptr" in method.state_dict()


def test_mocov2_symmetric_loss_against_the_formula_and_both_keys_enqueued() -> None:
    """``symmetric``: L(q1, k2) + L(q2, k1), each from MoCo eq. 1 as a naive loop over the same
    queue snapshot; then both key batches (16 keys) are in the queue, k1's first."""
    from tests.test_losses import naive_info_nce

    method = _method("mocov2", symmetric=True, shuffle_bn=False)  # plain BN: keys a function of the views
    method.queue.keys.copy_(torch.nn.functional.normalize(torch.randn(40, 16), dim=1))
    queue = method.queue.keys.clone()
    v1, v2 = method.make_views(_batch(), torch.Generator().manual_seed(0))  # the step's first draw
    with torch.no_grad():
        q1, q2 = method.encode_query(v1.tensor), method.encode_query(v2.tensor)
        k1, k2 = method.encode_key(v1.tensor, torch.Generator()), method.encode_key(v2.tensor, torch.Generator())
    out = method.training_step(_batch(), 0, torch.Generator().manual_seed(0))
    tau = method.cfg.temperature
    want = naive_info_nce(q1, k2, queue, tau) + naive_info_nce(q2, k1, queue, tau)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.loss.item() != pytest.approx(2 * naive_info_nce(q1, k1, queue, tau), rel=1e-3)  # pairing matters
    assert int(method.queue.ptr) == 16
    torch.testing.assert_close(method.queue.keys[:16], torch.cat([k1, k2]))
    torch.testing.assert_close(method.queue.keys[16:], queue[16:])


def test_mocov2_symmetric_is_refused_by_subclasses_with_their_own_step() -> None:
    from cropbench.errors import ConfigError

    cls = METHODS.get("densecl")
    cfg = replace(cls.Config(), hidden_dim=32, out_dim=16, queue_size=40, shuffle_bn_splits=2, symmetric=True)
    torch.manual_seed(0)
    backbone = build_backbone("resnet_micro", widths=(8, 8, 16, 16))
    with pytest.raises(ConfigError, match="params.symmetric: DenseCL has its own training step"):
        cls(cfg, backbone, MethodContext(steps_per_epoch=10, epochs=1, batch_size=8), build_generator("densecl", {}))


def test_symmetric_loss_on_video_moco_which_inherits_the_step() -> None:
    """vmoco runs MoCo v2's own step on clips, so ``symmetric`` applies there too: both clip
    views' keys are enqueued and the loss is the sum of the two directions' InfoNCE."""
    from cropbench.registry import BACKBONES
    from cropbench.runner import method_from_params
    from cropbench.types import VideoBatch

    torch.manual_seed(0)
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    clip = {"frames": 4, "stride": 2, "image": {"size": 16}}
    params = {"symmetric": True, "shuffle_bn": False, "queue_size": 32, "hidden_dim": 16, "out_dim": 8}
    method = method_from_params("vmoco", {**params, "views": {"clip": clip}}, backbone, MethodContext(batch_size=4))
    video = torch.randint(0, 256, (4, 3, 8, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = VideoBatch(video, torch.full((4,), -1), torch.arange(4), looped=torch.zeros(4, dtype=torch.bool))
    queue = method.queue.keys.clone()
    v1, v2 = method.make_views(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q1, q2 = method.encode_query(v1.tensor), method.encode_query(v2.tensor)
        k1, k2 = method.encode_key(v1.tensor, torch.Generator()), method.encode_key(v2.tensor, torch.Generator())
    out = method.training_step(batch, 0, torch.Generator().manual_seed(0))
    from tests.test_losses import naive_info_nce

    tau = method.cfg.temperature
    want = naive_info_nce(q1, k2, queue, tau) + naive_info_nce(q2, k1, queue, tau)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert int(method.queue.ptr) == 8


def test_mocov2_keys_are_encoded_without_gradient() -> None:
    method = _method("mocov2")
    k = method.encode_key(torch.randn(4, 3, 16, 16), torch.Generator())
    assert not k.requires_grad
    torch.testing.assert_close(k.norm(dim=1), torch.ones(4))


def test_byol_asymmetric_views_and_cosine_momentum() -> None:
    method = _method("byol", total_steps=100)
    assert isinstance(method, BYOL)
    v1, v2 = method.views.configs  # its default generator: asymmetric_pair
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert method.momentum_at(0) == pytest.approx(0.996) and method.momentum_at(100) == pytest.approx(1.0)
    online = [p.detach().clone() for p in method.projector.parameters()]
    target = [p.detach().clone() for p in method.target_projector.parameters()]
    with torch.no_grad():
        for p in method.projector.parameters():
            p.mul_(2.0)
    method.after_step(50)  # τ = 0.998
    for t_old, t_new, o in zip(target, method.target_projector.parameters(), online, strict=True):
        torch.testing.assert_close(t_new, 0.998 * t_old + 0.002 * (2 * o))
    out = method.training_step(_batch(), 50, torch.Generator().manual_seed(0))
    assert out.logs["momentum"] == pytest.approx(0.998)
    assert 0.0 <= out.loss.item() <= 8.0  # two terms of 2 − 2·cos each


def test_simsiam_param_groups_fix_the_predictor_lr() -> None:
    method = _method("simsiam")
    assert isinstance(method, SimSiam)
    groups = method.param_groups()
    assert [g.get("fixed_lr", False) for g in groups] == [False, True]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in method.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.predictor.parameters()}
    no_fix = _method("simsiam", fix_pred_lr=False).param_groups()
    assert [g.get("fixed_lr", False) for g in no_fix] == [False, False]


@pytest.mark.parametrize(("name", "fixed"), [("byol", False), ("byol", True), ("simsiam", True), ("simsiam", False)])
@pytest.mark.parametrize("exclude_bias_norm", [False, True])
def test_predictor_lr_scale_multiplies_only_the_predictor_lr(name: str, fixed: bool, exclude_bias_norm: bool) -> None:
    """``pred_lr_scale``: after ``set_lr`` every predictor tensor has scale x its lr (the base lr with
    ``fix_pred_lr``, the scheduled lr without), every other tensor the scheduled lr; 1 without
    ``fix_pred_lr`` leaves BYOL's single group."""
    method = _method(name, pred_lr_scale=10.0, fix_pred_lr=fixed)
    named = named_params(method)
    opt = build_optimizer(
        method.param_groups(), named, OptimConfig(name="sgd", exclude_bias_norm=exclude_bias_norm), 0.1
    )
    set_lr(opt, lr=0.03, base_lr=0.1)
    pred_lr = 10.0 * (0.1 if fixed else 0.03)
    pred = {id(p) for p in method.predictor.parameters()}
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len([p for p in method.parameters() if p.requires_grad])
    for p in method.parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(pred_lr if id(p) in pred else 0.03), named[p]
    if name == "byol":
        assert len(_method("byol").param_groups()) == 1
        fixed_only = _method("byol", fix_pred_lr=True).param_groups()
        assert [g.get("fixed_lr", False) for g in fixed_only] == [False, True]


def _directpred_reference(batches: list[torch.Tensor], rho: float, eps: float) -> torch.Tensor:
    """DirectPred from Tian et al. 2021 §5, element by element: F <- rho F + (1 - rho) (1/N) sum_i
    f_i f_i^T, then W = sum_j p_j u_j u_j^T with p_j = sqrt(s_j) / max_k sqrt(s_k) + eps."""
    d = batches[0].shape[1]
    F = [[0.0] * d for _ in range(d)]
    for f in batches:
        rows = f.double().tolist()
        for a in range(d):
            for b in range(d):
                mean = sum(r[a] * r[b] for r in rows) / len(rows)
                F[a][b] = rho * F[a][b] + (1 - rho) * mean
    s, u = np.linalg.eigh(np.array(F))
    p = np.sqrt(np.clip(s, 0, None))
    p = p / p.max() + eps
    w = sum(p[j] * np.outer(u[:, j], u[:, j]) for j in range(d))
    return torch.from_numpy(w).float()


def test_directpred_predictor_matches_the_papers_formula() -> None:
    """``params.predictor: directpred``: the linear predictor is set from the EMA correlation of the
    online projections (both views), recomputed every ``dp_freq`` steps, and never trained."""
    method = _method("byol", predictor="directpred", dp_rho=0.3, dp_eps=0.1)
    assert isinstance(method, BYOL)
    d = method.cfg.out_dim
    torch.testing.assert_close(method.predictor.weight, torch.eye(d))  # identity until the first update
    trainable = {id(p) for g in method.param_groups() for p in g["params"]}
    assert id(method.predictor.weight) not in trainable and not method.predictor.weight.requires_grad
    g = torch.Generator().manual_seed(3)
    # anisotropic projections, as a training batch gives them: a few strong directions
    fs = [torch.randn(10, d, generator=g) * torch.linspace(2.0, 0.1, d) + 0.5 for _ in range(3)]
    for step, f in enumerate(fs):
        method.directpred_update(f, step)
        ref = _directpred_reference(fs[: step + 1], 0.3, 0.1)
        # float32 correlation against the float64 loop: 4e-5 at most, sqrt of the smallest
        # eigenvalues amplifying it; a wrong formula (no sqrt, no eps, rho swapped, no EMA) is off by >= 0.1
        torch.testing.assert_close(method.predictor.weight, ref, atol=2e-4, rtol=0)
    assert "dp_corr" in method.state_dict()  # the correlation EMA resumes with the checkpoint
    # dp_freq 2: odd steps move F but keep W
    every2 = _method("byol", predictor="directpred", dp_freq=2)
    every2.directpred_update(fs[0], 0)
    before = every2.predictor.weight.clone()
    every2.directpred_update(fs[1], 1)
    torch.testing.assert_close(every2.predictor.weight, before)
    assert not torch.equal(every2.dp_corr, _method("byol", predictor="directpred").dp_corr)
    # a training step uses it: the loss trains the encoder and projector, not the predictor
    out = method.training_step(_batch(), 3, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert method.predictor.weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.projector.parameters())


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"predictor": "directpred", "pred_lr_scale": 10.0}, r"'directpred' is not trained"),
        ({"predictor": "directpred", "fix_pred_lr": True}, r"'directpred' is not trained"),
        ({"predictor": "directpred", "dp_rho": 1.0}, r"params\.dp_rho must be in \[0, 1\)"),
        ({"predictor": "directpred", "dp_freq": 0}, r"params\.dp_freq >= 1"),
        ({"predictor": "directpred", "dp_eps": float("nan")}, r"params\.dp_eps >= 0"),
    ],
)
def test_directpred_options_are_checked(over: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _method("byol", **over)


def test_an_unknown_predictor_is_refused_from_the_recipe() -> None:
    with pytest.raises(ConfigError, match=r"params\.predictor: expected one of \['mlp', 'directpred'\], got 'linear'"):
        from_dict(BYOL.Config, {"predictor": "linear"}, "", "params")


@pytest.mark.parametrize("name", ["byol", "simsiam"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_predictor_lr_scale_must_be_positive(name: str, bad: float) -> None:
    with pytest.raises(ConfigError, match=r"params\.pred_lr_scale: .*finite number > 0"):
        _method(name, pred_lr_scale=bad)


def test_simsiam_loss_is_bounded_and_symmetric() -> None:
    method = _method("simsiam")
    out = method.training_step(_batch(), 0, torch.Generator().manual_seed(0))
    assert -1.0 <= out.loss.item() <= 1.0


@pytest.mark.parametrize("name", BASELINES)
def test_entry_recipes_validate_and_state_their_paper(name: str) -> None:
    entry = load_entry(name)
    assert entry.paper.arxiv and entry.evaluations == (
        "knn",
        "linear",
        "coco",
        "voc",
        "cityscapes",
    )  # every image evaluation
    for scale in SCALES:
        recipe = entry.recipe("default", scale)
        assert recipe.method == name
        method_config(recipe, str(entry.path))  # validates
        views = generator_config(recipe, str(entry.path))
        assert (views.views if name == "byol" else views).size == (224 if scale == "paper" else 32)
        if scale != "paper":
            assert recipe.deviations, f"{name}/{scale} states no deviations"
    paper = entry.recipe("default", "paper")
    assert paper.backbone == "resnet50" and paper.data.dataset == "imagenet"
    assert all(ref.source for ref in entry.references)


def test_method_configs_reject_unknown_keys() -> None:
    from cropbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"params.views.sise: unknown key; valid keys of ViewConfig"):
        build_generator("simclr", {"sise": 32}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"ViewConfig.jitter_p: expected a probability"):
        build_generator("byol", {"views": {"jitter_p": 2.0}}, where="x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: params.views: unknown key; valid keys of Config"):
        from_dict(METHODS.get("simclr").Config, {"views": {"size": 32}}, "x.yaml", "params")  # the generator's


def test_ema_parameters_are_excluded_from_the_default_param_groups() -> None:
    for name in ("mocov2", "byol"):
        method = _method(name)
        frozen = [p for p in method.parameters() if not p.requires_grad]
        assert frozen and not ({id(p) for p in frozen} & {id(p) for g in method.param_groups() for p in g["params"]})
        assert isinstance(method.momentum_pairs()[0][1], nn.Module)


def test_mocov2_projector_bn_spreads_the_initial_embeddings() -> None:
    """The micro recipes' ``projector_bn``: the plain MoCo v2 head maps random-init features of
    distinct images to nearly one direction; with BatchNorm (SimCLR / MoCo v3 head) they spread."""
    images = _batch(16).images.float() / 255

    def mean_cos(method: MoCoV2) -> float:
        method.train()
        with torch.no_grad():
            z = method.encode_query(images[:, :, :16, :16])
        sim = z @ z.T
        return sim[~torch.eye(len(z), dtype=torch.bool)].mean().item()

    plain, with_bn = _method("mocov2"), _method("mocov2", projector_bn=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.projector.modules())
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.projector.modules()) == 2
    assert mean_cos(plain) > 0.5 and abs(mean_cos(with_bn)) < 0.2
