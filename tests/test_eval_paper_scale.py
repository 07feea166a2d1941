"""``cropbench eval`` on every image evaluation, at micro and at paper scale (issue 12's last gap).

(a) Micro: a checkpoint made here by a tiny ``cropbench run`` goes through the dense evaluations
(``coco``, ``voc``, ``cityscapes``) of ``cropbench eval`` with shrunk fine-tunes (a few
iterations, 64-px images); the same encoder re-packed in OpenSelfSup's DenseCL layout gives the
same COCO numbers under the ``densecl`` entry, bit for bit (same weights, same protocol, same seed),
and its kNN comes from the run's feature cache.

(b) Paper scale, on real-format data written here (ImageNet ``train/<wnid>/*.JPEG`` +
``val/<wnid>/``, COCO 2017 ``{train,val}2017/`` + ``annotations/instances_*2017.json``: the layouts
of tests/test_layouts.py): the paper backbone is part of the entry's recipe and ``cropbench eval``
accepts only ``--set eval.*``, so the weights are full ResNet-50s (torchvision's definition, seeded
init, BN statistics perturbed so that a dropped buffer changes the features), in two release
layouts with the official key names:

* DenseCL (OpenSelfSup) training checkpoint: mmcv ``{"meta", "state_dict"}`` with ``encoder_q.0.*``
  (backbone), ``encoder_q.1.mlp.*`` / ``encoder_q.1.mlp2.*`` (DenseCLNeck), ``encoder_k.*``,
  ``backbone.*`` (``self.backbone = self.encoder_q[0]``), ``queue``, ``queue_ptr``, ``queue2``,
  ``queue2_ptr`` [WXinlong/DenseCL@b64bbb6:openselfsup/models/densecl.py ``DenseCL.__init__``;
  openselfsup/models/necks.py ``DenseCLNeck``];
* MoCo v2: ``{"epoch", "arch", "state_dict", "optimizer"}`` with ``module.encoder_q.*`` (ResNet-50
  and its MLP ``fc.0`` / ``fc.2``), ``module.encoder_k.*``, ``module.queue``, ``module.queue_ptr``
  [facebookresearch/moco@5df3287:main_moco.py save_checkpoint; moco/builder.py ``MoCo.__init__``].

Sizes only where the converter never looks (the key encoder shares the query encoder's storage,
so a file holds one ResNet-50, ~100 MB; neck widths and queue lengths are shrunk: both are dropped
by name). kNN / linear settings are shrunk with ``--set eval.knn.*`` (image sizes, k) and
``eval.linear.*`` (2 epochs), COCO's R50-FPN fine-tune to 2 iterations at 64 px on 2 images.

Both layouts hold the same tensors, so the second evaluation must hit the feature cache of the
first (features are cached under a hash of the encoder's weights: no new cache entry = every
backbone tensor arrived) and give identical metrics. The same ResNet-50 is then written in every
other image release layout (OpenSelfSup's extracted backbone, SimSiam, torchvision, timm,
detectron2 ``.pkl``) and evaluated with kNN under its entry. Independent reference for every
paper-scale kNN: torchvision's ResNet-50 holding the same tensors, MoCo main_lincls's validation
transform on the JPEG files, and a per-query weighted kNN written from the formula; the cached
features must match it (``FEATURE_TOL``) and its top-1 must equal the record's. Each record
carries the weights' provenance (file, format, sha256 of the file) and the resolved settings.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from cropbench.cli import cli
from cropbench.data.images import IMAGENET_MEAN, IMAGENET_STD
from cropbench.records import load_records, protocol_hash
from tests.test_layouts import write_coco
from tests.test_weights import moco_to_detectron2

# max |cropbench - reference| / max |reference| over the features: 1.0e-6 / 1.2e-6 measured (val /
# train: uint8 normalisation vs ToTensor + Normalize in float32); a 1 % change of one BN buffer
# (layer4.2.bn3.running_var) moves it to 2.1e-3
FEATURE_TOL = 1e-5
WNIDS = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2

# paper-scale evaluation settings, shrunk (image sizes, k, epochs); dataset and everything else as the recipe
KNN_SET = {"eval.knn.k": 3, "eval.knn.resize": 40, "eval.knn.crop": 32}
LINEAR_SET = {"eval.linear.epochs": 2, "eval.linear.milestones": [1], "eval.linear.resize": 40, "eval.linear.crop": 32}


def as_args(name: str, values: dict[str, Any]) -> list[str]:
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}".replace(" ", ""))]
    return ["--eval", name, *sets]


PAPER_KNN, PAPER_LINEAR = as_args("knn", KNN_SET), as_args("linear", LINEAR_SET)


def _shrunk_detection(name: str) -> list[str]:
    """A 2-iteration fine-tune at 64 px (lr schedule inside it) with small heads."""
    keys = {
        "iterations": 2,
        "batch_size": 2,
        "steps": "[1]",
        "warmup_iters": 1,
        "train_min_sizes": "[64]",
        "test_min_size": 64,
        "max_size": 64,
        "precise_bn_iters": 1,
        "detections_per_image": 10,
        "log_every": 1,
        "rpn_batch_per_image": 32,
        "roi_batch_per_image": 16,
        "backend": "torchvision",  # on real data auto picks detectron2 where it is installed
    }
    return as_args(name, {f"eval.{name}.{k}": v for k, v in keys.items()})


SHRUNK_CITYSCAPES = {"iterations": 2, "batch_size": 2, "crop_size": "[64,64]", "test_stride": "[64,64]", "log_every": 1}
MICRO_DENSE = [*_shrunk_detection("coco"), *_shrunk_detection("voc")]
MICRO_DENSE += as_args("cityscapes", {f"eval.cityscapes.{k}": v for k, v in SHRUNK_CITYSCAPES.items()})
PAPER_COCO = _shrunk_detection("coco")
PAPER_COCO += ["--set", "eval.coco.fpn_channels=32", "--set", "eval.coco.box_head_dim=64"]
PAPER_COCO += ["--set", "eval.coco.mask_head_channels=16"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def eval_cli(weights: Path, out: Path, data_root: Path, *args: str) -> tuple[int, str]:
    work = ["--work-dir", str(out.parent / "runs")]  # one work dir per module: the feature cache is shared
    return invoke("eval", str(weights), *args, "--quiet", "--out", str(out), *work, "--data-root", str(data_root))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_provenance(rec: Any, weights: Path, fmt: str, scale: str, external: bool = True) -> None:
    """The record names the weights (file, format, sha256) and stores the resolved protocol."""
    w = rec.weights
    assert (w["file"], w["format"], w["sha256"]) == (weights.name, fmt, sha256(weights))
    assert rec.external_weights is external and rec.scale == scale
    settings = rec.provenance["eval_settings"]
    assert rec.protocol_hash == protocol_hash(rec.eval, settings)
    for key, value in settings.items():  # each --set value of this evaluation is in its settings
        assert rec.overrides.get(f"eval.{rec.eval}.{key}", value) == value, key
    assert rec.metrics and all(isinstance(v, float) for v in rec.metrics.values()), rec.metrics


# ----------------------------------------------------------------------------------------------
# Real-format data and paper-scale releases (built once per module)
# ----------------------------------------------------------------------------------------------


def write_imagenet(root: Path) -> None:
    """ILSVRC2012 as its tars unpack (val sorted into wnid folders): 3 classes of noise with a weak
    class colour, 4 train / 2 val images each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(WNIDS):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                shift = rng.integers(0, 96, (1, 1, 3))  # per-image colour cast: kNN top-1 83.3 %, not 100 %
                pixels = rng.integers(0, 128, (36, 48, 3)) + shift + 24 * np.eye(3, dtype=np.int64)[c]
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * n + i + 1:08d}.JPEG"
                Image.fromarray(pixels.astype(np.uint8)).save(folder / name, "JPEG")


