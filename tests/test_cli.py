"""The click CLI end to end at micro scale (tiny overrides), and its errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cropbench.cli import cli
from cropbench.data.synth import GENERATOR_VERSION

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "--set",
    "train.epochs=1",
    "--set",
    "train.max_steps_per_epoch=2",
    "--set",
    "train.batch_size=16",
    "--set",
    "data.limit=64",
]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("cli")
    code, text = invoke(
        "run",
        "simclr",
        "--eval",
        "knn",
        *TINY,
        "--random-init",
        "--quiet",
        "--out",
        str(out / "records"),
        "--work-dir",
        str(out / "runs"),
        "--data-root",
        str(data_root),
    )
    assert code == 0, text
    return out


def test_list_reads_the_registries() -> None:
    for kind, name in (
        ("entries", "simclr"),
        ("methods", "mocov2"),
        ("evals", "knn"),
        ("datasets", "synth_images"),
        ("backbones", "resnet_micro"),
    ):
        code, text = invoke("list", kind)
        assert code == 0 and name in text


def test_show_prints_recipes_references_and_sources() -> None:
    code, text = invoke("show", "simclr")
    assert code == 0
    assert (
        "[paper] recipe" in text
        and "[micro] recipe" in text
        and "references:" in text
        and "google-research/simclr" in text
    )


def test_run_writes_records_with_provenance(run_out: Path) -> None:
    recs = {p.relative_to(run_out / "records").as_posix() for p in (run_out / "records").rglob("*.json")}
    assert recs == {"micro/simclr/default+random_init/knn/seed0.json", "micro/simclr/default/knn/seed0.json"}
    rec = json.loads((run_out / "records" / "micro/simclr/default/knn/seed0.json").read_text())
    assert set(rec["metrics"]) >= {"top1"} and 0 <= rec["metrics"]["top1"] <= 100
    assert rec["pretrain"]["steps"] == 2 and rec["pretrain"]["loss_first"] > 0
    prov = rec["provenance"]
    assert prov["recipe"]["train"]["epochs"] == 1 and prov["recipe_hash"] and prov["versions"]["torch"]
    assert (run_out / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt").exists()
    # the resolved protocol: the kNN Settings with its defaults (k, T), their hash, the method Config
    assert (prov["eval_settings"]["k"], prov["eval_settings"]["temperature"]) == (20, 0.07)  # DINO (knn.py)
    rand = json.loads((run_out / "records" / "micro/simclr/default+random_init/knn/seed0.json").read_text())
    assert len(prov["protocol_hash"]) == 16 and rand["provenance"]["protocol_hash"] == prov["protocol_hash"]
    assert prov["config"]["temperature"] == 0.5 and "weights" not in prov


def test_eval_is_a_command() -> None:
    code, text = invoke("eval", "--help")
    assert code == 0 and "WEIGHTS" in text and "--format" in text and "--entry" in text


def test_leaderboard_is_byte_identical_when_regenerated(run_out: Path, tmp_path: Path) -> None:
    for fmt in ("md", "csv", "latex", "html"):
        a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
        assert invoke("leaderboard", "--records", str(run_out / "records"), "--format", fmt, "--out", str(a))[0] == 0
        assert invoke("leaderboard", "--records", str(run_out / "records"), "--format", fmt, "--out", str(b))[0] == 0
        assert a.read_bytes() == b.read_bytes() and b"simclr" in a.read_bytes()


def test_check_passes_against_itself_and_fails_on_a_moved_metric(run_out: Path, tmp_path: Path) -> None:
    records = run_out / "records"
    golden = tmp_path / "golden"
    shutil.copytree(records, golden)
    shutil.copy(REPO / "results" / "golden" / "tolerances.yaml", golden / "tolerances.yaml")
    code, text = invoke("check", "--records", str(records), "--golden", str(golden))
    assert code == 0, text
    moved = golden / "micro" / "simclr" / "default" / "knn" / "seed0.json"
    rec = json.loads(moved.read_text())
    rec["metrics"]["top1"] += 25.0
    moved.write_text(json.dumps(rec))
    code, text = invoke("check", "--records", str(records), "--golden", str(golden))
    assert code == 1 and "top1" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown entry 'nope'; valid entries: "),
        (["run", "simclr", "--eval", "coco_nope"], "does not support evaluation 'coco_nope'"),
        (["run", "simclr", "--variant", "x"], "unknown variant of simclr 'x'"),
        (["run", "simclr", "--set", "train.epochz=1"], "train.epochz: unknown key"),
        (["show", "nope"], "unknown entry 'nope'"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_dataset_shows_the_expected_layout(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "simclr", "--set", "data.dataset=imagenet", "--data-root", str(tmp_path)])
    assert result.exit_code == 2
    assert f"not found at {tmp_path / 'imagenet'}" in result.output and "expected layout:" in result.output


def test_small_and_paper_scales_need_a_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --data-root and $CROPBENCH_DATA: an error; with $CROPBENCH_DATA: it is read."""
    monkeypatch.delenv("CROPBENCH_DATA")
    result = CliRunner().invoke(cli, ["run", "simclr", "--scale", "paper"])
    assert result.exit_code == 2 and "--scale paper reads real datasets: pass --data-root" in result.output
    monkeypatch.setenv("CROPBENCH_DATA", str(tmp_path))
    args = ["run", "simclr", "--scale", "paper", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and f"not found at {tmp_path / 'imagenet'}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    cls = tmp_path / "imagenet" / "train" / "n0001"
    cls.mkdir(parents=True)
    for i in range(15):  # 15 good + 1 bad = one batch of 16: the bad file is always read
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(cls / f"{i}.png")
    bad = cls / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "simclr",
            "--eval",
            "knn",
            "--set",
            "data.dataset=imagenet",
            *TINY,
            "--data-root",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "runs"),
            "--out",
            str(tmp_path / "rec"),
        ],
    )
    assert result.exit_code == 2
    assert f"cannot decode image {bad}" in result.output
    assert not (tmp_path / "rec").exists() or not list((tmp_path / "rec").rglob("*.json"))


def test_data_synth_materialises_a_dataset(tmp_path: Path) -> None:
    code, text = invoke("data", "synth", "--root", str(tmp_path), "--only", "synth_images")
    folder = tmp_path / f"synth_images-v{GENERATOR_VERSION}"
    assert code == 0 and str(folder) in text and (folder / "train" / "checker").is_dir()
    assert CliRunner().invoke(cli, ["data", "synth", "--only", "imagenet"]).exit_code == 2
