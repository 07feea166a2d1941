"""Strict mapping of a release's flat state dict onto a cropbench encoder: every key is mapped,
dropped by name (and counted) or an error; names and shapes are checked against the encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cropbench.weights.formats import ReleaseFormat, StateDict, WeightsError


def _as_tensor(value: Any, key: str, where: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.require(value, requirements="C"))  # ascontiguousarray makes 0-d 1-d
    raise WeightsError(f"{where}: {key} is a {type(value).__name__}, expected a tensor or numeric numpy array")


def _drop_group(key: str, drop: tuple[str, ...]) -> str | None:
    """The drop prefix that ``key`` falls under, as ``prefix*``; None when it is kept."""
    return next((f"{p}*" for p in drop if key.startswith(p)), None)


def split_keys(
    flat: Mapping[str, Any], fmt: ReleaseFormat, where: str, shown: str = ""
) -> tuple[StateDict, dict[str, int]]:
    """(backbone tensors under the encoder's names, {dropped group: count}); a key that is neither
    a backbone key nor dropped by name is an error listing it. ``shown``: the removed DDP prefix,
    put back in names shown to the user."""
    backbone: StateDict = {}
    dropped: dict[str, int] = {}
    unmatched: list[str] = []
    for key, value in flat.items():
        group = _drop_group(key, fmt.drop)
        if group is not None:
            dropped[shown + group] = dropped.get(shown + group, 0) + 1
        elif key.startswith(fmt.prefix):
            name = key[len(fmt.prefix) :]
            name = fmt.rename(name) if fmt.rename else name
            if name in backbone:
                raise WeightsError(f"{where}: two keys map to the backbone key {name} (the second: {shown}{key})")
            backbone[name] = _as_tensor(value, key, where)
        else:
            unmatched.append(shown + key)
    if unmatched:
        raise WeightsError(
            f"{where}: {len(unmatched)} keys are neither backbone keys ('{shown}{fmt.prefix}*') nor dropped by "
            f"name ({', '.join(shown + d for d in fmt.drop) or 'none'}) in format {fmt.name}: {_listing(unmatched)}"
        )
    return backbone, dict(sorted(dropped.items()))


def _listing(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def expected_state(backbone_name: str, backbone_args: Mapping[str, Any]) -> StateDict:
    """The encoder's state dict on the meta device: names, shapes and dtypes, no memory."""
    from cropbench.backbones import build_backbone

    with torch.device("meta"):
        return build_backbone(backbone_name, **dict(backbone_args)).state_dict()


def match_encoder(
    backbone: StateDict, expected: StateDict, where: str, target: str
) -> tuple[StateDict, tuple[str, ...]]:
    """Check names and shapes against the encoder; (state dict in the encoder's key order, filled
    BatchNorm counters). Missing, unexpected and mis-shaped keys are one error listing them."""
    filled = tuple(k for k in expected if k not in backbone and k.endswith(".num_batches_tracked"))
    missing = [k for k in expected if k not in backbone and k not in filled]
    unexpected = [k for k in backbone if k not in expected]
    shapes = [
        f"{k} {tuple(backbone[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in backbone and backbone[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {what}: {_listing(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with wrong shapes", shapes))
        if keys
    ]
    if problems:
        raise WeightsError(f"{where} does not fit the {target} encoder; backbone keys " + "; ".join(problems))
    out = {k: (backbone[k] if k in backbone else torch.zeros((), dtype=torch.long)) for k in expected}
    return out, filled


def cast_to(state: StateDict, expected: StateDict) -> tuple[StateDict, dict[str, int]]:
    """Tensors in the encoder's dtypes (e.g. a float16 release), and {"float16 -> float32": count}."""
    casts: dict[str, int] = {}
    out = {}
    for k, v in state.items():
        want = expected[k].dtype
        if v.dtype != want:
            what = f"{str(v.dtype).removeprefix('torch.')} -> {str(want).removeprefix('torch.')}"
            casts[what] = casts.get(what, 0) + 1
            v = v.to(want)
        out[k] = v
    return out, dict(sorted(casts.items()))


def check_arch(obj: Any, fmt: ReleaseFormat, backbone_name: str, where: str) -> None:
    """A file that names its architecture must name ours: cropbench's 'backbone'; the 'arch' of MoCo,
    SimSiam and VideoMoCo checkpoints (a torchvision model name, e.g. resnet50, r2plus1d_18)."""
    key = {"cropbench": "backbone", "mocov2": "arch", "simsiam": "arch", "videomoco": "arch"}.get(fmt.name)
    arch = obj.get(key) if key and isinstance(obj, Mapping) else None
    if isinstance(arch, str) and arch != backbone_name:
        raise WeightsError(
            f"{where}: the {fmt.name} checkpoint holds a {arch!r} backbone ('{key}' entry) but the entry's "
            f"backbone is {backbone_name!r}; the architectures differ, so the weights cannot be mapped"
        )


def check_duplicates(flat: Mapping[str, Any], backbone: StateDict, fmt: ReleaseFormat, where: str) -> None:
    """OpenSelfSup stores the query backbone twice (``backbone.*`` and ``encoder_q.0.*``): they must agree."""
    if fmt.name != "openselfsup":
        return
    differ = [
        k for k, v in backbone.items() if f"encoder_q.0.{k}" in flat and not torch.equal(flat[f"encoder_q.0.{k}"], v)
    ]
    if differ:
        raise WeightsError(f"{where}: backbone.* and encoder_q.0.* differ (not one query encoder): {_listing(differ)}")
