"""CYBORGS: mask geometry, mask pooling and the DetCon-B loss against naive references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cropbench.backbones import resnet_micro
from cropbench.config import from_dict
from cropbench.dist import DistContext
from cropbench.errors import ConfigError, DatasetError, TrainingError
from cropbench.methods import cyborgs as cyborgs_module
from cropbench.methods.base import EpochContext, MethodContext
from cropbench.methods.cyborgs import (
    CYBORGS,
    absent_fraction,
    canvas_batches,
    checksum,
    cluster_group,
    kmeans,
)
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
)
from cropbench.runner import build_generator, method_from_params
from cropbench.views.image import crop_resize, hflip


def test_crop_masks_against_hand_computed_coordinates():
    ids = torch.arange(16 * 16).view(1, 16, 16)  # id = 16·y + x
    box = torch.tensor([[2.0, 3.0, 10.0, 11.0]])  # 8×8 canvas px -> 4×4 view: 2 px per view px
    out = crop_masks(ids, box, torch.tensor([False]), (4, 4))
    cols, rows = [3, 5, 7, 9], [4, 6, 8, 10]  # floor(x0 + (u + 0.5)·2)
    assert out[0].tolist() == [[16 * r + c for c in cols] for r in rows]
    flipped = crop_masks(ids, box, torch.tensor([True]), (4, 4))
    assert torch.equal(flipped[0], out[0].flip(-1))


def test_crop_masks_follows_the_image_views_geometry():
    """A mask made of constant blocks lands where the image view's pixels land."""
    blocks = torch.arange(8).repeat_interleave(8)[None, :] + 8 * torch.arange(8).repeat_interleave(8)[:, None]
    masks = blocks.unsqueeze(0).repeat(2, 1, 1)  # 2×64×64, 64 blocks of 8×8 px
    boxes = torch.tensor([[8.0, 16.0, 40.0, 48.0], [0.0, 8.0, 64.0, 40.0]])
    flipped = torch.tensor([True, False])
    view = hflip(crop_resize(masks.unsqueeze(1).float(), boxes, (16, 16)), flipped)[:, 0]
    m = crop_masks(masks, boxes, flipped, (16, 16))
    exact = (view - view.round()).abs() < 1e-4  # pixels whose bin lies inside one block
    assert exact.float().mean() > 0.5
    assert torch.equal(m[exact], view.round().long()[exact])


def test_masks_to_grid_is_the_majority_segment_and_keeps_ignored_cells():
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, 1:, 1] = 2  # left cells: 3 px of id 0 and 1 px of id 2 (top), 2 and 2 (bottom)
    masks[0, 3, 0] = 2  # bottom-left: 1 px of id 0, 3 px of id 2
    masks[0, :, 3] = 3
    masks[0, 0, 2] = 3
    masks[0, 2:, 2:] = -1  # bottom-right cell: ignored only
    grid = masks_to_grid(masks, (2, 2), num_segments=4)
    assert grid.tolist() == [[[0, 3], [2, -1]]]
    with pytest.raises(ValueError, match="segment ids must lie in"):
        masks_to_grid(masks + 5, (2, 2), num_segments=4)


def test_sample_segments_draws_only_present_ids_and_marks_empty_views():
    """n > num_segments: with replacement among the present ids (CYBORGS ``sample_masks``)."""
    grid = torch.tensor([[[1, 1], [4, 4]], [[-1, -1], [-1, -1]]])
    ids = sample_segments(grid, 50, num_segments=6, generator=torch.Generator().manual_seed(0))
    assert set(ids[0].tolist()) == {1, 4}
    assert ids[1].tolist() == [-1] * 50


def test_sample_segments_without_replacement_present_ids_first_then_absent_ones():
    """n <= num_segments: distinct ids, every present id before any absent one.

    renwang435/CYBORGS@5737d31:model/builder.py ``MaskPooling.sample_masks``:
    ``torch.multinomial(mask_exists + 1e-11, num_samples)`` without replacement.
    """
    grid = torch.tensor([[[1, 1], [4, 4]], [[0, 2], [3, 5]], [[-1, -1], [-1, -1]]])
    ids = sample_segments(grid, 5, num_segments=6, generator=torch.Generator().manual_seed(0))
    assert set(ids[0, :2].tolist()) == {1, 4} and len(set(ids[0].tolist())) == 5
    assert set(ids[0, 2:].tolist()) <= {0, 2, 3, 5}
    assert set(ids[1, :4].tolist()) == {0, 2, 3, 5} and ids[1, 4] in (1, 4)
    assert ids[2].tolist() == [-1] * 5


