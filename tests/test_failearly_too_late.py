"""Fail early, category "checked too late" (issue 10): evaluation settings, evaluation datasets and
the output / work folders are validated before the first training step, so a bad one costs
seconds, not a pretraining. Each case asserts the exit status, the message (what and where) and
that nothing was written (no run folder, no checkpoint, no record) or lost. Evaluation settings are
not part of the pretraining checkpoint's identity: fixing one can ``--resume``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.data import dataset_folder

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]
TINY += ["--set", "data.limit=64"]
SEED0 = Path("micro/simclr/default/seed0")


def invoke(*args: str) -> tuple[int, str]:
    """Exit status and output of the CLI; a traceback (any exception but SystemExit) fails the test."""
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def simclr(out: Path, work: Path, data_root: Path, *extra: str) -> list[str]:
    return ["run", "simclr", "--eval", "knn", *TINY, "--out", str(out), "--work-dir", str(work)] + [
        "--data-root",
        str(data_root),
        *extra,
    ]


def test_a_bad_evaluation_setting_fails_before_pretraining(tmp_path: Path, data_root: Path) -> None:
    code, out = invoke(*simclr(tmp_path / "rec", tmp_path / "runs", data_root, "--set", "eval.knn.kk=3"))
    assert code == 2 and "simclr/entry.yaml (variant 'default', scale 'micro'): eval.knn.kk: unknown key" in out
    assert "valid keys of KnnSettings: dataset, k," in out
    assert files(tmp_path) == {}  # no run folder, no checkpoint, no record


def test_a_missing_evaluation_dataset_fails_before_pretraining(tmp_path: Path, data_root: Path) -> None:
    code, out = invoke(
        *simclr(tmp_path / "rec", tmp_path / "runs", tmp_path / "data", "--set", "eval.knn.dataset=imagenet")
    )
    assert code == 2 and f"dataset 'imagenet' (eval.knn.dataset) not found at {tmp_path / 'data' / 'imagenet'}" in out
    assert "expected layout:" in out and files(tmp_path) == {}  # the training data was not even generated


def test_video_split_all_with_split_files_missing_fails_before_pretraining(tmp_path: Path, data_root: Path) -> None:
    """HMDB51 with split 3's files missing, ``--split all``: the error names the folder, first."""
    src = dataset_folder("synth_hmdb51", data_root)  # generated on first use (a fresh machine has none)
    dst = tmp_path / "data" / src.name
    dst.mkdir(parents=True)
    (dst / "videos").symlink_to(src / "videos")
    shutil.copy(src / ".cropbench-complete", dst)
    splits = dst / "testTrainMulti_7030_splits"
    shutil.copytree(src / "testTrainMulti_7030_splits", splits, ignore=shutil.ignore_patterns("*_split3.txt"))
    before = files(tmp_path)
    args = ["run", "vsimclr", "--eval", "hmdb51", "--split", "all", "--data-root", str(tmp_path / "data")]
    code, out = invoke(*args, "--out", str(tmp_path / "rec"), "--work-dir", str(tmp_path / "runs"))
    assert code == 2 and f"no *_test_split3.txt files in {splits}" in out
    assert files(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option", ["--out", "--work-dir"])
def test_an_output_folder_under_a_file_fails_before_pretraining(option: str, tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    folders = {"--out": tmp_path / "rec", "--work-dir": tmp_path / "runs"}
    folders[option] = tmp_path / "afile" / "sub"
    code, out = invoke(*simclr(folders["--out"], folders["--work-dir"], data_root))
    assert code == 2 and f"{option} {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" in out
    assert files(tmp_path) == {"afile": b"keep me"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("too_late")
    code, out = invoke(*simclr(tmp / "rec", tmp / "runs", data_root))
    assert code == 0, out
    return tmp


def test_fixing_an_evaluation_setting_resumes_the_pretrained_checkpoint(pretrained: Path, data_root: Path) -> None:
    tmp = pretrained
    ckpt = tmp / "runs" / SEED0 / "checkpoint.pt"
    first = json.loads((tmp / "rec/micro/simclr/default/knn/seed0.json").read_text())
    before = ckpt.read_bytes()
    code, out = invoke(*simclr(tmp / "rec", tmp / "runs", data_root, "--resume", "--set", "eval.knn.k=5"))
    assert code == 0, out
    assert f"resumed from {ckpt} at epoch 1 of 1" in out
    assert ckpt.read_bytes() == before  # nothing was trained again
    rec = json.loads((tmp / "rec/micro/simclr/default/knn/seed0.json").read_text())
    assert rec["provenance"]["recipe"]["eval"]["knn"]["k"] == 5 and rec["provenance"]["overrides"]["eval.knn.k"] == 5
    assert rec["pretrain"]["loss_first"] == first["pretrain"]["loss_first"] and rec["pretrain"]["steps"] == 2


def test_changing_a_pretraining_setting_cannot_resume_and_loses_nothing(pretrained: Path, data_root: Path) -> None:
    tmp = pretrained
    before = files(tmp)
    code, out = invoke(*simclr(tmp / "rec", tmp / "runs", data_root, "--resume", "--set", "optim.lr=0.5"))
    ckpt = tmp / "runs" / SEED0 / "checkpoint.pt"
    assert code == 2 and f"--resume: {ckpt} was written by a different recipe (pretraining hash" in out
    assert "use another --work-dir" in out
    after = files(tmp)
    assert {k: v for k, v in after.items() if not k.endswith("run.lock")} == {
        k: v for k, v in before.items() if not k.endswith("run.lock")
    }


def test_a_failing_later_seed_keeps_the_records_of_finished_seeds(
    pretrained: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are written as each seed finishes: seed 1 failing in pretraining loses nothing of seed 0."""
    import cropbench.runner as runner
    from cropbench.errors import TrainingError

    tmp, real = pretrained, runner._pretrain_seed

    def seed1_fails(spec, recipe, *args):  # type: ignore[no-untyped-def]
        if recipe.train.seed == 1:
            raise TrainingError("non-finite loss (nan) at epoch 1, step 1")
        return real(spec, recipe, *args)

    monkeypatch.setattr(runner, "_pretrain_seed", seed1_fails)
    (tmp / "rec/micro/simclr/default/knn/seed0.json").unlink()  # so only this run can write it
    code, out = invoke(*simclr(tmp / "rec", tmp / "runs", data_root, "--resume", "--seed", "0", "--seed", "1"))
    assert code == 2 and "Error: non-finite loss (nan) at epoch 1, step 1" in out
    seed0 = json.loads((tmp / "rec/micro/simclr/default/knn/seed0.json").read_text())
    assert seed0["seed"] == 0 and seed0["metrics"]["top1"] >= 0
    assert not (tmp / "rec/micro/simclr/default/knn/seed1.json").exists()
