"""``cropbench eval WEIGHTS``: evaluation without pretraining, on (a) a micro checkpoint made here
by a tiny ``cropbench run`` and (b) the same weights re-packed in release layouts, with the real
key names of the official code:

* MoCo v2: ``{"epoch", "arch", "state_dict", "optimizer"}``, ``state_dict`` with
  ``module.encoder_q.*`` (the ResNet and its MLP ``fc.0`` / ``fc.2``), ``module.encoder_k.*``,
  ``module.queue``, ``module.queue_ptr`` [facebookresearch/moco@5df3287:main_moco.py save_checkpoint;
  moco/builder.py MoCo.__init__ (``fc = Sequential(Linear, ReLU, fc)`` with --mlp), DDP ``module.``];
  ``arch`` is left out here: the file holds the micro backbone, and a named architecture must match.
* torchvision: a plain ResNet ``state_dict`` with its classifier ``fc.weight`` / ``fc.bias``
  [pytorch/vision torchvision/models/resnet.py ``ResNet.fc``].

Same weights, same protocol -> bit-identical metrics: the strongest check that every backbone
tensor arrived. Records carry the weights' provenance and the resolved protocol; a crafted pickle
is refused with exit status 2 before any code in it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cropbench.cli import cli
from cropbench.records import load_records, protocol_hash

TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]
TINY += ["--set", "data.limit=64"]
KNN = ["--eval", "knn", "--set", "eval.knn.k=5"]  # k=5 keeps the vote cheap; T stays the default 0.07
LINEAR = ["--eval", "linear", "--set", "eval.linear.epochs=2", "--set", "eval.linear.milestones=[1]"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """A tiny simclr run (kNN at k=5 evaluated in the run itself) and its checkpoint."""
    root = tmp_path_factory.mktemp("evalcli")
    common = ["--quiet", "--work-dir", str(root / "runs"), "--data-root", str(data_root)]
    code, text = invoke("run", "simclr", *KNN, *TINY, "--out", str(root / "run_records"), *common)
    assert code == 0, text
    ckpt = root / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt"
    assert ckpt.is_file()
    return {"root": root, "ckpt": ckpt, "run_records": root / "run_records"}


def eval_cli(weights: Path, out: Path, data_root: Path, *args: str) -> tuple[int, str]:
    work = ["--work-dir", str(out.parent / "runs")]  # next to `trained`'s: its feature cache is shared
    return invoke("eval", str(weights), *args, "--quiet", "--out", str(out), *work, "--data-root", str(data_root))


def only_record(out: Path):
    (rec,) = load_records(out)
    return rec


def moco_release(encoder: dict[str, torch.Tensor], path: Path) -> Path:
    """``encoder`` packed as facebookresearch/moco's main_moco.py saves a MoCo v2 checkpoint."""
    q = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
    q |= {"module.encoder_q.fc.0.weight": torch.randn(32, 128), "module.encoder_q.fc.0.bias": torch.zeros(32)}
    q |= {"module.encoder_q.fc.2.weight": torch.randn(16, 32), "module.encoder_q.fc.2.bias": torch.zeros(16)}
    k = {key.replace("encoder_q", "encoder_k"): v.clone() for key, v in q.items()}
    sd = q | k | {"module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def checkpoint_encoder(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["encoder"]


def test_eval_of_our_checkpoint_reproduces_the_run(trained: dict[str, Path], data_root: Path) -> None:
    """Pretraining and evaluation as separate jobs give the run's own kNN numbers, bit for bit."""
    out = trained["root"] / "eval_ours"
    code, text = eval_cli(trained["ckpt"], out, data_root, "--entry", "simclr", *KNN)
    assert code == 0, text
    rec, (ran,) = only_record(out), load_records(trained["run_records"])
    assert rec.key == ran.key and rec.metrics == ran.metrics
    assert rec.provenance["recipe_hash"] == ran.provenance["recipe_hash"]  # the checkpoint's recipe
    assert rec.provenance["config"] == ran.provenance["config"]
    assert rec.weights["format"] == "cropbench" and rec.weights["file"] == "checkpoint.pt"
    assert not rec.external_weights and rec.provenance["external_weights"] is False
    assert rec.protocol_hash == ran.protocol_hash  # same protocol on both sides
    # the checkpoint was trained with --set train.*: the record says so (modified), as run's does
    assert rec.overrides == ran.overrides and rec.overrides["train.epochs"] == 1


def test_knn_record_stores_the_resolved_settings(trained: dict[str, Path]) -> None:
    """k and T (and every other default) are in the record and in its protocol hash."""
    (ran,) = load_records(trained["run_records"])
    s = ran.provenance["eval_settings"]
    assert (s["k"], s["temperature"], s["resize"], s["crop"], s["dataset"]) == (5, 0.07, 64, 56, "synth_images")
    assert ran.protocol_hash == protocol_hash("knn", s)
    assert protocol_hash("knn", {**s, "k": 200}) != ran.protocol_hash
    assert protocol_hash("knn", {**s, "temperature": 0.1}) != ran.protocol_hash
    cfg = ran.provenance["config"]  # the method's validated Config, defaults filled in
    assert cfg["temperature"] == 0.5 and cfg["views"]["size"] == 32 and cfg["views"]["solarize_p"] == 0.0


def test_eval_of_a_moco_v2_release_layout(trained: dict[str, Path], data_root: Path, tmp_path: Path) -> None:
    """The run's encoder re-packed as a MoCo v2 release: same kNN and linear numbers as our own
    checkpoint; the record names the format, the mapping, what was dropped, and marks it external."""
    release = moco_release(checkpoint_encoder(trained["ckpt"]), tmp_path / "moco_v2_200ep_pretrain.pth.tar")
    ours, theirs = trained["root"] / "ours", trained["root"] / "theirs"
    code, text = eval_cli(trained["ckpt"], ours, data_root, "--entry", "mocov2", *KNN, *LINEAR)
    assert code == 0, text
    cached = sorted((trained["root"] / "runs" / "cache" / "features").iterdir())
    code, text = eval_cli(release, theirs, data_root, "--entry", "mocov2", *KNN, *LINEAR)
    assert code == 0, text
    # features are cached by a hash of the encoder's weights: no new entry = every tensor arrived
    assert sorted((trained["root"] / "runs" / "cache" / "features").iterdir()) == cached
    a, b = load_records(ours), load_records(theirs)
    assert [r.eval for r in b] == ["knn", "linear"]
    for r_ours, r_theirs in zip(a, b, strict=True):
        assert r_ours.metrics == r_theirs.metrics and r_ours.protocol_hash == r_theirs.protocol_hash
    rec = b[0]
    w = rec.weights
    assert rec.external_weights and w["format"] == "mocov2" and w["format_source"] == "auto"
    assert w["file"] == release.name and len(w["sha256"]) == 64 and "module.encoder_q." in w["mapping"]
    n_enc = len(checkpoint_encoder(trained["ckpt"]))
    assert w["dropped"] == {"module.encoder_k.*": n_enc + 4, "module.encoder_q.fc.*": 4, "module.queue*": 2}
    assert rec.overrides == {"eval.knn.k": 5, "eval.linear.epochs": 2, "eval.linear.milestones": [1]}
    assert b[1].provenance["eval_settings"]["epochs"] == 2 and b[1].provenance["eval_settings"]["lr"] == 30.0
    json.dumps(rec.provenance)


def test_supervised_entry_evaluates_torchvision_weights(
    trained: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    """The ``supervised`` entry's route at small / paper scale (torchvision weights through eval),
    here at micro on a torchvision-layout file with an explicit --format."""
    sd = checkpoint_encoder(trained["ckpt"]) | {"fc.weight": torch.randn(10, 128), "fc.bias": torch.zeros(10)}
    torch.save(sd, tmp_path / "resnet-supervised.pth")
    args = ("--entry", "supervised", "--format", "torchvision", *KNN)
    code, text = eval_cli(tmp_path / "resnet-supervised.pth", trained["root"] / "sup", data_root, *args)
    assert code == 0, text
    rec = only_record(trained["root"] / "sup")
    assert rec.entry == "supervised" and rec.external_weights
    assert rec.weights["format_source"] == "explicit" and rec.weights["dropped"] == {"fc.*": 2}
    assert rec.provenance["config"]["num_classes"] == 10


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(data_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _Exploit(marker)}, tmp_path / "evil.pth")
    code, text = eval_cli(tmp_path / "evil.pth", tmp_path / "out", data_root, "--entry", "simclr", *KNN)
    assert code == 2, text
    assert "evil.pth" in text and "refused" in text and "Traceback" not in text
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "train.epochs=2"), "--set train.epochs: cropbench eval evaluates trained weights"),
        (("--set", "eval.knn.kk=2"), "eval.knn.kk: unknown key"),
        (("--eval", "ucf101"), "does not support evaluation 'ucf101'"),
        (("--format", "nope"), "--format 'nope': expected auto or one of"),
    ],
)
def test_bad_input_is_a_clear_error(
    trained: dict[str, Path], data_root: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, text = eval_cli(trained["ckpt"], tmp_path / "out", data_root, "--entry", "simclr", *args)
    assert code == 2 and message in text, text


def test_missing_file_and_missing_backbone_key(trained: dict[str, Path], data_root: Path, tmp_path: Path) -> None:
    code, text = eval_cli(tmp_path / "nope.pth", tmp_path / "out", data_root, "--entry", "simclr")
    assert code == 2 and "nope.pth: no such file" in text, text
    enc = checkpoint_encoder(trained["ckpt"])
    del enc["layer1.0.conv1.weight"]
    release = moco_release(enc, tmp_path / "moco_v2_broken.pth.tar")
    code, text = eval_cli(release, tmp_path / "out", data_root, "--entry", "mocov2", *KNN)
    assert code == 2 and "layer1.0.conv1.weight" in text and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()


def test_eval_never_replaces_a_record_of_other_weights(trained: dict[str, Path], data_root: Path) -> None:
    """Records of a run and of released weights share a layout: eval refuses to overwrite the run's."""
    rec_before = (trained["run_records"] / "micro/simclr/default/knn/seed0.json").read_text()
    release = moco_release(checkpoint_encoder(trained["ckpt"]), trained["root"] / "release.pth.tar")
    code, text = eval_cli(release, trained["run_records"], data_root, "--entry", "simclr", *KNN)
    assert code == 2 and "holds a record of other weights" in text, text
    assert (trained["run_records"] / "micro/simclr/default/knn/seed0.json").read_text() == rec_before


def test_nproc_2_gives_the_same_numbers(trained: dict[str, Path], data_root: Path) -> None:
    """Two torch.distributed processes (gloo): each loads the weights itself; rank 0's record
    equals the single-process one."""
    out = trained["root"] / "nproc2"
    code, text = eval_cli(trained["ckpt"], out, data_root, "--entry", "simclr", "--nproc", "2", *KNN)
    assert code == 0, text
    (ran,) = load_records(trained["run_records"])
    assert only_record(out).metrics == ran.metrics
