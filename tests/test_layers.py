"""Imports point down only (DESIGN.md, *Building blocks*): one home for each kind of thing.

Read from the source with ``ast`` (every import, also those inside functions), so a new module
that breaks a rule fails here whether or not a test imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP = ("cropbench.trainer", "cropbench.runner", "cropbench.cli", "cropbench.viewplot")


def _files(*parts: str) -> list[Path]:
    out = []
    for part in parts:
        p = REPO / part
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    assert out and all(f.exists() for f in out), parts
    return out


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (``from a import b`` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _rel(f: Path) -> str:
    return str(f.relative_to(REPO)) if f.is_relative_to(REPO) else f.name


def _offenders(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [
        f"{_rel(f)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if any(m == b or m.startswith(b + ".") for b in banned)
    ]


@pytest.mark.parametrize(
    ("layer", "banned"),
    [
        (("cropbench/data", "evaluations"), ("cropbench.methods", *TOP)),
        (
            ("cropbench/views", "cropbench/types.py", "cropbench/io.py"),
            ("cropbench.methods", "cropbench.evaluations", "cropbench.data.video", *TOP),
        ),
        (("methods",), ("cropbench.evaluations", "matplotlib", *TOP)),
    ],
    ids=["data+evaluations", "core views/types/io", "methods"],
)
def test_imports_point_down(layer, banned):
    assert _offenders(_files(*layer), banned) == []


def test_no_method_registers_a_dataset():
    calls = [
        f"{f.relative_to(REPO)}:{node.lineno}"
        for f in _files("methods")
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Name) and node.id in ("register_dataset", "DATASETS")
    ]
    assert calls == []


def rename_calls(path: Path) -> list[int]:
    """Lines of ``path`` that rename a file into place: ``os.replace`` / ``os.rename`` /
    ``shutil.move``, or ``tmp….replace(…)`` / ``.rename(…)`` on a temporary path."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, attr = node.func.value, node.func.attr
        name = owner.id if isinstance(owner, ast.Name) else ""
        if (name, attr) in (("os", "replace"), ("os", "rename"), ("shutil", "move")) or (
            "tmp" in name.lower() and attr in ("replace", "rename")
        ):
            lines.append(node.lineno)
    return lines


def test_one_module_renames_files_into_place():
    """Atomic writes go through ``cropbench.io``; no other module renames files into place."""
    io = REPO / "cropbench" / "io.py"
    assert rename_calls(io)  # the check sees the one that does
    calls = [
        f"{f.relative_to(REPO)}:{line}"
        for f in _files("cropbench", "methods", "evaluations", "scripts")
        if f != io
        for line in rename_calls(f)
    ]
    assert calls == []


def test_the_rules_catch_a_violation(tmp_path):
    """The checks can fail: a file that breaks the import and rename rules is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom cropbench import trainer\n"
        "def f():\n    from cropbench.methods.base import SSLMethod\n    os.replace('a', 'b')\n"
    )
    assert imported_modules(bad) >= {"cropbench.trainer", "cropbench.methods.base", "os"}
    assert _offenders([bad], ("cropbench.methods", *TOP)) == [
        "bad.py imports cropbench.methods.base",
        "bad.py imports cropbench.methods.base.SSLMethod",
        "bad.py imports cropbench.trainer",
    ]
    assert rename_calls(bad) == [5]
