"""Instance-discrimination objectives: NT-Xent (SimCLR), InfoNCE with a queue (MoCo v2), and the
BYOL / SimSiam regression losses.

Every loss computes its logits in float32 (safe under bf16 autocast). Cross-process terms are
explicit: ``nt_xent`` gathers the other processes' embeddings *with* gradient
(``cropbench.dist.gather_with_grad``), so each process computes the loss of its own anchors against
the global batch; averaging the per-process losses (what DDP's gradient averaging does) gives the
1-process loss of the concatenated batch. The MoCo loss needs no gather (keys are local positives,
the queue is the same everywhere); its *enqueue* gathers keys (``Queue.enqueue``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from cropbench.dist import DistContext, gather_with_grad


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, dist: DistContext) -> Tensor:
    """SimCLR's NT-Xent over the global batch (Chen et al. 2020, eq. 1).

    z1, z2: N×D local projections of the two views (row i of each is one image; N equal on every
    process, as ``all_gather`` requires). Each of the
    local 2N anchors is scored against all 2·N·world other embeddings (its positive and the
    2N_global − 2 negatives); the loss is the mean over local anchors of
    −log exp(s_pos/τ) / Σ_{k≠anchor} exp(s_k/τ), with s the cosine similarity.

    This is the paper's 1/(2N) mean. The official code (google-research/simclr@383d414
    tf2/objective.py) returns ``reduce_mean(loss_a + loss_b)``, the *sum* of the two views' means:
    exactly 2× this value and gradient (pinned in tests/test_fidelity.py).
    """
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # 2N×D: [view 1; view 2]
    all1 = gather_with_grad(F.normalize(z1.float(), dim=1), dist)  # (N·W)×D
    all2 = gather_with_grad(F.normalize(z2.float(), dim=1), dist)
    bank = torch.cat([all1, all2])  # 2·N·W × D: [all view-1 rows; all view-2 rows]
    logits = local @ bank.T / temperature  # 2N × 2NW
    total = all1.shape[0]
    rows = torch.arange(n, device=local.device) + dist.rank * n  # global index of local image i
    self_col = torch.cat([rows, rows + total])  # where each anchor sits in the bank
    pos_col = torch.cat([rows + total, rows])  # its other view
    anchor = torch.arange(2 * n, device=local.device)
    logits = logits.index_put((anchor, self_col), torch.tensor(float("-inf"), device=local.device))
    return F.cross_entropy(logits, pos_col)


def info_nce(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1): q·k⁺ against q·queue.

    q: N×D queries, k: N×D positive keys (no gradient), negatives: K×D (the queue). Inputs are
    L2-normalised here. Loss = mean_i −log exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·n_j/τ)).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    negatives = F.normalize(negatives.detach().float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)  # N×1
    neg = q @ negatives.T  # N×K
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def cosine(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample cosine of N×D ``p`` and the stop-gradient target ``z`` -> N (float32)."""
    return F.cosine_similarity(p.float(), z.detach().float(), dim=1)


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """BYOL (Grill et al. 2020, eq. 2): ‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z), batch mean.

    Per-sample, so there is no cross-process term to gather.
    """
    return (2 - 2 * cosine(p, z)).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam (Chen & He 2021, eq. 1): D(p, z) = −cos(p, stopgrad(z)), batch mean."""
    return -cosine(p, z).mean()


def symmetric(
    loss: Callable[[Tensor, Tensor], Tensor],
    p1: Tensor,
    p2: Tensor,
    z1: Tensor,
    z2: Tensor,
    weight: float = 0.5,
) -> Tensor:
    """weight·(loss(p1, z2) + loss(p2, z1)): SimSiam uses 0.5 (its eq. 2), BYOL 1.0 (L + L̃)."""
    return weight * (loss(p1, z2) + loss(p2, z1))
