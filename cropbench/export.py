"""Export a pretrained backbone for downstream frameworks (``cropbench export CKPT --format ...``).

* ``torchvision``: a plain ResNet ``state_dict`` (``conv1``, ``bn1``, ``layer1``..``layer4``; no
  ``fc``) that ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` takes with only
  ``fc.weight`` / ``fc.bias`` missing.
* ``detectron2``: the pickle MoCo's ``convert-pretrain-to-detectron2.py`` writes, ``{"model": {name:
  numpy}, "__author__": ..., "matching_heuristics": True}``, with detectron2's names
  (``stem.conv1``, ``stem.conv1.norm``, ``res2``..``res5``, ``convK.norm``, ``shortcut``,
  ``shortcut.norm``).

Checkpoints read: cropbench's (``{"encoder": state_dict, "backbone": ..., ...}``), MoCo-style
``{"state_dict": {"module.encoder_q.*": ...}}`` (also ``encoder_q.``, ``backbone.``, ``module.``
prefixes), and bare state dicts. ``fc.*`` (classifier / MoCo projection head) is dropped; any other
key that is not a ResNet backbone key is an error naming it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cropbench.errors import CropbenchError
from cropbench.io import atomic_open, save_torch_atomic

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_RESNET_KEY = re.compile(
    rf"^(conv1\.weight|bn1\.{_BN}|layer[1-4]\.\d+\."
    rf"(conv[1-3]\.weight|bn[1-3]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN}))$"
)
_DROPPED_PREFIXES = ("fc.",)  # classifier / projection head: not part of the backbone
# wrapper prefixes, most specific first: MoCo query encoder, mmselfsup / DenseCL, DDP
_PREFIXES = (
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "backbone.",
    "module.encoder.",
    "module.",
)
Format = Literal["detectron2", "torchvision"]


def load_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU: a file holding anything but tensors and plain data
    is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise CropbenchError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CropbenchError(
            f"{path}: cannot be loaded with weights_only=True: it holds more than tensors and plain data ({e})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CropbenchError(f"{path}: not a torch checkpoint ({e})") from e


def backbone_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """The backbone's state dict inside a loaded checkpoint, wrapper prefixes stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("encoder"), dict):
        sd = obj["encoder"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CropbenchError(
            f"{where}: no backbone weights found (expected an 'encoder' or 'state_dict' "
            f"entry, or a bare state dict); top-level keys: {keys}"
        )
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def to_torchvision(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Validated torchvision ResNet names (``fc.*`` dropped); unmappable keys raise, named."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_DROPPED_PREFIXES)}
    bad = sorted(k for k in sd if not _RESNET_KEY.match(k))
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise CropbenchError(
            f"{len(bad)} checkpoint keys do not map to a torchvision ResNet backbone: {', '.join(bad[:10])}{more}"
        )
    missing = [k for k in ("conv1.weight", "bn1.weight") if k not in sd]
    missing += [f"layer{i}.*" for i in range(1, 5) if not any(k.startswith(f"layer{i}.") for k in sd)]
    if missing:
        raise CropbenchError(f"checkpoint is not a complete ResNet backbone; missing {', '.join(missing)}")
    return {k: v.detach().cpu() for k, v in sd.items()}


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key (MoCo's conversion rules)."""
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    stage, rest = re.match(r"layer([1-4])\.(.*)$", key).groups()
    rest = re.sub(r"^(\d+)\.bn([1-3])\.", r"\1.conv\2.norm.", rest)
    rest = re.sub(r"^(\d+)\.downsample\.0\.", r"\1.shortcut.", rest)
    rest = re.sub(r"^(\d+)\.downsample\.1\.", r"\1.shortcut.norm.", rest)
    return f"res{int(stage) + 1}.{rest}"


def to_detectron2(state_dict: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """detectron2-named numpy arrays of a torchvision-named backbone state dict."""
    return {detectron2_name(k): v.numpy() for k, v in to_torchvision(state_dict).items()}


def save_detectron2(state_dict: dict[str, Tensor], out: Path) -> Path:
    blob = {
        "model": to_detectron2(state_dict),
        "__author__": "cropbench",
        "matching_heuristics": True,
    }
    with atomic_open(out, "wb") as f:
        pickle.dump(blob, f)
    return out


def save_torchvision(state_dict: dict[str, Tensor], out: Path) -> Path:
    return save_torch_atomic(to_torchvision(state_dict), out)


def export_checkpoint(ckpt_path: Path, fmt: Format, out_path: Path | None = None) -> Path:
    """Write ``ckpt_path``'s backbone in ``fmt``.

    The default output is ``<ckpt>.d2.pkl`` / ``<ckpt>.torchvision.pth`` next to the checkpoint."""
    ckpt_path = Path(ckpt_path)
    savers = {
        "detectron2": (save_detectron2, ".d2.pkl"),
        "torchvision": (save_torchvision, ".torchvision.pth"),
    }
    if fmt not in savers:
        raise CropbenchError(f"unknown export format {fmt!r}; valid: {', '.join(savers)}")
    save, suffix = savers[fmt]
    sd = backbone_state_dict(load_checkpoint(ckpt_path), str(ckpt_path))
    return save(sd, Path(out_path) if out_path is not None else ckpt_path.with_suffix(suffix))
