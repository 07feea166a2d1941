"""Reading weights files without executing them: ``torch.load(weights_only=True)`` for torch files,
a restricted unpickler (numpy arrays, dtypes, plain containers) for other pickles, and a header
parser for ``.safetensors``. The reader is chosen by the file's first bytes, never by its name."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cropbench.errors import CheckpointError

_ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 files are zip archives
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # torch's pre-1.6 files start so


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickle of numpy arrays needs, under numpy 1 (``numpy.core``) and 2 (``numpy._core``)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _Forbidden(pickle.UnpicklingError):
    """A global outside the allow-list (as opposed to a damaged pickle)."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays / dtypes and plain containers; any other global is refused."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Forbidden(f"global {module}.{name} is not a numpy array or plain container") from None


def _refused(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused: it holds objects other than tensors, numpy arrays and plain data ({why}); "
        "cropbench never unpickles such objects because doing so can run code"
    )


def _load_pickle(path: Path) -> Any:
    """A plain pickle (detectron2 ``.pkl``) read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f).load()
    except _Forbidden as e:
        raise _refused(path, str(e)) from e
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    return obj


def _load_torch(path: Path) -> Any:
    """A torch checkpoint (zip or legacy) read with ``torch.load(weights_only=True)``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if why is None:  # damaged data, not a forbidden object
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from e
        raise _refused(path, why) from e
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})") from e


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    return len(head) >= 9 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file (timm / Hugging Face hub weights): a JSON header of
    {name: {dtype, shape, data_offsets}} and raw little-endian bytes; nothing is unpickled."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    try:
        if 8 + n > len(raw):
            raise ValueError(f"header of {n} bytes but the file has {len(raw)}: truncated")
        header = json.loads(raw[8 : 8 + n])
        body = memoryview(raw)[8 + n :]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            flat = torch.frombuffer(bytearray(body[start:end]), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            out[name] = flat.reshape(info["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return out


def read_weights_file(path: Path) -> Any:
    """The file's object; the reader is chosen by content (torch zip / legacy torch / safetensors /
    pickle), never by the file's name."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} not found")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_ZIP_MAGIC) or head == _LEGACY_TORCH_MAGIC:
        return _load_torch(path)
    if _is_safetensors(head):
        return _load_safetensors(path)
    return _load_pickle(path)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
