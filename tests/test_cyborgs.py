"""CYBORGS: mask geometry, mask pooling and the DetCon-B loss against naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cropbench.methods.mask_pool import (
    crop_masks,
    detcon_loss,
    hypercolumn,
    mask_pool,
    masks_to_grid,
    sample_segments,
)
from cropbench.methods.views import crop_resize, hflip


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
    blocks = (
        torch.arange(8).repeat_interleave(8)[None, :]
        + 8 * torch.arange(8).repeat_interleave(8)[:, None]
    )
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
    grid = torch.tensor([[[1, 1], [4, 4]], [[-1, -1], [-1, -1]]])
    ids = sample_segments(grid, 50, num_segments=6, generator=torch.Generator().manual_seed(0))
    assert set(ids[0].tolist()) == {1, 4}
    assert ids[1].tolist() == [-1] * 50


def test_mask_pool_against_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 2, 2, generator=g)
    grid = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 2]]])
    seg = torch.tensor([[1, 0, 5], [2, -1, 2]])
    pooled = mask_pool(feats, grid, seg)
    for b in range(2):
        for r in range(3):
            cells = [
                feats[b, :, y, x]
                for y in range(2)
                for x in range(2)
                if grid[b, y, x] == seg[b, r] >= 0
            ]
            ref = torch.stack(cells).mean(0) if cells else torch.zeros(3)
            assert torch.allclose(pooled[b, r], ref, atol=1e-6)


def test_hypercolumn_pools_earlier_stages_to_the_last_grid():
    c3, c4, c5 = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 4, 2, 2)
    h = hypercolumn([c3, c4, c5])
    assert h.shape == (1, 9, 2, 2)
    assert torch.allclose(h[0, :2, 1, 0], c3[0, :, 4:8, 0:4].mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(h[0, 5:], c5[0])


def _naive_detcon(p1, p2, t1, t2, i1, i2, j1, j2, tau):
    """DetCon-B written per prediction: positives = other view, same image, same id (mean of the
    log-probabilities over them); same-view same-image same-id targets and id -1 targets removed;
    weight = [has positive] / (count of that id among the same view's samples of the image)."""
    p1, p2, t1, t2 = (F.normalize(x, dim=-1) for x in (p1, p2, t1, t2))
    b, r, _ = p1.shape
    total = 0.0
    for pred, pid, t_o, tid_o, t_s, tid_s in ((p1, i1, t2, j2, t1, j1), (p2, i2, t1, j1, t2, j2)):
        for bb in range(b):
            for rr in range(r):
                logits, is_pos = [], []
                for u in range(b):
                    for v in range(r):
                        if tid_o[u, v] >= 0:
                            logits.append(pred[bb, rr] @ t_o[u, v] / tau)
                            is_pos.append(u == bb and tid_o[u, v] == pid[bb, rr] >= 0)
                for u in range(b):
                    for v in range(r):
                        if tid_s[u, v] >= 0 and not (u == bb and tid_s[u, v] == pid[bb, rr]):
                            logits.append(pred[bb, rr] @ t_s[u, v] / tau)
                            is_pos.append(False)
                logp = F.log_softmax(torch.stack(logits), 0)
                pos = [logp[n] for n in range(len(logits)) if is_pos[n]]
                if not pos or pid[bb, rr] < 0:
                    continue
                mult = sum(int(tid_s[bb, v] == pid[bb, rr]) for v in range(r))
                total += -torch.stack(pos).mean().item() / max(mult, 1)
    return total / (b * r)


def test_detcon_loss_matches_the_naive_per_prediction_loss():
    g = torch.Generator().manual_seed(4)
    b, r, d = 3, 4, 6
    p1, p2, t1, t2 = (torch.randn(b, r, d, generator=g) for _ in range(4))
    i1, i2 = torch.randint(0, 3, (b, r), generator=g), torch.randint(0, 3, (b, r), generator=g)
    j1, j2 = i1.clone(), torch.randint(0, 3, (b, r), generator=g)
    i2[2] = -1  # a view without segments: zero weight, excluded from the negatives
    j2[2] = -1
    loss = detcon_loss(p1, p2, t1, t2, i1, i2, j1, j2, temperature=0.1)
    ref = _naive_detcon(p1, p2, t1, t2, i1, i2, j1, j2, 0.1)
    assert abs(loss.item() - ref) < 1e-4