def resnet50_backbone(seed: int) -> dict[str, Tensor]:
    """torchvision's ResNet-50 (seeded init), BN running statistics moved off their init values."""
    torch.manual_seed(seed)
    sd = torchvision.models.resnet50().state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith("running_mean"):
            v.copy_(0.1 * torch.randn(v.shape, generator=g))
        elif k.endswith("running_var"):
            v.copy_(0.5 + torch.rand(v.shape, generator=g))
        elif k.endswith("num_batches_tracked"):
            v.fill_(1000)
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def densecl_release(backbone: dict[str, Tensor], path: Path) -> Path:
    """DenseCL's (OpenSelfSup) training checkpoint; encoder_k shares encoder_q's storage (one copy on disk)."""
    neck = {
        "mlp.0.weight": torch.randn(64, 2048), "mlp.0.bias": torch.zeros(64),
        "mlp.2.weight": torch.randn(16, 64), "mlp.2.bias": torch.zeros(16),
        "mlp2.0.weight": torch.randn(64, 2048, 1, 1), "mlp2.0.bias": torch.zeros(64),
        "mlp2.2.weight": torch.randn(16, 64, 1, 1), "mlp2.2.bias": torch.zeros(16),
    }  # fmt: skip
    sd: dict[str, Tensor] = {}
    for enc in ("encoder_q", "encoder_k"):
        sd |= {f"{enc}.0.{k}": v for k, v in backbone.items()} | {f"{enc}.1.{k}": v for k, v in neck.items()}
    sd |= {f"backbone.{k}": v for k, v in backbone.items()}
    for q in ("queue", "queue2"):
        sd |= {q: torch.randn(16, 8), f"{q}_ptr": torch.zeros(1, dtype=torch.long)}
    meta = {"epoch": 200, "iter": 1000, "mmcv_version": "1.0.3", "time": "Thu Dec 30 2021"}
    torch.save({"meta": meta, "state_dict": sd, "optimizer": {"state": {}}}, path)
    return path


