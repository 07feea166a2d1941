"""``cropbench.io``: every file cropbench writes appears whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cropbench.io import (
    atomic_dir,
    atomic_open,
    save_torch_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("cropbench.io.os.fsync", boom)


def test_writers_round_trip_and_leave_only_the_target(tmp_path: Path) -> None:
    text = write_text_atomic(tmp_path / "a" / "t.txt", "é\nline\n")  # creates the parent folder
    assert text.read_bytes() == "é\nline\n".encode()
    assert write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    js = write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert js.read_text() == '{"a": [2], "b": 1}\n' and json.loads(js.read_text()) == {"a": [2], "b": 1}
    blob = {"w": torch.arange(6.0).view(2, 3), "epoch": 3}
    pt = save_torch_atomic(blob, tmp_path / "d.pt")
    back = torch.load(pt, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], blob["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.json", "d.pt"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["t.txt"]


@pytest.mark.parametrize("write", ["text", "torch"])
def test_a_failed_write_keeps_the_old_file_and_no_temporary(write, tmp_path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    _fail_fsync(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        if write == "text":
            write_text_atomic(path, "new" * 1000)
        else:
            save_torch_atomic({"x": torch.ones(1000)}, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_an_error_inside_the_block_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []


def test_atomic_open_names_the_modes_it_takes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_atomic_dir_renames_a_complete_folder_into_place(tmp_path: Path) -> None:
    target = tmp_path / "data" / "set"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".set-") and not target.exists()
        (tmp / "x.txt").write_text("1")
    assert (target / "x.txt").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["set"]


def test_atomic_dir_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "set") as tmp:
            (tmp / "x.txt").write_text("1")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("complete", [True, False])
def test_atomic_dir_when_another_process_finished_first(complete, tmp_path: Path) -> None:
    """The rename fails on a non-empty target: a complete copy (``done``) is kept, else an error."""
    target = tmp_path / "set"

    def other_process_wins(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()
        (target / ("DONE" if complete else "partial")).write_text("theirs")

    if complete:
        with atomic_dir(target, done=lambda f: (f / "DONE").exists()) as tmp:
            other_process_wins(tmp)
    else:
        with pytest.raises(OSError):
            with atomic_dir(target, done=lambda f: (f / "DONE").exists()) as tmp:
                other_process_wins(tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # our temporary copy is gone
    assert [p.name for p in target.iterdir()] == ["DONE" if complete else "partial"]
