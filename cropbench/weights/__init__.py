"""Load external checkpoints (ours or a paper's released weights) into a cropbench encoder, safely
and strictly: ``load_external(path, backbone, backbone_args, format="auto")``.

Safety: nothing in a file is executed. Torch files (zip or legacy) are read with
``torch.load(weights_only=True)``; other pickles (detectron2 ``.pkl``) with a restricted unpickler
that admits only numpy arrays, numpy dtypes and plain containers; ``.safetensors`` files (timm's
hub weights) by parsing their JSON header. The reader is chosen by the file's bytes, not its name.

Strictness: each release format names where its backbone lives (a key prefix, a renaming rule)
and which keys it drops by name (projection heads, predictors, momentum encoders, queues). Any
other key, a backbone key the encoder lacks or does not have, or a shape mismatch is an error
listing the keys; nothing is dropped silently. A ``module.`` prefix on every key (DataParallel /
DDP) is removed first; a file that names its architecture ('arch', 'backbone') must name ours.
The only keys filled in are BatchNorm ``num_batches_tracked`` counters (not weights; older
releases predate them), and the ``Provenance`` says so, as it says every dtype cast.

Release layouts (from the official code; each format's ``source`` cites repo@commit:path):
MoCo v2, SimSiam, OpenSelfSup (DenseCL, RegionCL) full checkpoints and their extracted backbones,
VideoMoCo, torchvision, timm, detectron2 pickles, and cropbench's own ``checkpoint.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cropbench.weights.files import read_weights_file, sha256_of
from cropbench.weights.formats import (
    ALIASES,
    DDP_PREFIX,
    FORMATS,
    ReleaseFormat,
    StateDict,
    WeightsError,
    detect_format,
    flat_state,
    format_names,
    resolve_format,
    sample_keys,
    torchvision_name,
)
from cropbench.weights.mapping import (
    cast_to,
    check_arch,
    check_duplicates,
    expected_state,
    match_encoder,
    split_keys,
)

__all__ = [
    "ALIASES",
    "FORMATS",
    "Provenance",
    "ReleaseFormat",
    "WeightsError",
    "detect_format",
    "format_names",
    "load_external",
    "load_external_encoder",
    "read_weights_file",
    "torchvision_name",
]


@dataclass(frozen=True)
class Provenance:
    """Where external weights came from and what was done to them (goes into every record)."""

    file: str  # the file's name (not its local path)
    sha256: str
    format: str
    format_source: str  # "auto" (detected by its keys) or "explicit"
    mapping: str  # compact description of the key mapping applied
    dropped: dict[str, int] = field(default_factory=dict)  # dropped key group -> count
    n_dropped: int = 0
    filled: tuple[str, ...] = ()  # BatchNorm counters absent from the file, set to 0
    cast: dict[str, int] = field(default_factory=dict)  # dtype conversions, e.g. "float16 -> float32": n

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "format": self.format,
            "format_source": self.format_source,
            "mapping": self.mapping,
            "dropped": dict(self.dropped),
            "n_dropped": self.n_dropped,
            "filled": list(self.filled),
            "cast": dict(self.cast),
        }


def load_external(
    path: str | Path,
    backbone_name: str,
    backbone_args: Mapping[str, Any] | None = None,
    format: str = "auto",  # noqa: A002 - the CLI option's name
) -> tuple[StateDict, Provenance]:
    """A state dict for ``build_backbone(backbone_name, **backbone_args)`` (load it with
    ``strict=True``) from any supported checkpoint, and the ``Provenance`` to record.

    The file is never executed (see module docstring); the format is detected by its keys unless
    given; every key is either mapped, or dropped by name and counted, or an error."""
    path = Path(path)
    where = str(path)
    obj = read_weights_file(path)
    fmt, how = resolve_format(obj, format, where)
    flat, ddp = flat_state(obj, fmt)
    if not flat:
        raise WeightsError(
            f"{where}: no state dict where format {fmt.name} keeps it; top-level keys: {sample_keys(obj)}"
        )
    check_arch(obj, fmt, backbone_name, where)
    backbone, dropped = split_keys(flat, fmt, where, DDP_PREFIX if ddp else "")
    check_duplicates(flat, backbone, fmt, where)
    expected = expected_state(backbone_name, backbone_args or {})
    state, filled = match_encoder(backbone, expected, where, backbone_name)
    state, casts = cast_to(state, expected)
    prov = Provenance(
        file=path.name,
        sha256=sha256_of(path),
        format=fmt.name,
        format_source=how,
        mapping=fmt.mapping(ddp),
        dropped=dropped,
        n_dropped=sum(dropped.values()),
        filled=filled,
        cast=casts,
    )
    return state, prov


def load_external_encoder(
    path: str | Path,
    backbone_name: str,
    backbone_args: Mapping[str, Any] | None = None,
    format: str = "auto",  # noqa: A002 - the CLI option's name
) -> tuple[torch.nn.Module, Provenance]:
    """``build_backbone(backbone_name, **backbone_args)`` with the file's weights loaded ``strict=True``."""
    from cropbench.backbones import build_backbone

    state, prov = load_external(path, backbone_name, backbone_args, format)
    encoder = build_backbone(backbone_name, **dict(backbone_args or {}))
    encoder.load_state_dict(state, strict=True)
    return encoder, prov
