"""Release formats: where each release keeps its backbone, what it drops by name, and how each
is recognised by its keys (``format="auto"``). Each format's ``source`` cites repo@commit:path."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cropbench.errors import CropbenchError

StateDict = dict[str, Tensor]


class WeightsError(CropbenchError):
    """A checkpoint whose layout is not recognised, or whose keys or shapes do not map onto the encoder."""


_D2_RULES = (  # detectron2 name -> torchvision name; the inverse of cropbench.export.detectron2_name
    (re.compile(r"^stem\.conv1\.norm\."), "bn1."),
    (re.compile(r"^stem\.conv1\."), "conv1."),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([1-3])\.norm\."), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.norm\."), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\."), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0."),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([1-3])\."), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
)


def torchvision_name(d2_key: str) -> str:
    """detectron2 ResNet key -> torchvision key (``stem.conv1.norm.weight`` -> ``bn1.weight``, ...).

    Inverts MoCo's facebookresearch/moco@c567ee4:detection/convert-pretrain-to-detectron2.py and
    our ``cropbench.export.detectron2_name``; a key no rule matches is returned unchanged (and then
    fails the strict check, named)."""
    for pattern, repl in _D2_RULES:
        if pattern.match(d2_key):
            return pattern.sub(repl, d2_key, count=1)
    return d2_key


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _entry(key: str) -> Callable[[Any], Any]:
    return lambda obj: obj.get(key) if isinstance(obj, Mapping) else None


def _bare(obj: Any) -> Any:
    return obj if _tensor_dict(obj) else None


def _bare_or_state_dict(obj: Any) -> Any:
    return obj if _tensor_dict(obj) else _entry("state_dict")(obj)


@dataclass(frozen=True)
class ReleaseFormat:
    """One release layout: where the flat state dict sits, the backbone's key prefix, the keys
    dropped by name (prefixes; heads, predictors, momentum encoders, queues) and a renaming rule."""

    name: str
    source: str  # repo@commit:path the layout is taken from
    state_dict: Callable[[Any], Any]  # the loaded object -> its flat {key: tensor/array} or None
    signature: Callable[[Any, set[str]], bool]  # (loaded object, flat keys) -> is this format
    prefix: str = ""
    drop: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None
    rename_note: str = ""

    def mapping(self, ddp: bool = False) -> str:
        core = f"{DDP_PREFIX if ddp else ''}{self.prefix}<key> -> <key>"
        return f"{self.name}: {core}" + (f"; {self.rename_note}" if self.rename_note else "")


DDP_PREFIX = "module."  # (Distributed)DataParallel's wrapper: not part of any layout, removed when every key has it


def flat_state(obj: Any, fmt: ReleaseFormat) -> tuple[Mapping[str, Any] | None, bool]:
    """The format's flat state dict, without a ``module.`` wrapper, and whether there was one."""
    sd = fmt.state_dict(obj)
    if not isinstance(sd, Mapping):
        return None, False
    if sd and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in sd):
        return {k[len(DDP_PREFIX) :]: v for k, v in sd.items()}, True
    return sd, False


def _has(*keys: str) -> Callable[[Any, set[str]], bool]:
    return lambda obj, ks: all(k in ks for k in keys)


def _has_prefix(prefix: str) -> Callable[[Any, set[str]], bool]:
    return lambda obj, ks: any(k.startswith(prefix) for k in ks)


def _is_cropbench(obj: Any, ks: set[str]) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("encoder"), Mapping) and isinstance(obj.get("backbone"), str)


def _is_extracted(obj: Any, ks: set[str]) -> bool:
    """OpenSelfSup's extracted backbone: torchvision names under 'state_dict', no 'arch' (timm has one)."""
    return isinstance(obj, Mapping) and not _tensor_dict(obj) and "conv1.weight" in ks and "arch" not in obj


def _is_detectron2(obj: Any, ks: set[str]) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "stem.conv1.weight" in ks


def _is_torchvision(obj: Any, ks: set[str]) -> bool:
    return _tensor_dict(obj) and "conv1.weight" in ks and not _has_prefix("head.")(obj, ks)


def _is_timm(obj: Any, ks: set[str]) -> bool:
    """timm: a bare state dict with a 'head.*' classifier, or a train checkpoint ('arch', 'state_dict')."""
    if "conv1.weight" not in ks or not isinstance(obj, Mapping):
        return False
    return _has_prefix("head.")(obj, ks) if _tensor_dict(obj) else "arch" in obj