def test_sample_segments_follows_the_law_of_the_official_multinomial():
    """Each slot's id frequencies match ``torch.multinomial(present + 1e-11, n)`` (the official
    draw, renwang435/CYBORGS@5737d31:model/builder.py) within 5 binomial standard deviations."""
    n_rows, s, n = 4000, 7, 5
    grid = torch.tensor([0, 3, 3, 5]).view(1, 2, 2).expand(n_rows, 2, 2)  # present {0, 3, 5}
    ours = sample_segments(grid, n, num_segments=s, generator=torch.Generator().manual_seed(1))
    weights = torch.full((n_rows, s), 1e-11)
    weights[:, [0, 3, 5]] = 1.0
    ref = torch.multinomial(weights, n, generator=torch.Generator().manual_seed(2))
    f_ours = F.one_hot(ours, s).float().mean(0)  # n×s: frequency of each id in each slot
    f_ref = F.one_hot(ref, s).float().mean(0)
    sd = (f_ref * (1 - f_ref) * 2 / n_rows).sqrt().clamp_min(1 / n_rows)  # sd of the difference
    assert ((f_ours - f_ref).abs() <= 5 * sd).all()
    assert f_ref[:3, [1, 2, 4, 6]].sum() == 0 and (f_ref[0, [0, 3, 5]] > 0.3).all()


def test_mask_pool_against_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 2, 2, generator=g)
    grid = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 2]]])
    seg = torch.tensor([[1, 0, 5], [2, -1, 2]])
    pooled = mask_pool(feats, grid, seg)
    for b in range(2):
        for r in range(3):
            cells = [feats[b, :, y, x] for y in range(2) for x in range(2) if grid[b, y, x] == seg[b, r] >= 0]
            ref = torch.stack(cells).mean(0) if cells else torch.zeros(3)
            assert torch.allclose(pooled[b, r], ref, atol=1e-6)


