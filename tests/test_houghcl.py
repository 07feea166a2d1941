"""HoughCL: Hough-voted matching against a naive loop, and the paper's point on controlled pairs."""

from __future__ import annotations

from collections import defaultdict

import torch

from cropbench.methods.dense import hough_match
from cropbench.methods.houghcl import compare_matchers, match_accuracy, synthetic_shift_pairs


def _naive_hough(fq: torch.Tensor, fk: torch.Tensor, topk: int = 0) -> list[int]:
    """One pair, written from the definition: votes per offset, confidence = sim × votes(offset)."""
    c, hq, wq = fq.shape
    _, hk, wk = fk.shape
    cells_q = [(y, x) for y in range(hq) for x in range(wq)]
    cells_k = [(y, x) for y in range(hk) for x in range(wk)]
    sim = [
        [
            float(torch.nn.functional.cosine_similarity(fq[:, a, b], fk[:, y, x], dim=0))
            for (y, x) in cells_k
        ]
        for (a, b) in cells_q
    ]
    votes: dict[tuple[int, int], float] = defaultdict(float)
    for i, (a, b) in enumerate(cells_q):
        ranked = sorted(range(len(cells_k)), key=lambda j: -sim[i][j])
        allowed = set(ranked[:topk]) if topk else set(ranked)
        for j, (y, x) in enumerate(cells_k):
            if j in allowed:
                votes[(y - a, x - b)] += max(sim[i][j], 0.0)
    out = []
    for i, (a, b) in enumerate(cells_q):
        conf = [sim[i][j] * votes[(y - a, x - b)] for j, (y, x) in enumerate(cells_k)]
        out.append(max(range(len(cells_k)), key=conf.__getitem__))
    return out


def test_hough_match_equals_naive_voting():
    g = torch.Generator().manual_seed(3)
    fq, fk = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    for topk in (0, 4):
        idx, conf = hough_match(fq, fk, topk=topk)
        for b in range(2):
            assert idx[b].tolist() == _naive_hough(fq[b], fk[b], topk)
        assert conf.shape == (2, 9) and bool((conf <= 1 + 1e-6).all())


def test_synthetic_pairs_truth_is_consistent_with_the_shift():
    p = synthetic_shift_pairs(4, size=5, dim=8, clutter=0.0, outliers=0.0, noise=0.0)
    for b in range(4):
        dy, dx = p.shift[b].tolist()
        for i, j in enumerate(p.truth[b].tolist()):
            y, x = divmod(i, 5)
            if j >= 0:
                assert divmod(j, 5) == (y - dy, x - dx)
                assert torch.allclose(p.feat_q[b, :, y, x], p.feat_k[b, :, y - dy, x - dx])
            else:
                assert not (0 <= y - dy < 5 and 0 <= x - dx < 5)


def test_hough_recovers_true_matches_far_more_often_than_wta_under_clutter_and_outliers():
    """The paper's claim: WTA is fooled by background clutter and outliers, Hough voting is not."""
    clean = compare_matchers(synthetic_shift_pairs(32, clutter=0.0, outliers=0.0, noise=0.1))
    assert clean["wta"] > 0.99 and clean["hough"] > 0.99
    hard = synthetic_shift_pairs(
        64, clutter=0.5, outliers=0.3, noise=0.3, generator=torch.Generator().manual_seed(7)
    )
    acc = compare_matchers(hard)
    assert acc["hough"] > 0.9, acc
    assert acc["wta"] < 0.65, acc
    assert acc["hough"] - acc["wta"] > 0.3, acc


def test_match_accuracy_ignores_cells_without_a_true_match():
    truth = torch.tensor([[0, -1, 2, 3]])
    assert abs(match_accuracy(torch.tensor([[0, 9, 2, 0]]), truth) - 2 / 3) < 1e-6


def test_houghcl_step_is_densecl_with_hough_voted_positives():
    from test_dense import naive_wta, reference_dense_loss, tiny_batch, tiny_method

    m, batch = tiny_method("houghcl"), tiny_batch()
    hough = lambda q, k: [_naive_hough(q[b], k[b]) for b in range(q.shape[0])]  # noqa: E731
    ref, _ = reference_dense_loss(m, batch, 5, hough)
    out = m.training_step(batch, 0, torch.Generator().manual_seed(5))
    assert abs(out.loss.item() - ref) < 1e-4
    wta, _ = reference_dense_loss(m, batch, 5, naive_wta)
    assert abs(wta - ref) > 1e-2  # the Hough positives really differ from DenseCL's here
    n_dense = sum(p.numel() for p in tiny_method("densecl").parameters())
    assert sum(p.numel() for p in m.parameters()) == n_dense  # no extra learnable parameters