# Order matters only for readability: the signatures are mutually exclusive (tested).
FORMATS: dict[str, ReleaseFormat] = {
    f.name: f
    for f in (
        ReleaseFormat(
            "cropbench",
            "cropbench/trainer.py (Trainer.save: 'encoder', 'backbone', 'backbone_args')",
            _entry("encoder"),
            _is_cropbench,
        ),
        ReleaseFormat(
            "mocov2",
            "facebookresearch/moco@c567ee4:main_moco.py (save_checkpoint 'state_dict' of DDP(MoCo)), moco/builder.py",
            _entry("state_dict"),
            _has("encoder_q.conv1.weight"),
            prefix="encoder_q.",
            drop=("encoder_q.fc.", "encoder_k.", "queue"),
        ),
        ReleaseFormat(
            "simsiam",
            "facebookresearch/simsiam@a7bc177:main_simsiam.py ('state_dict'), simsiam/builder.py",
            _entry("state_dict"),
            _has("encoder.conv1.weight"),
            prefix="encoder.",
            drop=("encoder.fc.", "predictor."),
        ),
        ReleaseFormat(
            "openselfsup",
            "WXinlong/DenseCL@b64bbb6:openselfsup/models/densecl.py, Annbless/RegionCL@61bbcab:"
            "openselfsup/models/RegionCLM.py (mmcv 'state_dict'; backbone = encoder_q[0])",
            _entry("state_dict"),
            _has("backbone.conv1.weight"),
            prefix="backbone.",
            drop=("encoder_q.", "encoder_k.", "online_net.", "target_net.", "neck.", "head.", "queue"),
        ),
        ReleaseFormat(
            "openselfsup_backbone",
            "WXinlong/DenseCL@b64bbb6:tools/extract_backbone_weights.py, Annbless/RegionCL@61bbcab:"
            "tools/extract_backbone_weights.py ({'state_dict': backbone, 'author': ...}); the released "
            "densecl_r50_*.pth have this layout (WXinlong/DenseCL issue #30)",
            _entry("state_dict"),
            _is_extracted,
        ),
        ReleaseFormat(
            "videomoco",
            "tinapan-pt/VideoMoCo@42e069a:train.py (netD 'state_dict', 'arch'), moco/builder.py, eval.py",
            _entry("state_dict"),
            _has("encoder_q.stem.0.weight"),
            prefix="encoder_q.",
            drop=("encoder_q.fc.", "encoder_k.", "queue"),
        ),
        ReleaseFormat(
            "torchvision",
            "pytorch/vision@f50e776:torchvision/models/resnet.py (plain state_dict; 'fc' is the classifier)",
            _bare,
            _is_torchvision,
            drop=("fc.",),
        ),
        ReleaseFormat(
            "timm",
            "huggingface/pytorch-image-models@00c5be7:timm/models/resnet.py (torchvision names; classifier "
            "'fc', or 'head.*' in models with a ClassifierHead; train checkpoints keep it under 'state_dict')",
            _bare_or_state_dict,
            _is_timm,
            drop=("fc.", "head."),
        ),
        ReleaseFormat(
            "detectron2",
            "facebookresearch/moco@c567ee4:detection/convert-pretrain-to-detectron2.py; cropbench/export.py",
            _entry("model"),
            _is_detectron2,
            drop=("stem.fc.",),  # MoCo's converter keeps encoder_q.fc, renamed stem.fc.*
            rename=torchvision_name,
            rename_note="detectron2 names -> torchvision (stem.conv1[.norm] -> conv1/bn1, resN -> layer(N-1), "
            "convK.norm -> bnK, shortcut[.norm] -> downsample.0/1); numpy -> torch",
        ),
    )
}
ALIASES = {"densecl": "openselfsup", "regioncl": "openselfsup", "moco": "mocov2", "supervised": "torchvision"}


def format_names() -> list[str]:
    """Every value ``format=`` accepts (``auto``, the formats, their aliases)."""
    return ["auto", *FORMATS, *ALIASES]


def _flat_keys(obj: Any, fmt: ReleaseFormat) -> set[str]:
    return set(flat_state(obj, fmt)[0] or ())


def detect_format(obj: Any, where: str = "checkpoint") -> ReleaseFormat:
    """The one format whose signature matches; otherwise an error with a sample of the keys."""
    hits = [f for f in FORMATS.values() if f.signature(obj, _flat_keys(obj, f))]
    if len(hits) == 1:
        return hits[0]
    if hits:  # cannot happen for the built-in formats (tested); guards future additions
        raise WeightsError(f"{where}: matches several formats ({', '.join(f.name for f in hits)}); pass format=")
    raise WeightsError(
        f"{where}: unrecognised checkpoint layout; formats tried: {', '.join(FORMATS)}; "
        f"top-level keys: {sample_keys(obj)}; state-dict keys: {sample_keys(_nested_state(obj))}"
    )


def _nested_state(obj: Any) -> Any:
    for key in ("state_dict", "model", "encoder"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def sample_keys(obj: Any, n: int = 8) -> str:
    if not isinstance(obj, Mapping):
        return f"(a {type(obj).__name__}, not a dict)"
    keys = [str(k) for k in list(obj)[:n]]
    more = f", ... ({len(obj)} in all)" if len(obj) > n else ""
    return "[" + ", ".join(keys) + more + "]"


def resolve_format(obj: Any, fmt: str, where: str) -> tuple[ReleaseFormat, str]:
    """(format, "auto"|"explicit"); an unknown name lists the valid ones."""
    if fmt == "auto":
        return detect_format(obj, where), "auto"
    name = ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise WeightsError(f"unknown weights format {fmt!r}; valid: {', '.join(format_names())}")
    return FORMATS[name], "explicit"