def test_hypercolumn_pools_earlier_stages_to_the_last_grid():
    c3, c4, c5 = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2, 2)
    h = hypercolumn([c3, c4, c5])
    assert h.shape == (1, 9, 2, 2)
    assert torch.allclose(h[0, :2, 1, 0], c3[0, :, 4:8, 0:4].mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(h[0, 5:], c5[0])


def _official_detcon(p1, p2, t1, t2, i1, i2, j1, j2, tau, area="online"):
    """CYBORGS' DetCon-B loss written per prediction, from the formula of
    renwang435/CYBORGS@5737d31:model/losses.py ``DetConBLoss.forward`` (the same as
    deepmind/detcon@8a3c5d8:utils/losses.py ``byol_nce_detcon``), one process:

    for prediction (b, r) of view a with id q = pind_a[b, r]: logits over every target of view b
    and of view a of the batch, minus those of view a, image b, id q (``logits_aa - inf·same_obj``);
    positives = view-b targets of image b with id q, log-probabilities averaged; the term is
    weighted by [any positive] / obj_area, obj_area = #{r': pind_a[b, r'] = q}
    (``same_obj(pind1, pind1)``); each direction averages over B·R; the two directions add.
    cropbench's extension for id -1 (a view without segments): -1 targets are not logits, -1
    predictions have no positive. ``area="target"`` is the old, wrong count #{r': tind_a[b, r'] = q}.
    """
    p1, p2, t1, t2 = (F.normalize(x, dim=-1) for x in (p1, p2, t1, t2))
    b, r, _ = p1.shape
    total = p1.new_zeros(())
    for pred, pid, t_o, tid_o, t_s, tid_s in ((p1, i1, t2, j2, t1, j1), (p2, i2, t1, j1, t2, j2)):
        for bb in range(b):
            for rr in range(r):
                q = int(pid[bb, rr])
                logits, is_pos = [], []
                for u in range(b):
                    for v in range(r):
                        if tid_o[u, v] >= 0:
                            logits.append(pred[bb, rr] @ t_o[u, v] / tau)
                            is_pos.append(u == bb and int(tid_o[u, v]) == q >= 0)
                for u in range(b):
                    for v in range(r):
                        if tid_s[u, v] >= 0 and not (u == bb and int(tid_s[u, v]) == q):
                            logits.append(pred[bb, rr] @ t_s[u, v] / tau)
                            is_pos.append(False)
                logp = torch.log_softmax(torch.stack(logits), 0)
                pos = [logp[n] for n in range(len(logits)) if is_pos[n]]
                if not pos:
                    continue
                same = pid[bb] if area == "online" else tid_s[bb]
                obj_area = max(sum(int(x) == q for x in same), 1)
                total = total - torch.stack(pos).mean() / obj_area
    return total / (b * r)


def _detcon_inputs(seed, b, r, d, k, dtype=torch.float64):
    """Seeded predictions/targets and four INDEPENDENT id maps in [0, k) (repeats included)."""
    g = torch.Generator().manual_seed(seed)
    vecs = [torch.randn(b, r, d, generator=g, dtype=dtype) for _ in range(4)]
    ids = [torch.randint(0, k, (b, r), generator=g) for _ in range(4)]
    return vecs, ids


def _both(vecs, ids, tau=0.1):
    """(loss, grads w.r.t. pred1, pred2) of cropbench's detcon_loss and of the naive loop."""
    out = []
    for fn in (detcon_loss, _official_detcon):
        p1, p2 = (v.clone().requires_grad_() for v in vecs[:2])
        loss = fn(p1, p2, *vecs[2:], *ids, tau)
        out.append((loss, *torch.autograd.grad(loss, (p1, p2))))
    return out


# float32 (ours) against float64 (the loop), measured over 80 seeded cases of these shapes:
# |Δloss| <= 9.0e-7, |Δgrad| <= 1.05e-7; the tolerances leave 10x
LOSS_TOL, GRAD_TOL = 1e-5, 1e-6
REFERENCE_CASES = ((0, 5, 6, 4), (1, 3, 4, 3), (2, 7, 3, 9))  # seed, B, R, ids in [0, k)


def _reference_case(seed, b, r, k):
    vecs, ids = _detcon_inputs(seed, b, r, 8, k)
    ids[1][1] = -1  # image 1 has no segment in view 2: online and target
    ids[3][1] = -1
    return vecs, ids


def test_detcon_loss_matches_the_official_formula_with_independent_ids():
    """Loss and gradients equal the naive transcription of CYBORGS ``DetConBLoss``
    (renwang435/CYBORGS@5737d31:model/losses.py) for independent online/target ids, an odd batch,
    repeated ids, ids present in one view only (no positive) and a view without segments (-1)."""
    for case in REFERENCE_CASES:
        vecs, ids = _reference_case(*case)
        (ours, g1, g2), (ref, r1, r2) = _both(vecs, ids)
        assert abs(ours.item() - ref.item()) < LOSS_TOL, (case, ours.item(), ref.item())
        assert (g1 - r1).abs().max() < GRAD_TOL and (g2 - r2).abs().max() < GRAD_TOL
        assert r2[1].abs().max() == 0  # the empty view's predictions get no gradient


def test_detcon_loss_matches_the_official_formula_on_sampled_ids_with_absent_segments():
    """Ids from ``sample_segments`` (online and target drawn independently, <= 3 present ids, so
    slots 3-5 (0-based) carry absent ids, which pool to zero vectors): equal to the naive loop."""
    g = torch.Generator().manual_seed(3)
    grids = [torch.randint(0, 3, (5, 2, 2), generator=g) * 2 for _ in range(2)]  # ids {0, 2, 4}
    ids = [sample_segments(grids[v % 2], 6, 8, g) for v in range(4)]  # pid1, pid2, tid1, tid2
    assert (ids[0] != ids[2]).any() and all(len(set(i[0].tolist())) == 6 for i in ids)
    feats = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    pooled = mask_pool(feats, grids[0], ids[0])
    absent = (ids[0].unsqueeze(2) != grids[0].flatten(1).unsqueeze(1)).all(2)  # B×R
    assert absent[:, 3:].all() and absent.sum() > 15
    assert (pooled[absent] == 0).all() and (pooled[~absent] != 0).all()
    vecs = [torch.randn(5, 6, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    w, bias = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    vecs[0] = pooled @ w + bias  # a linear head: every absent slot predicts the same vector
    (ours, g1, g2), (ref, r1, r2) = _both(vecs, ids)
    assert abs(ours.item() - ref.item()) < LOSS_TOL
    assert (g1 - r1).abs().max() < GRAD_TOL and (g2 - r2).abs().max() < GRAD_TOL


def test_the_old_target_count_weighting_fails_the_reference():
    """The audit's case (B=4, R=6, d=8, ids in [0, 3), independent): the official weighting gives
    6.30, the old one (dividing by the *target* same-view count) 9.49. On every reference case a
    loss with the old weighting misses the reference by far more than the tolerance."""
    vecs, ids = _detcon_inputs(0, 4, 6, 8, 3, dtype=torch.float32)
    ours = detcon_loss(*vecs, *ids, 0.1).item()
    old = _official_detcon(*vecs, *ids, 0.1, area="target").item()
    assert abs(ours - 6.30) < 0.005 and abs(old - 9.49) < 0.005
    for case in REFERENCE_CASES:
        vecs, ids = _reference_case(*case)
        ref = _official_detcon(*vecs, *ids, 0.1).item()
        old = _official_detcon(*vecs, *ids, 0.1, area="target").item()
        assert abs(old - ref) > 1e3 * LOSS_TOL, case  # measured: >= 0.017


# ------------------------------------------------------------------ k-means and mask files


def test_kmeans_matches_sklearn_lloyd_from_the_same_initial_centroids():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(5)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0], [6.0, 0.0]])
    x = (centres.repeat_interleave(30, 0) + torch.randn(120, 2, generator=g)).double()
    labels, cent = kmeans(x, 4, 10, torch.Generator().manual_seed(1))
    init = x[torch.randperm(120, generator=torch.Generator().manual_seed(1))[:4]].numpy()
    ref = KMeans(4, init=init, n_init=1, max_iter=10, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert labels.tolist() == ref.labels_.tolist()
    assert torch.allclose(cent, torch.from_numpy(ref.cluster_centers_), atol=1e-6)


def test_cluster_group_shares_ids_across_the_group_and_caps_k():
    feats = torch.zeros(2, 2, 2, 2)
    feats[:, 0, :, 0] = 1.0  # left column of both images: direction (1, 0)
    feats[:, 1, :, 1] = 1.0  # right column: direction (0, 1)
    labels = cluster_group(feats, (2, 2), 5, torch.Generator().manual_seed(0))
    assert labels.shape == (2, 2, 2)
    assert torch.equal(labels[0], labels[1])  # one clustering for the whole group
    assert labels[0, 0, 0] != labels[0, 0, 1]
    capped = cluster_group(torch.randn(1, 3, 1, 2), (5, 9), 3, torch.Generator().manual_seed(0))
    assert capped.max() <= 1  # K capped at h·w = 2


class _Canvases(torch.utils.data.Dataset):
    def __init__(self, n: int = 6, size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i % 2, i


def test_masked_images_rejects_mask_files_that_do_not_match_their_images(tmp_path):
    ds = _Canvases()
    sums = torch.cat([checksum(b) for b in canvas_batches(ds)])
    data = MaskedImages(ds, sums, 16)
    good = MaskFile(torch.zeros(6, 4, 4, dtype=torch.int16), sums)
    data.set_masks(good, tmp_path / "good.pt")
    img, _, _, mask = data[3]
    assert mask.shape == (16, 16) and torch.equal(img, ds.images[3])
    with pytest.raises(DatasetError, match="expected 6×h×w"):
        data.set_masks(MaskFile(torch.zeros(5, 4, 4, dtype=torch.int16), sums[:5]), tmp_path / "a.pt")
    with pytest.raises(DatasetError, match="does not divide"):
        data.set_masks(MaskFile(torch.zeros(6, 5, 5, dtype=torch.int16), sums), tmp_path / "b.pt")
    other = torch.cat([checksum(b) for b in canvas_batches(_Canvases(seed=1))])
    with pytest.raises(DatasetError, match="mask 0 .* another image than training sample 0"):
        data.set_masks(MaskFile(torch.zeros(6, 4, 4, dtype=torch.int16), other), tmp_path / "c.pt")
    (tmp_path / "junk.pt").write_text("not a tensor file")
    with pytest.raises(DatasetError, match="not a cropbench mask file"):
        MaskFile.load(tmp_path / "junk.pt")


def test_masked_images_upsample_masks_to_the_canvas_nearest():
    ds = _Canvases(n=2, size=8)
    sums = torch.cat([checksum(b) for b in canvas_batches(ds)])
    data = MaskedImages(ds, sums, 8)
    data.set_masks(MaskFile(torch.tensor([[[0, 1], [2, 3]]] * 2, dtype=torch.int16), sums), Path("m"))
    batch = MaskedImages.collate([data[0], data[1]])
    assert batch.masks.shape == (2, 8, 8)
    assert batch.masks[0, :4, :4].unique().tolist() == [0] and batch.masks[0, 4:, 4:].unique().tolist() == [3]


# ------------------------------------------------------------------ the CYBORGS method


def _cyborgs(num_workers: int = 0, **masks) -> CYBORGS:
    params = {
        "views": {"views": {"size": 32, "blur_p": 0.0}, "blur_p": [0.0, 0.0]},
        "hidden_dim": 32,
        "out_dim": 8,
        "n_sampled": 4,
        "num_segments": 8,
        "masks": {"k_range": [2, 4], "stage": 2, "round0_grid": 8, "group_size": 4, "iters": 5, **masks},
    }
    torch.manual_seed(0)
    return method_from_params("cyborgs", params, resnet_micro(widths=(8, 8, 8, 16)), MethodContext(num_workers))


def test_cyborgs_rejects_bad_sampling_settings():
    base = {"hidden_dim": 8, "out_dim": 4, "num_segments": 8, "masks": {"k_range": [2, 4]}}
    for bad, field in (({"n_sampled": 0}, "n_sampled=0"), ({"temperature": 0.0}, "temperature=0.0")):
        cfg = from_dict(CYBORGS.Config, {**base, **bad})
        with pytest.raises(ConfigError, match=f"params.n_sampled must be >= 1.*{field}"):
            CYBORGS(cfg, resnet_micro(widths=(8, 8, 8, 16)), MethodContext(), build_generator("cyborgs"))


def test_cyborgs_refuses_byols_directpred_predictor():
    """CYBORGS applies BYOL's trained MLP predictor per segment; DirectPred's set predictor is BYOL's only."""
    cfg = from_dict(CYBORGS.Config, {"hidden_dim": 8, "out_dim": 4, "num_segments": 8, "predictor": "directpred"})
    with pytest.raises(ConfigError, match="params.predictor: CYBORGS trains BYOL's MLP predictor, got 'directpred'"):
        CYBORGS(cfg, resnet_micro(widths=(8, 8, 8, 16)), MethodContext(), build_generator("cyborgs"))


def _in_features(head: torch.nn.Module) -> int:
    return next(mod for mod in head.modules() if isinstance(mod, torch.nn.Linear)).in_features


def _epoch(epoch: int, run_dir: Path) -> EpochContext:
    return EpochContext(epoch, torch.device("cpu"), 0, run_dir, DistContext())


def test_cyborgs_step_carries_masks_through_the_views_and_trains(tmp_path):
    m, ds = _cyborgs(), _Canvases(n=8, size=64)
    data = m.prepare_dataset(ds, tmp_path)
    assert (tmp_path / "masks" / "round_000.pt").exists()
    batch = MaskedImages.collate([data[i] for i in range(8)])
    views = m.make_views(batch, torch.Generator().manual_seed(0))
    for v in views:  # each view's segment map is the canvas mask under the same crop and flip
        assert torch.equal(v.prov.extra["mask"], crop_masks(batch.masks, v.prov.boxes, v.prov.flipped, (32, 32)))
    out = m.training_step(batch, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.logs["segments_per_view"] >= 1
    assert torch.equal(out.logs["loss_detcon"], out.loss.detach())  # the trainer sums up loss_*
    assert 0 <= float(out.logs["absent_sampled"]) <= 1
    out.loss.backward()
    assert m.backbone.conv1.weight.grad is not None and m.target_backbone.conv1.weight.grad is None


def test_cyborgs_errors_without_masks_or_without_any_segment(tmp_path):
    m, ds = _cyborgs(), _Canvases(n=4, size=64)
    batch = MaskedImages.collate([(*ds[i], torch.full((64, 64), -1)) for i in range(4)])
    with pytest.raises(TrainingError, match="no view of this batch has a valid segment"):
        m.training_step(batch, 0, torch.Generator().manual_seed(0))
    batch.masks = None
    with pytest.raises(TrainingError, match="carries no masks"):
        m.training_step(batch, 0, torch.Generator().manual_seed(0))


def test_masks_are_bootstrapped_every_n_epochs_and_reloaded_on_resume(tmp_path):
    m, ds = _cyborgs(bootstrap_every=2), _Canvases(n=8, size=64)
    data = m.prepare_dataset(ds, tmp_path)
    round0 = data.masks.clone()
    for epoch in (0, 1):
        m.on_epoch_start(_epoch(epoch, tmp_path))
        assert m.mask_round == 0 and torch.equal(data.masks, round0)
    m.on_epoch_start(_epoch(2, tmp_path))
    r1 = tmp_path / "masks" / "round_001.pt"
    assert m.mask_round == 1 and r1.exists() and data.source == str(r1)
    assert data.masks.shape == (8, 16, 16)  # clustered on C4 (stride 4) of the 64-px canvases
    assert not torch.equal(data.masks, round0)
    stamp = r1.stat().st_mtime_ns
    resumed = _cyborgs(bootstrap_every=2)
    resumed.prepare_dataset(ds, tmp_path)
    resumed.on_epoch_start(_epoch(3, tmp_path))  # resume mid-round: read the file, no recompute
    assert resumed.mask_round == 1 and torch.equal(resumed.data.masks, data.masks)
    assert r1.stat().st_mtime_ns == stamp


def _masks_one_image_at_a_time(dataset, features, k_range, group, iters, generator) -> torch.Tensor:
    """The mask pass before issue 14: canvases decoded one at a time in this process, in index
    order, 16 groups per batch, each group clustered jointly (the reference for the workers)."""
    out, step = [], 16 * group
    for start in range(0, len(dataset), step):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + step, len(dataset)))])
        feats = features(images)
        for g0 in range(0, feats.shape[0], group):
            out.append(cluster_group(feats[g0 : g0 + group], k_range, iters, generator))
    return torch.cat(out).to(torch.int16)


