"""Result records: one JSON file per (scale, entry, variant, evaluation, seed), with provenance.

Layout: ``<root>/<scale>/<entry>/<variant>/<eval>/seed<seed>.json``. Records are append-only in
spirit: writing a key again replaces that one file (a re-run) and touches no other. Every write goes
to a temporary file in the same folder and is renamed into place, so a reader never sees half a
record. Tables and checks are generated from records only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cropbench.config import from_dict, to_dict
from cropbench.errors import CropbenchError
from cropbench.io import write_text_atomic


class RecordKey(NamedTuple):
    scale: str
    entry: str
    variant: str
    eval: str
    seed: int

    def __str__(self) -> str:
        return f"{self.scale}/{self.entry}/{self.variant}/{self.eval}/seed{self.seed}"


@dataclass(frozen=True)
class Record:
    entry: str
    variant: str  # "<variant>+random_init" for the runner's random-init baseline of <variant>
    scale: str
    eval: str
    seed: int
    metrics: dict[str, float]  # what evaluate() returned, e.g. {"top1": 61.2, "top5": 95.0}
    pretrain: dict[str, float]  # loss_first, loss_last, epochs, steps, images_per_s, wall_s
    eval_wall_s: float
    # recipe, recipe_hash, git_commit, git_dirty, versions, device, overrides; config (the method's
    # resolved Config), eval_settings (resolved Settings), protocol_hash; from ``cropbench eval``
    # also weights (Provenance.to_dict()) and external_weights (True unless a cropbench checkpoint)
    provenance: dict[str, Any]

    @property
    def key(self) -> RecordKey:
        return RecordKey(self.scale, self.entry, self.variant, self.eval, self.seed)

    @property
    def overrides(self) -> dict[str, Any]:
        """``--set``/``--split`` keys that changed the entry's recipe (key path -> value); a record
        with any is *modified*: tables mark it and ``check`` keeps it from paper references."""
        found = self.provenance.get("overrides") or {}
        return dict(found) if isinstance(found, dict) else {}

    @property
    def external_weights(self) -> bool:
        """Evaluated by ``cropbench eval`` on weights that cropbench did not train (a paper's
        release, torchvision's ...): ``provenance.external_weights``; tables mark such rows."""
        return bool(self.provenance.get("external_weights", False))

    @property
    def weights(self) -> dict[str, Any]:
        """``cropbench eval``'s weights provenance (file, sha256, format, mapping, dropped); {} for
        a record of ``cropbench run``."""
        found = self.provenance.get("weights") or {}
        return dict(found) if isinstance(found, dict) else {}

    @property
    def protocol_hash(self) -> str | None:
        """Identity of the evaluation protocol: hash of the resolved evaluation ``Settings``
        (``provenance.protocol_hash``); records with different hashes never share a table cell.
        None for records written before it existed."""
        found = self.provenance.get("protocol_hash")
        return found if isinstance(found, str) else None

    @property
    def deviations(self) -> dict[str, str]:
        """The resolved recipe's ``deviations`` (key path -> why it departs from the paper)."""
        recipe = self.provenance.get("recipe") or {}
        return dict(recipe.get("deviations") or {}) if isinstance(recipe, dict) else {}


class _HasKey(Protocol):
    scale: str
    entry: str
    variant: str
    eval: str
    seed: int


def record_path(root: Path, key: _HasKey) -> Path:
    """``<root>/<scale>/<entry>/<variant>/<eval>/seed<seed>.json`` for a Record or RecordKey."""
    for part in (key.scale, key.entry, key.variant, key.eval):
        if not part or "/" in part or part.startswith("."):
            raise CropbenchError(f"record key part {part!r} cannot be a folder name (key {tuple(key)})")
    return Path(root) / key.scale / key.entry / key.variant / key.eval / f"seed{key.seed}.json"


def record_json(rec: Record) -> str:
    """The record's file text: sorted keys, indent 2, trailing newline."""
    return json.dumps(dataclasses.asdict(rec), sort_keys=True, indent=2) + "\n"


def write_record(root: Path, rec: Record) -> Path:
    """Write (or replace) the record's file atomically; returns its path."""
    return write_text_atomic(record_path(root, rec), record_json(rec))


def read_record(path: Path) -> Record:
    """Parse one record file; anything malformed is a ``CropbenchError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CropbenchError(f"{path}: not a readable JSON record: {e}") from e
    return from_dict(Record, data, str(path))


def load_records(root: Path) -> list[Record]:
    """All records under ``root`` by key; a key that disagrees with its path is an error."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise CropbenchError(
            f"records folder {root} {what}; check the --records / --golden path "
            "(cropbench run writes records under its --out)"
        )
    out = []
    for path in sorted(root.glob("*/*/*/*/seed*.json")):
        rec = read_record(path)
        if record_path(root, rec) != path:
            raise CropbenchError(
                f"{path}: record key {rec.key} does not match its location (expected {record_path(root, rec)})"
            )
        out.append(rec)
    return sorted(out, key=lambda r: r.key)


PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str, cwd: Path = PACKAGE_DIR) -> str | None:
    """``git <args>`` output in ``cwd``; None when git is missing or ``cwd`` is not a checkout."""
    try:
        res = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def recipe_hash(recipe_dict: dict) -> str:
    """Same hash as ``Recipe.hash()``: sha256 of the sorted-key JSON, first 16 hex digits."""
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def protocol_hash(eval_name: str, settings: dict[str, Any]) -> str:
    """sha256 of the evaluation's name and its resolved ``Settings`` (defaults filled in), sorted
    JSON, first 16 hex digits: two records with different protocols have different hashes."""
    return recipe_hash({"eval": eval_name, "settings": settings})


def protocol_provenance(eval_name: str, settings: Any, method_config: Any) -> dict[str, Any]:
    """The resolved configuration a record carries: ``config`` (the method's validated ``Config``),
    ``eval_settings`` (the evaluation's validated ``Settings``, every default filled in) and their
    ``protocol_hash``."""
    resolved = to_dict(settings)
    return {
        "config": to_dict(method_config),
        "eval_settings": resolved,
        "protocol_hash": protocol_hash(eval_name, resolved),
    }


def package_versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    import cropbench

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cropbench": cropbench.__version__,
        "numpy": numpy.__version__,
    }


def cpu_info() -> dict[str, Any]:
    """The arithmetic a CPU run's floats came from: a record made on another CPU model, vector
    capability or thread count rounds differently, so its losses are a new draw, not the golden bit
    for bit (``cropbench check`` names both in a miss)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def collect_provenance(
    recipe_dict: dict, device: str, command: str | list[str], repo_dir: Path = PACKAGE_DIR
) -> dict[str, Any]:
    """Where a record came from. ``git_commit``/``git_dirty`` describe the checkout that holds
    ``repo_dir`` (default: this package) and are None outside one; untracked files are not dirt."""
    commit = _git("rev-parse", "HEAD", cwd=repo_dir)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=repo_dir) if commit else None
    return {
        "recipe": recipe_dict,
        "recipe_hash": recipe_hash(recipe_dict),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "versions": package_versions(),
        "device": str(device),
        "command": command if isinstance(command, str) else " ".join(command),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": cpu_info(),
    }
