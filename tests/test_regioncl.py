"""RegionCL: region swap views, region pooling and region losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_dense import naive_infonce, tiny_batch, tiny_method

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


def test_region_boxes_are_grid_aligned_inside_the_view_and_cover_the_size_range():
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(200):
        x0, y0, x1, y1 = sample_region_box((32, 32), 8, (1, 3), g).tolist()
        assert all(v % 8 == 0 for v in (x0, y0, x1, y1))
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        sizes.add((x1 - x0, y1 - y0))
    assert sizes == {(8, 8), (8, 16), (16, 8), (16, 16)}  # widths and heights drawn independently


def test_region_box_that_cannot_fit_is_an_error():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="cannot fit"):
        sample_region_box((32, 32), 8, (2, 5), g)  # a 4-cell box leaves no canvas in a 4-cell view
    with pytest.raises(ValueError, match="multiple of the output stride"):
        sample_region_box((30, 32), 8, (1, 2), g)


def test_partners_reverse_even_batches_and_never_map_an_image_to_itself():
    assert partner_permutation(4).tolist() == [3, 2, 1, 0]
    odd = partner_permutation(5)
    assert sorted(odd.tolist()) == list(range(5)) and all(odd[i] != i for i in range(5))
    with pytest.raises(ValueError, match="batch of >= 2"):
        partner_permutation(1)


def test_swap_regions_against_hand_computed_pixels():
    imgs = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 2.0)])
    comp = swap_regions(imgs, torch.tensor([1, 0, 3, 2]), torch.tensor([1, 0]))
    expected0 = torch.ones(4, 4)
    expected0[0:2, 1:3] = 2
    assert torch.equal(comp[0, 0], expected0)
    assert torch.equal(comp[1, 0], 3 - expected0)
    assert torch.equal(imgs[0, 0], torch.ones(4, 4))  # the input is not modified


def test_region_pool_is_the_mean_inside_and_outside_the_box():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(2, 3, 4, 4, generator=g)
    box = box_to_cells(torch.tensor([8, 0, 24, 16]), 8)
    assert box.tolist() == [1, 0, 3, 2]
    canvas, paste = region_pool(fmap, box)
    for b in range(2):
        inside = [fmap[b, :, y, x] for y in range(4) for x in range(4) if 1 <= x < 3 and y < 2]
        outside = [fmap[b, :, y, x] for y in range(4) for x in range(4) if not (1 <= x < 3 and y < 2)]
        assert torch.allclose(paste[b], torch.stack(inside).mean(0), atol=1e-6)
        assert torch.allclose(canvas[b], torch.stack(outside).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="canvas would be empty"):
        region_pool(fmap, torch.tensor([0, 0, 4, 4]))
    with pytest.raises(ValueError, match="not aligned"):
        box_to_cells(torch.tensor([4, 0, 24, 16]), 8)


def _naive_region_loss(canvas, paste, keys, queue, partner, tau):
    """Each region: positive = key of its source image, negatives = other region of its composite
    and the queue; cross-entropy averaged over the 2B regions (RegionCL-M)."""
    b = canvas.shape[0]
    terms = []
    for i in range(b):  # canvas of composite i comes from image i
        logits = [canvas[i] @ keys[i], canvas[i] @ paste[i].detach()] + [canvas[i] @ n for n in queue]
        terms.append(-F.log_softmax(torch.stack(logits) / tau, 0)[0])
    for j in range(b):  # the region cut from image j sits in the composite c with partner[c] == j
        c = [c for c in range(b) if partner[c] == j][0]
        logits = [paste[c] @ keys[j], paste[c] @ canvas[c].detach()] + [paste[c] @ n for n in queue]
        terms.append(-F.log_softmax(torch.stack(logits) / tau, 0)[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("batch", [4, 5])
def test_region_infonce_matches_the_naive_loss_and_its_gradients(batch):
    g = torch.Generator().manual_seed(2)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    canvas, paste = unit(batch, 8).requires_grad_(), unit(batch, 8).requires_grad_()
    keys, queue, partner = unit(batch, 8), unit(6, 8), partner_permutation(batch)
    loss = region_infonce(canvas, paste, keys, queue, partner, 0.2)
    gc, gp = torch.autograd.grad(loss, (canvas, paste))
    ref = _naive_region_loss(canvas, paste, keys, queue, partner, 0.2)
    rc, rp = torch.autograd.grad(ref, (canvas, paste))
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(gc, rc, atol=1e-6) and torch.allclose(gp, rp, atol=1e-6)


def test_region_regression_pairs_each_region_with_its_source():
    g = torch.Generator().manual_seed(3)
    pc, pp, t = (torch.randn(4, 5, generator=g) for _ in range(3))
    partner = partner_permutation(4)
    ref = 0.0
    for i in range(4):
        ref += F.cosine_similarity(pc[i], t[i], dim=0).item() / 4
        ref += F.cosine_similarity(pp[i], t[partner[i]], dim=0).item() / 4
    assert math.isclose(region_regression(pc, pp, t, partner).item(), -0.5 * ref, abs_tol=1e-6)


def test_view_box_maps_back_to_canvas_coordinates_with_and_without_flip():
    crop = torch.tensor([[10.0, 20.0, 42.0, 36.0], [10.0, 20.0, 42.0, 36.0]])  # 32×16 canvas px
    flipped = torch.tensor([False, True])
    out = view_box_to_canvas(torch.tensor([8, 0, 16, 8]), crop, flipped, (32, 32))
    # x scale 32/32 = 1, y scale 16/32 = 0.5
    assert out[0].tolist() == [18.0, 20.0, 26.0, 24.0]
    # flipped: view columns [8, 16) show box columns [32-16, 32-8) = [16, 24)
    assert out[1].tolist() == [26.0, 20.0, 34.0, 24.0]


# ------------------------------------------------------------------ the RegionCL methods


def _naive_pool(c5: torch.Tensor, box_cells: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x0, y0, x1, y1 = box_cells
    h, w = c5.shape[2:]
    inside = [(y, x) for y in range(h) for x in range(w) if x0 <= x < x1 and y0 <= y < y1]
    outside = [(y, x) for y in range(h) for x in range(w) if (y, x) not in inside]
    mean = lambda cells: torch.stack([c5[:, :, y, x] for y, x in cells]).mean(0)  # noqa: E731
    return mean(outside), mean(inside)


def test_composite_view_swaps_the_region_with_the_partner_and_records_provenance():
    m, batch = tiny_method("regioncl_m", cells=[1, 3]), tiny_batch(n=4)
    v_q, v_k, mix = m.make_views(batch, torch.Generator().manual_seed(1))
    x0, y0, x1, y1 = mix.prov.extra["region_box"][0].tolist()
    assert all(v % 8 == 0 for v in (x0, y0, x1, y1))  # grid-aligned: resnet_micro stride 8
    partner = mix.prov.extra["partner"].tolist()
    assert partner == [3, 2, 1, 0]
    for i in range(4):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(mix.tensor[i][:, inside], v_q.tensor[partner[i]][:, inside])
        assert torch.equal(mix.tensor[i][:, ~inside], v_q.tensor[i][:, ~inside])
    assert torch.equal(mix.prov.boxes, v_q.prov.boxes)  # the composite is cut like view 1
    hole = mix.prov.extra["region_canvas_box"]
    assert torch.equal(mix.prov.extra["paste_source_box"], hole[torch.tensor(partner)])


@pytest.mark.parametrize("n", [4, 5])
@torch.no_grad()
def test_regioncl_m_step_is_instance_plus_region_infonce(n):
    m, batch = tiny_method("regioncl_m", cells=[1, 3]), tiny_batch(n=n)
    v_q, v_k, mix = m.make_views(batch, torch.Generator().manual_seed(2))
    tau, queue = m.cfg.temperature, m.queue.keys.clone()
    q = F.normalize(m.projector(m.backbone(v_q.tensor)), dim=1)
    k = F.normalize(m.key_projector(m.key_backbone(v_k.tensor)), dim=1)
    c5 = m.backbone.forward_stages(mix.tensor)[-1]
    canvas, paste = _naive_pool(c5, (mix.prov.extra["region_box"][0] // 8).tolist())
    c, p = F.normalize(m.projector(torch.cat([canvas, paste])), dim=1).chunk(2)
    region = _naive_region_loss(c, p, k, queue, mix.prov.extra["partner"], tau)
    instance = naive_infonce(q, k, queue, tau)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(2))
    assert abs(out.loss.item() - (instance + region.item())) < 1e-4
    assert abs(out.logs["loss_region"].item() - region.item()) < 1e-4
    assert int(m.queue.ptr) == n  # only the clean keys are enqueued
    assert torch.allclose(m.queue.keys[:n], k, atol=1e-5)


@torch.no_grad()
def test_regioncl_s_step_is_simsiam_plus_region_regression():
    m = tiny_method("regioncl_s", dim=16, pred_dim=8, cells=[1, 3])
    batch = tiny_batch(n=4)
    v1, v2, mix = m.make_views(batch, torch.Generator().manual_seed(4))
    z1, z2 = m.projector(m.backbone(v1.tensor)), m.projector(m.backbone(v2.tensor))
    p1, p2 = m.predictor(z1), m.predictor(z2)
    cos = lambda a, b: F.cosine_similarity(a, b, dim=1).mean().item()  # noqa: E731
    simsiam = -0.5 * (cos(p1, z2) + cos(p2, z1))
    canvas, paste = _naive_pool(
        m.backbone.forward_stages(mix.tensor)[-1], (mix.prov.extra["region_box"][0] // 8).tolist()
    )
    pc, pp = m.predictor(m.projector(torch.cat([canvas, paste]))).chunk(2)
    partner = mix.prov.extra["partner"]
    src = torch.argsort(partner)  # row j of pp[src] is the region cut from image j
    region = -0.5 * (cos(pc, z2) + cos(pp[src], z2))
    out = m.training_step(batch, 0, torch.Generator().manual_seed(4))
    assert abs(out.loss.item() - (simsiam + region)) < 1e-4


def test_regioncl_d_adds_the_region_term_to_densecl():
    m = tiny_method("regioncl_d", cells=[1, 3])
    out = m.training_step(tiny_batch(n=4), 0, torch.Generator().manual_seed(6))
    lg = {k: float(v) for k, v in out.logs.items()}
    expected = 0.5 * lg["loss_global"] + 0.5 * lg["loss_dense"] + lg["loss_region"]
    assert abs(out.loss.item() - expected) < 1e-4
    assert int(m.dense.queue.ptr) == 4


def test_regioncl_rejects_a_batch_too_small_to_swap():
    m = tiny_method("regioncl_m", cells=[1, 3])
    with pytest.raises(ValueError, match="need a batch of >= 2"):
        m.training_step(tiny_batch(n=1), 0, torch.Generator().manual_seed(0))