def test_masks_decoded_by_dataloader_workers_equal_the_one_at_a_time_pass():
    ds = _Canvases(n=37, size=16)  # 37 images, groups of 2: a last partial batch and a group of one

    def features(images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float() / 255, 4)

    def run(fn, *extra):  # noqa: ANN001, ANN202
        return fn(ds, features, (2, 5), 2, 5, torch.Generator().manual_seed(3), *extra)

    old = run(_masks_one_image_at_a_time)
    for workers in (0, 2):
        assert torch.equal(run(cyborgs_module.compute_masks, torch.device("cpu"), workers), old)
    assert len(old.unique()) > 2  # real clusterings, not a constant


class _OnlyInWorkers(_Canvases):
    """Refuses to decode in the process that built it: proves the decoding ran in workers."""

    def __init__(self) -> None:
        super().__init__(n=10, size=8)
        self.parent = os.getpid()

    def __getitem__(self, i: int):
        if os.getpid() == self.parent:
            raise RuntimeError("decoded in the main process")
        return super().__getitem__(i)


def test_canvas_batches_decode_in_workers_in_index_order():
    ds = _OnlyInWorkers()
    batches = list(canvas_batches(ds, 4, num_workers=2))
    assert [len(b) for b in batches] == [4, 4, 2] and torch.equal(torch.cat(batches), ds.images)
    with pytest.raises(RuntimeError, match="decoded in the main process"):
        list(canvas_batches(ds, 4, num_workers=0))


