"""RegionCL: region swap views, region pooling and region losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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
        outside = [
            fmap[b, :, y, x] for y in range(4) for x in range(4) if not (1 <= x < 3 and y < 2)
        ]
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
        logits = [canvas[i] @ keys[i], canvas[i] @ paste[i].detach()] + [
            canvas[i] @ n for n in queue
        ]
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