def moco_release(backbone: dict[str, Tensor], path: Path, hidden: int) -> Path:
    """facebookresearch/moco's MoCo v2 checkpoint; encoder_k shares encoder_q's storage."""
    q = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    q |= {"module.encoder_q.fc.0.weight": torch.randn(32, hidden), "module.encoder_q.fc.0.bias": torch.zeros(32)}
    q |= {"module.encoder_q.fc.2.weight": torch.randn(16, 32), "module.encoder_q.fc.2.bias": torch.zeros(16)}
    k = {key.replace("encoder_q", "encoder_k"): v for key, v in q.items()}
    sd = q | k | {"module.queue": torch.randn(16, 8), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def reference_features(backbone: dict[str, Tensor], folder: Path) -> tuple[Tensor, Tensor]:
    """Independent reference: torchvision's ResNet-50 (``fc`` = identity) holding the backbone
    tensors, MoCo main_lincls's validation transform (Resize, CenterCrop, ToTensor, Normalize)
    [facebookresearch/moco@5df3287:main_lincls.py], on the ImageFolder files read with PIL."""
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    net.load_state_dict(backbone, strict=True)
    tf = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    x = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        return net.eval()(x), torch.tensor(images.targets)


def naive_weighted_knn(bank: Tensor, bank_y: Tensor, query: Tensor, k: int, t: float, n_classes: int) -> Tensor:
    """MoCo colab's weighted kNN, one query at a time: cosine top-k, votes exp(sim / T) per class."""
    preds = []
    for q in query:
        sims = [float(torch.dot(q / q.norm(), b / b.norm())) for b in bank]
        top = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in top:
            votes[int(bank_y[i])] += math.exp(sims[i] / t)
        preds.append(max(range(n_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def check_knn_against_reference(ref: dict[str, tuple[Tensor, Tensor]], cache: Path, rec: Any) -> None:
    """The cached paper-scale features equal the reference pipeline's, and the naive kNN on the
    reference features (the record's resolved k and T) gives the record's top-1."""
    blobs = [torch.load(p, weights_only=True) for p in sorted(cache.iterdir())]
    by_rows = {len(b["labels"]): b for b in blobs}  # 12 train rows, 6 val rows
    assert sorted(by_rows) == [VAL_PER_CLASS * len(WNIDS), TRAIN_PER_CLASS * len(WNIDS)]
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        got, (want, labels) = by_rows[n * len(WNIDS)], ref[split]
        assert torch.equal(got["labels"], labels)
        err = (got["feats"] - want).abs().max() / want.abs().max()
        assert err < FEATURE_TOL, (split, float(err))
    (bank, bank_y), (query, query_y) = ref["train"], ref["val"]
    s = rec.provenance["eval_settings"]
    preds = naive_weighted_knn(bank, bank_y, query, s["k"], s["temperature"], len(WNIDS))
    assert rec.metrics["top1"] == pytest.approx(100.0 * float((preds == query_y).float().mean()), abs=1e-9)


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A data root with real-format ImageNet and COCO, and one ResNet-50 in two release layouts."""
    root = tmp_path_factory.mktemp("paper")
    data = root / "data"
    write_imagenet(data)
    write_coco(data)
    backbone = resnet50_backbone(0)
    return {
        "root": root,
        "data": data,
        "n_backbone": len(backbone),
        "backbone": backbone,
        "densecl": densecl_release(backbone, root / "densecl_r50_epoch_200.pth"),
        "moco": moco_release(backbone, root / "moco_v2_200ep_pretrain.pth.tar", 2048),
    }


@pytest.fixture(scope="module")
def reference(paper: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """split -> the reference pipeline's (features, labels) of the paper fixture's ResNet-50."""
    return {s: reference_features(paper["backbone"], paper["data"] / "imagenet" / s) for s in ("train", "val")}


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """A tiny simclr run (kNN only, k=5) and its checkpoint."""
    root = tmp_path_factory.mktemp("micro")
    tiny = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "train.batch_size=16"]
    tiny += ["--set", "data.limit=64", "--eval", "knn", "--set", "eval.knn.k=5"]
    common = ["--quiet", "--work-dir", str(root / "runs"), "--data-root", str(data_root)]
    code, text = invoke("run", "simclr", *tiny, "--out", str(root / "run_records"), *common)
    assert code == 0, text
    ckpt = root / "runs" / "micro" / "simclr" / "default" / "seed0" / "checkpoint.pt"
    assert ckpt.is_file()
    return {"root": root, "ckpt": ckpt}


# ----------------------------------------------------------------------------------------------
# (a) micro: the dense evaluations through `cropbench eval`
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dense_evaluations_of_our_micro_checkpoint(micro: dict[str, Path], data_root: Path) -> None:
    """coco, voc and cityscapes on our checkpoint: one record each with provenance and the shrunk,
    resolved settings (the defaults filled in, the --set values in the record's overrides)."""
    out = micro["root"] / "dense_ours"
    code, text = eval_cli(micro["ckpt"], out, data_root, "--entry", "simclr", *MICRO_DENSE)
    assert code == 0, text
    recs = {r.eval: r for r in load_records(out)}
    assert sorted(recs) == ["cityscapes", "coco", "voc"]
    for rec in recs.values():
        check_provenance(rec, micro["ckpt"], "cropbench", "micro", external=False)
    coco, voc, cs = (recs[n].provenance["eval_settings"] for n in ("coco", "voc", "cityscapes"))
    assert (coco["dataset"], coco["iterations"], coco["backend"], coco["arch"]) == (
        "synth_coco",
        2,
        "torchvision",
        "fpn",
    )
    assert coco["lr_batch"] == 16 and coco["train_min_sizes"] == [64]  # a default, and a --set value
    assert (voc["dataset"], voc["iterations"], voc["arch"], voc["masks"]) == ("synth_voc", 2, "c4", False)
    assert (cs["dataset"], cs["iterations"], cs["crop_size"], cs["head_channels"]) == (
        "synth_cityscapes",
        2,
        [64, 64],
        64,
    )
    assert set(recs["coco"].metrics) >= {"bbox_AP", "segm_AP"} and set(recs["cityscapes"].metrics) == {"mIoU", "aAcc"}
    assert recs["voc"].overrides["eval.voc.iterations"] == 2 and recs["coco"].overrides["train.epochs"] == 1


@pytest.mark.slow
def test_dense_evaluation_of_a_micro_release_layout(micro: dict[str, Path], data_root: Path) -> None:
    """The checkpoint's encoder as an OpenSelfSup release (``backbone.*`` plus the query / key
    encoders and queues), evaluated under the densecl entry: the same COCO numbers as our own
    checkpoint under simclr (same weights, protocol and seed), and kNN from the run's feature cache.

    The cache is the check that every tensor arrived: a 2-iteration COCO AP is too coarse for it
    (measured: +0.01 on one BN weight, layer4.0.bn1.weight, leaves every AP unchanged), while any
    change of any tensor changes the cache key."""
    encoder = torch.load(micro["ckpt"], weights_only=True)["encoder"]
    release = micro["root"] / "densecl_micro_epoch_16.pth"
    sd = {f"backbone.{k}": v for k, v in encoder.items()} | {f"encoder_q.0.{k}": v for k, v in encoder.items()}
    sd |= {f"encoder_k.0.{k}": v.clone() for k, v in encoder.items()} | {"queue": torch.randn(8, 4)}
    torch.save({"meta": {"epoch": 16}, "state_dict": sd}, release)
    coco, knn = _shrunk_detection("coco"), ["--eval", "knn", "--set", "eval.knn.k=5"]
    cached = sorted((micro["root"] / "runs" / "cache" / "features").iterdir())  # the run's kNN features
    code, text = eval_cli(micro["ckpt"], micro["root"] / "coco_ours", data_root, "--entry", "simclr", *coco)
    assert code == 0, text
    code, text = eval_cli(release, micro["root"] / "theirs", data_root, "--entry", "densecl", *knn, *coco)
    assert code == 0, text
    assert sorted((micro["root"] / "runs" / "cache" / "features").iterdir()) == cached
    (ours,), (ran,) = load_records(micro["root"] / "coco_ours"), load_records(micro["root"] / "run_records")
    theirs = {r.eval: r for r in load_records(micro["root"] / "theirs")}
    for rec in theirs.values():
        check_provenance(rec, release, "openselfsup", "micro")
        n = len(encoder)
        assert rec.weights["dropped"] == {"encoder_k.*": n, "encoder_q.*": n, "queue*": 1}
    assert theirs["coco"].protocol_hash == ours.protocol_hash and theirs["coco"].metrics == ours.metrics
    assert theirs["knn"].protocol_hash == ran.protocol_hash and theirs["knn"].metrics == ran.metrics


# ----------------------------------------------------------------------------------------------
# (b) paper scale on real-format data: ResNet-50 releases
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_scale_knn_and_linear_of_two_release_layouts(paper: dict[str, Any], reference: dict) -> None:
    """DenseCL's OpenSelfSup file under densecl, the same ResNet-50 as a MoCo v2 file under mocov2:
    knn and linear on ImageNet at paper scale, identical numbers, no new feature-cache entry, and
    features and kNN top-1 equal to the independent reference's."""
    out_d, out_m = paper["root"] / "densecl", paper["root"] / "mocov2"
    code, text = eval_cli(paper["densecl"], out_d, paper["data"], "--entry", "densecl", "--scale", "paper",
                          *PAPER_KNN, *PAPER_LINEAR)  # fmt: skip
    assert code == 0, text
    cache = paper["root"] / "runs" / "cache" / "features"
    cached = sorted(cache.iterdir())
    assert len(cached) == 2  # train + val features of the one encoder (the linear probe reuses kNN's)
    code, text = eval_cli(paper["moco"], out_m, paper["data"], "--entry", "mocov2", "--scale", "paper",
                          *PAPER_KNN, *PAPER_LINEAR)  # fmt: skip
    assert code == 0, text
    assert sorted(cache.iterdir()) == cached  # the same 320 backbone tensors arrived through both layouts
    d, m = load_records(out_d), load_records(out_m)
    assert [r.eval for r in d] == [r.eval for r in m] == ["knn", "linear"]
    n = paper["n_backbone"]
    for rd, rm in zip(d, m, strict=True):
        check_provenance(rd, paper["densecl"], "openselfsup", "paper")
        check_provenance(rm, paper["moco"], "mocov2", "paper")
        assert rd.metrics == rm.metrics and rd.protocol_hash == rm.protocol_hash
        assert all(math.isfinite(v) for v in rd.metrics.values()), rd.metrics
        assert rd.provenance["config"]["queue_size"] == 65536  # the paper recipe's Config, not a micro one
        assert rd.weights["dropped"] == {"encoder_k.*": n + 8, "encoder_q.*": n + 8, "queue*": 4}
    knn, linear = d[0].provenance["eval_settings"], d[1].provenance["eval_settings"]
    assert (knn["dataset"], knn["k"], knn["temperature"], knn["resize"], knn["crop"]) == ("imagenet", 3, 0.1, 40, 32)
    assert (linear["dataset"], linear["epochs"], linear["lr"], linear["milestones"]) == ("imagenet", 2, 30.0, [1])
    assert d[0].overrides == {**KNN_SET, **LINEAR_SET} == m[1].overrides  # every --set value, recorded
    check_knn_against_reference(reference, cache, d[0])
    assert m[0].weights["dropped"] == {"module.encoder_k.*": n + 4, "module.encoder_q.fc.*": 4, "module.queue*": 2}


@pytest.mark.slow
def test_paper_scale_coco_of_a_release_layout(paper: dict[str, Any]) -> None:
    """Mask R-CNN R50-FPN on the real COCO 2017 layout, at paper scale with a 2-iteration schedule."""
    out = paper["root"] / "coco"
    code, text = eval_cli(paper["densecl"], out, paper["data"], "--entry", "densecl", "--scale", "paper", *PAPER_COCO)
    assert code == 0, text
    (rec,) = load_records(out)
    check_provenance(rec, paper["densecl"], "openselfsup", "paper")
    s = rec.provenance["eval_settings"]
    assert (s["dataset"], s["iterations"], s["returned_layers"], s["anchor_sizes"]) == (
        "coco",
        2,
        [1, 2, 3, 4],
        [32, 64, 128, 256, 512],
    )  # the paper's R50-FPN except what was shrunk
    assert (s["fpn_channels"], s["test_min_size"], s["backend"]) == (32, 64, "torchvision")
    assert set(rec.metrics) == {
        f"{t}_{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")
    }


def simsiam_release(backbone: dict[str, Tensor], path: Path) -> Path:
    """facebookresearch/simsiam@a7bc177 main_simsiam.py: DDP(SimSiam) with ``encoder`` (ResNet-50,
    fc = the 3-layer projector) and ``predictor``; widths shrunk (dropped by name)."""

    def bn(prefix: str, d: int, affine: bool = True) -> dict[str, Tensor]:
        out = {f"{prefix}.running_mean": torch.zeros(d), f"{prefix}.running_var": torch.ones(d)}
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(7)
        return out | ({f"{prefix}.weight": torch.ones(d), f"{prefix}.bias": torch.zeros(d)} if affine else {})

    fc = {"fc.0.weight": torch.randn(32, 2048), "fc.3.weight": torch.randn(32, 32)} | bn("fc.1", 32) | bn("fc.4", 32)
    fc |= {"fc.6.weight": torch.randn(16, 32), "fc.6.bias": torch.zeros(16)} | bn("fc.7", 16, affine=False)
    pred = {"0.weight": torch.randn(8, 16), "3.weight": torch.randn(16, 8), "3.bias": torch.zeros(16)} | bn("1", 8)
    sd = {f"module.encoder.{k}": v for k, v in (backbone | fc).items()}
    sd |= {f"module.predictor.{k}": v for k, v in pred.items()}
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": sd, "optimizer": {"state": {}}}, path)
    return path


def classifier(backbone: dict[str, Tensor], prefix: str = "fc.") -> dict[str, Tensor]:
    """The backbone with an ImageNet classifier (1000 classes) under ``prefix``."""
    return backbone | {f"{prefix}weight": torch.randn(1000, 2048), f"{prefix}bias": torch.zeros(1000)}


def extracted_release(backbone: dict[str, Tensor], path: Path) -> None:
    """WXinlong/DenseCL@b64bbb6:tools/extract_backbone_weights.py (RegionCL's tool is the same)."""
    torch.save({"state_dict": backbone, "author": "RegionCL"}, path)


def torchvision_release(backbone: dict[str, Tensor], path: Path) -> None:
    """pytorch/vision torchvision/models/resnet.py: ``ResNet.state_dict()``, classifier ``fc``."""
    torch.save(classifier(backbone), path)


def timm_release(backbone: dict[str, Tensor], path: Path) -> None:
    """huggingface/pytorch-image-models timm/utils/checkpoint_saver.py: a train checkpoint with 'arch'."""
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": classifier(backbone, "head.fc."), "version": 2}, path)


def detectron2_release(backbone: dict[str, Tensor], path: Path) -> None:
    """A MoCo v2 file through facebookresearch/moco@c567ee4:detection/convert-pretrain-to-detectron2.py
    (tests/test_weights.py's independent string-replace copy of its rules)."""
    moco = {f"module.encoder_q.{k}": v for k, v in classifier(backbone).items()}
    path.write_bytes(pickle.dumps(moco_to_detectron2(moco)))


# layout -> (entry, its variant, how the file is written, the key groups the record says were dropped)
LAYOUTS: dict[str, tuple[str, str, Any, dict[str, int]]] = {
    "openselfsup_backbone": ("regioncl", "m", extracted_release, {}),
    "simsiam": ("simsiam", "default", simsiam_release, {"module.encoder.fc.*": 17, "module.predictor.*": 8}),
    "torchvision": ("supervised", "default", torchvision_release, {"fc.*": 2}),
    "timm": ("supervised", "default", timm_release, {"head.*": 2}),
    "detectron2": ("mocov2", "default", detectron2_release, {"stem.fc.*": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_paper_scale_knn_of_every_other_release_layout(
    paper: dict[str, Any], reference: dict, tmp_path: Path, layout: str
) -> None:
    """The fixture's ResNet-50 in each remaining release layout, under the entry it belongs to, at
    paper scale: the features equal the reference pipeline's (every backbone tensor arrived)."""
    entry, variant, write, dropped = LAYOUTS[layout]
    weights = tmp_path / f"{layout}_r50.pth"
    write(paper["backbone"], weights)
    args = ("--entry", entry, "--variant", variant, "--scale", "paper", *PAPER_KNN)
    code, text = eval_cli(weights, tmp_path / "out", paper["data"], *args)
    assert code == 0, text
    (rec,) = load_records(tmp_path / "out")
    check_provenance(rec, weights, layout, "paper")
    assert (rec.entry, rec.variant) == (entry, variant) and rec.weights["dropped"] == dropped
    check_knn_against_reference(reference, tmp_path / "runs" / "cache" / "features", rec)
    weights.unlink()  # ~100 MB
