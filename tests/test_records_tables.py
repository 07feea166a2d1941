"""Records (atomic, append-only in spirit, strict on load) and the tables generated from them."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cropbench.errors import CropbenchError
from cropbench.recipe import Recipe
from cropbench.records import (
    Record,
    RecordKey,
    collect_provenance,
    load_records,
    record_path,
    write_record,
)
from cropbench.tables import leaderboard, run_table, write_leaderboard


def rec(
    entry: str = "simclr",
    variant: str = "default",
    ev: str = "knn",
    seed: int = 0,
    scale: str = "micro",
    deviations: dict | None = None,
    ips: float = 100.0,
    **metrics: float,
) -> Record:
    return Record(
        entry,
        variant,
        scale,
        ev,
        seed,
        metrics or {"top1": 50.0},
        {
            "loss_first": 5.5,
            "loss_last": 3.25,
            "epochs": 2,
            "steps": 10,
            "images_per_s": ips,
            "wall_s": 8.0,
        },
        1.5,
        {"recipe": {"method": "simclr", "deviations": deviations or {}}, "git_commit": None},
    )


# ---- records ----


def test_write_load_roundtrip_layout_and_format(tmp_path: Path) -> None:
    r = rec(top1=61.2, top5=95.0)
    path = write_record(tmp_path, r)
    assert path == tmp_path / "micro" / "simclr" / "default" / "knn" / "seed0.json"
    assert path == record_path(tmp_path, RecordKey("micro", "simclr", "default", "knn", 0))
    text = path.read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert load_records(tmp_path) == [r]


def test_rewrite_replaces_only_its_own_file(tmp_path: Path) -> None:
    a, b = rec(seed=0), rec(seed=1)
    write_record(tmp_path, a)
    pb = write_record(tmp_path, b)
    before = pb.read_bytes()
    write_record(tmp_path, replace(a, metrics={"top1": 70.0}))
    assert pb.read_bytes() == before
    assert [r.metrics["top1"] for r in load_records(tmp_path)] == [70.0, 50.0]


def test_exception_mid_write_leaves_old_record_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_record(tmp_path, rec())
    before = path.read_bytes()

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("cropbench.io.os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_record(tmp_path, rec(top1=99.0))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]


def test_process_killed_mid_write_never_shows_half_a_record(tmp_path: Path) -> None:
    """SIGKILL between writing the temporary file and renaming it: the old record stays whole."""
    write_record(tmp_path, rec())
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import cropbench.io\n"
        "import cropbench.records as R\n"
        "cropbench.io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "r = R.Record('simclr', 'default', 'micro', 'knn', 0, {'top1': 1.0}, {}, 0.0,\n"
        "             {'blob': 'x' * 10**6})\n"
        "R.write_record(Path(sys.argv[1]), r)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert [r.metrics["top1"] for r in load_records(tmp_path)] == [50.0]  # leftover .tmp ignored


def test_malformed_records_name_the_file(tmp_path: Path) -> None:
    path = write_record(tmp_path, rec())
    path.write_text('{"entry": "simclr", ')
    with pytest.raises(CropbenchError, match=re.escape(str(path))):
        load_records(tmp_path)
    data = json.loads(json.dumps(__import__("dataclasses").asdict(rec())))
    data["metrics"]["top1"] = "high"
    path.write_text(json.dumps(data))
    with pytest.raises(CropbenchError, match=re.escape(str(path)) + r".*metrics\.top1.*number"):
        load_records(tmp_path)
    data["metrics"]["top1"] = 1.0
    data["seed"] = 3  # content disagrees with the file name seed0.json
    path.write_text(json.dumps(data))
    with pytest.raises(CropbenchError, match="does not match its location"):
        load_records(tmp_path)


def test_provenance(tmp_path: Path) -> None:
    recipe = Recipe(method="simclr", backbone="resnet_micro")
    prov = collect_provenance(recipe.to_dict(), "cpu", ["cropbench", "run", "simclr"])
    assert prov["recipe_hash"] == recipe.hash()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert prov["git_commit"] == head.stdout.strip() and len(prov["git_commit"]) == 40
    assert isinstance(prov["git_dirty"], bool)
    assert prov["command"] == "cropbench run simclr" and prov["device"] == "cpu"
    assert set(prov["versions"]) == {"python", "torch", "torchvision", "cropbench", "numpy"}
    cpu = prov["cpu"]  # the arithmetic the floats came from: check names it when a one-seed golden differs
    assert cpu["model"] and cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["threads"] == torch.get_num_threads()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", prov["created_utc"])
    outside = collect_provenance({}, "cpu", "x", repo_dir=tmp_path)
    assert outside["git_commit"] is None and outside["git_dirty"] is None
    json.dumps(prov)  # serialisable as is


# ---- tables ----


REGIONCL_DEV = {"train.epochs": "3, not 200 (CPU)", "optim.lr": "x_y & z"}


def _records() -> list[Record]:
    return [
        rec(seed=0, top1=60.0, top5=90.0, ips=100.0),
        rec(seed=1, top1=62.0, top5=91.0, ips=110.0),
        rec(ev="linear", seed=0, top1=65.0, top5=95.0),
        rec(
            "regioncl",
            "regioncl_m",
            deviations=REGIONCL_DEV,
            top1=70.0,
        ),
        rec(variant="default+random_init", top1=14.2, top5=61.6),
        rec(scale="small", top1=80.0),
        rec("regioncl", "regioncl_m+random_init", deviations=REGIONCL_DEV, top1=20.0),
        rec("densecl", deviations={"train.epochs": "2"}, top1=30.0),
    ]


def test_leaderboard_md_numbers_marker_and_footnote() -> None:
    md = leaderboard(_records(), "md")
    assert md.index("## micro · image") < md.index("## small · image")
    row = next(line for line in md.splitlines() if line.startswith("| simclr/default "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # columns: entry/variant, knn/top1, knn/top5, linear/top1, linear/top5, img/s, seeds
    # two seeds: mean ± t(0.975, 1) * s / sqrt(2) (n=2): top1 [60, 62], s = 1.414 -> 12.71; top5 [90, 91] -> 6.35
    assert cells == [
        "simclr/default",
        "61.00 ± 12.71 (n=2)",
        "90.50 ± 6.35 (n=2)",
        "65.00",
        "95.00",
        "105.0",
        "2",
    ]
    # rows sort densecl < regioncl: one footnote per distinct deviation list, shared by rows
    assert "| densecl/default [1] " in md and "- [1] densecl/default: train.epochs: 2\n" in md
    assert "| regioncl/regioncl_m [2] " in md and "| regioncl/regioncl_m+random_init [2] " in md
    assert (
        "- [2] regioncl/regioncl_m, regioncl/regioncl_m+random_init: "
        "optim.lr: x_y & z; train.epochs: 3, not 200 (CPU)\n" in md
    )
    assert "[3]" not in md
    legend = "- cells: mean ± 95 % t-interval half-width over seeds (n = seeds); a plain value is one seed\n"
    assert md.count(legend) == 2  # under each table (micro, small)


def test_leaderboard_is_byte_identical_and_order_independent(tmp_path: Path) -> None:
    recs = _records()
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    for fmt in ("md", "csv", "latex", "html"):
        assert leaderboard(recs, fmt) == leaderboard(shuffled, fmt)
    path = write_leaderboard(recs, tmp_path / "LEADERBOARD.md")
    assert path.read_text() == leaderboard(recs, "md")
    assert write_leaderboard(shuffled, tmp_path / "LEADERBOARD.md").read_bytes() == path.read_bytes()


def test_leaderboard_other_formats() -> None:
    rows = list(csv.DictReader(io.StringIO(leaderboard(_records(), "csv"))))
    simclr = next(r for r in rows if r["entry"] == "simclr" and r["variant"] == "default" and r["scale"] == "micro")
    assert (simclr["knn/top1"], simclr["knn/top1:ci95"], simclr["knn/top1:n"], simclr["knn/top1:std"]) == (
        "61.0000",
        "12.7062",
        "2",
        "1.4142",
    )
    assert (simclr["linear/top1"], simclr["linear/top1:ci95"], simclr["linear/top1:n"], simclr["seeds"]) == (
        "65.0000",
        "",
        "1",
        "2",
    )
    latex = leaderboard(_records(), "latex")
    assert r"regioncl/regioncl\_m [2]" in latex and r"x\_y \& z" in latex and r"\toprule" in latex
    html = leaderboard(_records(), "html")
    assert "<td>61.00 ± 12.71 (n=2)" in html and "x_y &amp; z" in html
    with pytest.raises(CropbenchError, match="'xlsx' is not one of md, csv, latex, html"):
        leaderboard(_records(), "xlsx")


def test_run_table_puts_random_init_beside_pretrained() -> None:
    text = run_table([rec(top1=60.0, top5=90.0), rec(variant="default+random_init", top1=14.25, top5=61.5)])
    lines = [line.split() for line in text.splitlines()[2:]]
    assert lines == [
        ["simclr/default", "micro", "knn", "0", "top1", "60.00", "14.25", "+45.75"],
        ["simclr/default", "micro", "knn", "0", "top5", "90.00", "61.50", "+28.50"],
    ]


def test_committed_micro_leaderboard_is_regenerated_from_the_goldens() -> None:
    """results/leaderboard_micro.md must be exactly `cropbench leaderboard --records results/golden`."""
    from cropbench.records import load_records
    from cropbench.tables import leaderboard

    repo = Path(__file__).resolve().parents[1]
    committed = (repo / "results" / "leaderboard_micro.md").read_text()
    assert leaderboard(load_records(repo / "results" / "golden"), "md") == committed, (
        "stale: run `cropbench leaderboard --records results/golden --out results/leaderboard_micro.md`"
    )


def test_modified_records_are_marked_in_every_format() -> None:
    """A record run with ``--set`` overrides (``provenance.overrides``) is labelled ``(modified)``
    and its footnote / CSV column names the overrides; unmodified rows are unchanged."""
    one = rec(entry="byol", deviations={"optim.lr": "scaled"})
    one = replace(one, provenance={**one.provenance, "overrides": {"train.epochs": 1, "optim.lr": 0.001}})
    recs = [*_records(), one]
    md = leaderboard(recs, "md")
    assert "| byol/default (modified) [1] " in md
    assert "- [1] byol/default: modified by --set optim.lr=0.001, train.epochs=1; optim.lr: scaled\n" in md
    plain = leaderboard(_records(), "md")
    simclr_row = next(ln for ln in plain.splitlines() if ln.startswith("| simclr/default "))
    assert (
        md.count("(modified)") == 1
        and "(modified)" not in plain
        and simclr_row.split("|")[1:3]
        == next(ln for ln in md.splitlines() if ln.startswith("| simclr/default ")).split("|")[1:3]
    )
    rows = {(r["entry"], r["scale"]): r for r in csv.DictReader(io.StringIO(leaderboard(recs, "csv")))}
    assert rows[("byol", "micro")]["modified_by"] == "optim.lr=0.001; train.epochs=1"
    assert rows[("simclr", "micro")]["modified_by"] == ""
    assert "byol/default (modified) [1]" in leaderboard(recs, "html")


def test_load_records_of_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CropbenchError, match=f"records folder {tmp_path / 'nope'} does not exist"):
        load_records(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CropbenchError, match="is not a folder"):
        load_records(tmp_path / "file")
    assert load_records(tmp_path) == []  # an existing empty folder holds no records


def test_results_rows_never_mix_protocols_weights_or_overrides() -> None:
    """Same entry/variant/eval: records of another protocol hash, of external weights, or with
    ``--set`` overrides each get their own row; plain seeds of one protocol share one."""
    base = [rec(seed=s, top1=v) for s, v in ((0, 60.0), (1, 62.0))]
    for r in base:
        r.provenance["protocol_hash"] = "aaaa1111aaaa1111"
    other = replace(rec(seed=2, top1=40.0), provenance={"recipe": {}, "protocol_hash": "bbbb2222bbbb2222"})
    ext = replace(
        rec(seed=3, top1=70.0),
        provenance={
            "recipe": {},
            "protocol_hash": "aaaa1111aaaa1111",
            "weights": {"file": "released.pth", "sha256": "abcdef0123456789"},
            "external_weights": True,
        },
    )
    mod = replace(
        rec(seed=4, top1=10.0),
        provenance={"recipe": {}, "protocol_hash": "aaaa1111aaaa1111", "overrides": {"train.epochs": 1}},
    )
    md = leaderboard([*base, other, ext, mod], "md", "results")
    rows = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in md.splitlines() if ln.startswith("| simclr")}
    assert rows == {
        "simclr/default [1]": "61.00 ± 12.71 (n=2)",
        "simclr/default (protocol 2) [2]": "40.00",
        "simclr/default (modified) [3]": "10.00",
        "simclr/default (external:released.pth@abcdef01)": "70.00",
    }
    assert "- [1] simclr/default: protocol knn#aaaa1111\n" in md
    assert "- [2] simclr/default (protocol 2): protocol knn#bbbb2222\n" in md
    csv_rows = list(csv.DictReader(io.StringIO(leaderboard([*base, other, ext, mod], "csv"))))
    assert sorted((r["weights"], r["protocols"], r["knn/top1"]) for r in csv_rows) == [
        ("external:released.pth@abcdef01", "", "70.0000"),
        ("ours", "", "10.0000"),
        ("ours", "knn#aaaa1111", "61.0000"),
        ("ours", "knn#bbbb2222", "40.0000"),
    ]
