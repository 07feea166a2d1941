"""Atomic file writing: the one place cropbench writes a file that others may read.

Every writer goes through a temporary sibling (``.<name>.<random>.tmp`` in the same folder, so
the rename stays on one file system), flushes and fsyncs it, then renames it over the target
(``os.replace``: atomic on POSIX). A reader, or a process killed mid-write, therefore sees the
old file or the new one, never half of one; on an error the temporary file is removed and the
old file is left as it was. Folders work the same way (``atomic_dir``): built under a temporary
name, renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


@contextmanager
def atomic_open(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing (``mode`` "w" text, utf-8 with "\\n"
    newlines, or "wb"); on a clean exit it is fsynced and renamed over ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` (utf-8) to ``path`` atomically. -> ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, **dumps)`` plus a trailing newline, written atomically. -> ``path``."""
    return write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


def save_torch_atomic(obj: Any, path: Path | str) -> Path:
    """``torch.save(obj, path)`` atomically (argument order of ``torch.save``). -> ``path``."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


@contextmanager
def atomic_dir(folder: Path | str, done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build a folder under a temporary sibling name (yielded), renamed to ``folder`` on a clean exit.

    If the rename fails because another process put ``folder`` in place first and ``done(folder)``
    says that copy is complete, that copy is kept; otherwise the error propagates. The temporary
    folder never outlives the block.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, folder)
        except OSError:
            if done is None or not done(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