def test_cyborgs_rounds_are_the_same_with_decode_workers(tmp_path):
    """Round 0 (colour k-means) and round 1 (backbone features) with data.num_workers 0 and 2:
    the same mask files, written atomically (no temporary file left beside them)."""
    ds, files = _Canvases(n=8, size=64), {}
    for workers in (0, 2):
        run_dir = tmp_path / f"workers{workers}"
        m = _cyborgs(num_workers=workers, bootstrap_every=1)
        m.prepare_dataset(ds, run_dir)
        m.on_epoch_start(_epoch(1, run_dir))
        assert sorted(p.name for p in (run_dir / "masks").iterdir()) == ["round_000.pt", "round_001.pt"]
        files[workers] = [MaskFile.load(run_dir / "masks" / f"round_00{r}.pt") for r in (0, 1)]
    for a, b in zip(files[0], files[2], strict=True):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.checksums, b.checksums)
    assert not torch.equal(files[0][0].masks, files[0][1].masks)


def test_an_initial_mask_file_with_ids_out_of_range_is_rejected(tmp_path):
    ds = _Canvases(n=4, size=64)
    sums = torch.cat([checksum(b) for b in canvas_batches(ds)])
    MaskFile(torch.full((4, 8, 8), 9, dtype=torch.int16), sums).save(tmp_path / "init.pt")
    m = _cyborgs(init_file=str(tmp_path / "init.pt"))
    with pytest.raises(DatasetError, match=r"segment ids span \[9, 9\], expected \[-1, 8\)"):
        m.prepare_dataset(ds, tmp_path / "run")


