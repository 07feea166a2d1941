"""Projection / prediction MLPs, built from data (lightly's ``ProjectionHead(blocks)`` idea).

A head is a list of ``Block(in_dim, out_dim, norm, relu, bias)``; the papers' heads are short
factory functions over that one builder, dims as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

Norm = Literal["bn", "bn_noaffine", "none"]


@dataclass(frozen=True)
class Block:
    """Linear(in_dim, out_dim, bias) -> optional BatchNorm1d -> optional ReLU."""

    in_dim: int
    out_dim: int
    norm: Norm = "none"
    relu: bool = False
    bias: bool = True


class MLPHead(nn.Module):
    """Sequential MLP built from ``Block``s; input and output are B×D."""

    def __init__(self, blocks: Sequence[Block]):
        super().__init__()
        if not blocks:
            raise ValueError("MLPHead: expected at least one Block")
        layers: list[nn.Module] = []
        for i, b in enumerate(blocks):
            if i and b.in_dim != blocks[i - 1].out_dim:
                raise ValueError(
                    f"MLPHead: block {i} takes {b.in_dim} features, block {i - 1} gives {blocks[i - 1].out_dim}"
                )
            layers.append(nn.Linear(b.in_dim, b.out_dim, bias=b.bias))
            if b.norm != "none":
                layers.append(nn.BatchNorm1d(b.out_dim, affine=b.norm == "bn"))
            if b.relu:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim = blocks[0].in_dim, blocks[-1].out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def mlp(
    dims: Sequence[int],
    hidden_norm: Norm = "bn",
    last_norm: Norm = "none",
    hidden_bias: bool = True,
) -> MLPHead:
    """dims = [in, hidden..., out]: hidden layers Linear-norm-ReLU, last layer Linear(-norm)."""
    if len(dims) < 2:
        raise ValueError(f"mlp: expected at least [in_dim, out_dim], got {list(dims)}")
    blocks = [Block(a, b, hidden_norm, True, hidden_bias) for a, b in zip(dims[:-2], dims[1:-1], strict=True)]
    blocks.append(Block(dims[-2], dims[-1], last_norm, False, last_norm == "none"))
    return MLPHead(blocks)


def simclr_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> MLPHead:
    """SimCLR g(·): Linear-BN-ReLU-Linear-BN, 128-d output (official TF head: every layer has BN;
    its last BN scales without shifting, ours neither scales nor shifts)."""
    return mlp([in_dim, hidden_dim, out_dim], hidden_norm="bn", last_norm="bn_noaffine", hidden_bias=False)


def mocov2_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> MLPHead:
    """MoCo v2 MLP: Linear-ReLU-Linear without BN (moco builder.py ``--mlp``), 2048-2048-128."""
    return mlp([in_dim, hidden_dim, out_dim], hidden_norm="none")


def byol_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> MLPHead:
    """BYOL projector and predictor: Linear(4096)-BN-ReLU-Linear(256)."""
    return mlp([in_dim, hidden_dim, out_dim], hidden_norm="bn")


def simsiam_projector(in_dim: int, dim: int = 2048) -> MLPHead:
    """SimSiam projector: 3 × Linear(no bias)-BN, ReLU after the first two, last BN no affine."""
    return mlp([in_dim, dim, dim, dim], hidden_norm="bn", last_norm="bn_noaffine", hidden_bias=False)


def simsiam_predictor(dim: int = 2048, pred_dim: int = 512) -> MLPHead:
    """SimSiam predictor: Linear(no bias)-BN-ReLU-Linear, bottleneck 2048-512-2048."""
    return mlp([dim, pred_dim, dim], hidden_norm="bn", hidden_bias=False)