def test_absent_fraction_counts_sampled_ids_missing_from_their_view():
    present = [torch.tensor([[True, False, True], [False, False, False]])]
    ids = [torch.tensor([[0, 1, 2], [-1, -1, -1]])]
    assert float(absent_fraction(present, ids)) == pytest.approx(1 / 3)


def test_heads_normalise_each_sample_slot_over_the_batch_only():
    """renwang435/CYBORGS@5737d31:model/builder.py ``MLP.forward``: ``rearrange(x, 'b m c -> m b c')``
    then ``net(t)`` per slot, so BatchNorm sees one slot's B vectors at a time: a slot's output does
    not depend on the other slots' inputs (it would with BatchNorm over all B·R vectors)."""
    m = _cyborgs()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, _in_features(m.projector), generator=g)
    out = per_slot(m.projector, x)
    official = torch.stack([m.projector(t) for t in x.permute(1, 0, 2)]).permute(1, 0, 2)
    assert torch.equal(out, official)
    y = x.clone()
    y[:, 1:] = 5 * y[:, 1:] + 3  # other slots change, slot 0 does not
    assert torch.allclose(per_slot(m.projector, y)[:, 0], out[:, 0], atol=1e-6)
    pooled_bn = m.projector(y.flatten(0, 1)).view(6, 3, -1)[:, 0]  # the old B·R statistics
    assert (pooled_bn - out[:, 0]).abs().max() > 0.1


def test_cyborgs_embeds_each_slot_with_its_own_batch_statistics(tmp_path):
    m, ds = _cyborgs(), _Canvases(n=8, size=64)
    data = m.prepare_dataset(ds, tmp_path)
    batch = MaskedImages.collate([data[i] for i in range(8)])
    view = m.make_views(batch, torch.Generator().manual_seed(0))[0]
    grid = m.segment_grid(view)
    ids = sample_segments(grid, 4, 8, torch.Generator().manual_seed(0))
    other = ids.clone()
    other[:, 1:] = other[:, 1:].roll(1, dims=0)  # slots 1-3 change, slot 0 does not
    assert (other != ids).any()
    for online in (True, False):
        a, b = (m.embed(view, grid, i, online) for i in (ids, other))
        assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5) and not torch.allclose(a, b, atol=1e-3)


def test_cyborgs_loss_changes_when_mask_pooling_is_replaced_by_global_pooling(tmp_path, monkeypatch):
    """Mechanism off: every sampled segment vector replaced by the view's global average (what
    BYOL-style image-level pooling sees). The step is deterministic given its generator, so any
    change of the loss comes from the pooling alone."""
    m, ds = _cyborgs(), _Canvases(n=8, size=64)
    data = m.prepare_dataset(ds, tmp_path)
    batch = MaskedImages.collate([data[i] for i in range(8)])

    def loss() -> float:
        return m.training_step(batch, 0, torch.Generator().manual_seed(0)).loss.item()

    with_masks = loss()
    assert loss() == with_masks  # deterministic: the noise floor is zero

    def global_pool(features, grid_ids, seg_ids):
        return features.mean(dim=(2, 3)).unsqueeze(1).expand(-1, seg_ids.shape[1], -1)

    monkeypatch.setattr(cyborgs_module, "mask_pool", global_pool)
    without = loss()
    assert abs(without - with_masks) > 0.05, (with_masks, without)
