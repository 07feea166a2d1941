"""kNN and linear evaluations against independent references: a naive per-query loop written from
the InstDisc rule, sklearn's KNeighborsClassifier and LogisticRegression, torchvision's own
Resize + CenterCrop eval transform; and the on-disk feature cache."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from torchvision import transforms

from cropbench.backbones import resnet_micro
from cropbench.config import from_dict
from cropbench.data.images import normalize
from cropbench.errors import ConfigError
from cropbench.evaluations.base import EvalData
from cropbench.evaluations.features import extract_features, topk_accuracy
from cropbench.evaluations.knn import knn_scores
from cropbench.evaluations.linear import LinearSettings, lr_at, probe_scores, train_probe
from cropbench.registry import EVALUATIONS


def _clusters(
    n: int, dim: int, classes: int, spread: float, seed: int, noise_seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: centres from ``seed``, noise from ``noise_seed`` (default: the same)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * 3
    g = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed + 1000)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


# ---- kNN ----


def _naive_knn(bank: np.ndarray, bank_y: np.ndarray, q: np.ndarray, k: int, t: float, c: int) -> np.ndarray:
    """One query at a time, straight from InstDisc Sec. 3.5: cosine sims, top k, votes exp(s/T)."""
    out = np.zeros((len(q), c))
    for i, x in enumerate(q):
        sims = [
            (float(x @ b) / (np.linalg.norm(x) * np.linalg.norm(b)), int(lab))
            for b, lab in zip(bank, bank_y, strict=True)
        ]
        for s, lab in sorted(sims, key=lambda p: -p[0])[:k]:
            out[i, lab] += math.exp(s / t)
    return out


def test_knn_scores_match_naive_loop_in_chunks() -> None:
    bank, bank_y = _clusters(120, 8, 5, 2.0, 0)
    q, _ = _clusters(23, 8, 5, 2.0, 0, noise_seed=1)
    ours = knn_scores(bank, bank_y, q, 5, k=15, temperature=0.1, chunk_size=4)  # 6 chunks, last ragged
    ref = _naive_knn(bank.double().numpy(), bank_y.numpy(), q.double().numpy(), 15, 0.1, 5)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-4)


def test_knn_predictions_match_sklearn_with_exp_weights() -> None:
    """sklearn's brute cosine kNN with weights exp((1 - d)/T) is the same rule (d = 1 - cos)."""
    bank, bank_y = _clusters(300, 16, 10, 3.0, 2)
    q, qy = _clusters(100, 16, 10, 3.0, 2, noise_seed=3)
    k, t = 20, 0.07
    sk = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t))
    sk.fit(bank.numpy(), bank_y.numpy())
    ours = knn_scores(bank, bank_y, q, 10, k, t)
    assert (ours.argmax(1).numpy() == sk.predict(q.numpy())).all()
    proba = torch.from_numpy(sk.predict_proba(q.numpy()))
    assert topk_accuracy(ours, qy) == topk_accuracy(proba, qy)
    assert 20 < topk_accuracy(ours, qy)["top1"] < 100  # not trivially saturated either way


def test_topk_accuracy_hand_computed() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.06, 0.04], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])  # label ranks: 1st, 2nd, 3rd, 3rd
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    assert acc["top1"] == 25.0
    assert acc["top2"] == 50.0
    assert acc["top5"] == 100.0  # only 3 classes: every row counts


def test_knn_bad_k_names_the_field() -> None:
    bank, y = _clusters(10, 4, 2, 1.0, 0)
    with pytest.raises(ConfigError, match="k must be in 1..10"):
        knn_scores(bank, y, bank, 2, k=200, temperature=0.1)


# ---- linear ----


def test_lr_schedule_matches_moco() -> None:
    s = LinearSettings()
    assert [lr_at(s, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    c = LinearSettings(schedule="cosine", lr=1.0, epochs=10)
    assert lr_at(c, 0) == 1.0 and lr_at(c, 5) == pytest.approx(0.5)


@pytest.mark.parametrize("feature_bn", [False, True])
def test_linear_probe_separates_separable_features(feature_bn: bool) -> None:
    x, y = _clusters(600, 32, 6, 0.3, 4)
    probe = train_probe(x, y, 6, LinearSettings(feature_bn=feature_bn), seed=0)  # MoCo defaults, lr 30
    xv, yv = _clusters(300, 32, 6, 0.3, 4, noise_seed=7)  # same centres, fresh noise
    assert topk_accuracy(probe_scores(probe, xv), yv)["top1"] >= 99.0


@pytest.mark.parametrize(
    "settings",
    [
        LinearSettings(lr=0.5, epochs=60, schedule="cosine", batch_size=64, weight_decay=1e-4),
        LinearSettings(),  # MoCo's lr 30 step schedule
    ],
    ids=["cosine", "moco"],
)
def test_linear_probe_close_to_sklearn_logistic_regression(settings: LinearSettings) -> None:
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(5, 20, generator=g)
    y, yv = torch.arange(800) % 5, torch.arange(400) % 5
    x, xv = (centres[lab] + 2.0 * torch.randn(len(lab), 20, generator=g) for lab in (y, yv))
    ours = topk_accuracy(probe_scores(train_probe(x, y, 5, settings, seed=1), xv), yv)["top1"]
    sk = LogisticRegression(C=10.0, max_iter=2000).fit(x.numpy(), y.numpy())
    ref = 100.0 * (sk.predict(xv.numpy()) == yv.numpy()).mean()
    assert 60 < ref < 95  # overlapping classes: room to be worse than the optimum
    assert abs(ours - ref) <= 3.0


# ---- features, cache, end to end ----


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-class ImageFolder with non-square images, under the registered 'imagenet' name."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for c in ("a", "b"):
            (root / "imagenet" / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (45, 61) if i % 2 else (70, 50)
                base = rng.integers(0, 255, (h, w, 3)) // (1 if c == "a" else 3)
                Image.fromarray(base.astype(np.uint8)).save(root / "imagenet" / split / c / f"{i}.png")
    return root


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet_micro(widths=(8, 8, 16, 16))


def test_features_equal_torchvision_eval_transform(tiny_root: Path) -> None:
    enc = _encoder().train()
    feats, labels = extract_features(enc, "imagenet", EvalData(tiny_root), "val", resize=36, crop=32, batch_size=5)
    assert enc.training  # mode restored
    tf = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.PILToTensor()])
    folder = sorted((tiny_root / "imagenet" / "val").glob("*/*.png"))
    ref_x = torch.stack([tf(Image.open(p).convert("RGB")) for p in folder])
    with torch.no_grad():
        ref = enc.eval()(normalize(ref_x))
    assert feats.shape == (12, 16) and feats.dtype == torch.float32
    assert labels.tolist() == [0] * 6 + [1] * 6
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)


def test_feature_cache_hit_and_invalidation(tiny_root: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    data = EvalData(tiny_root, cache_dir=tmp_path, log=logs.append)
    enc = _encoder()
    first = extract_features(enc, "imagenet", data, "train")
    again = extract_features(enc, "imagenet", data, "train")
    assert any("cache hit" in m for m in logs[1:]) and not any("cache hit" in m for m in logs[:1])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    files = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert len(files) == 1 and files[0].endswith(".pt")  # no temporary files left behind
    (tmp_path / "features" / files[0]).write_bytes(b"not a torch file")  # damaged: recomputed
    assert torch.equal(extract_features(enc, "imagenet", data, "train")[0], first[0])
    assert "ignoring unreadable cache file" in logs[-2] and "extracted" in logs[-1]
    with torch.no_grad():
        enc.bn1.running_mean += 1.0  # a buffer change is a different encoder
    extract_features(enc, "imagenet", data, "train")
    extract_features(enc, "imagenet", data, "train", resize=72)  # a different transform
    assert len(list((tmp_path / "features").iterdir())) == 3


def test_crop_larger_than_resize_is_an_error(tiny_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"crop \(40\) must be <= resize \(36\)"):
        extract_features(_encoder(), "imagenet", EvalData(tiny_root), "val", resize=36, crop=40)


@pytest.mark.parametrize("name", ["knn", "linear"])
def test_registered_evaluation_end_to_end(name: str, tiny_root: Path) -> None:
    ev = EVALUATIONS.get(name)
    raw = {
        "dataset": "imagenet",
        **({"k": 5} if name == "knn" else {"epochs": 50, "lr": 1.0, "schedule": "cosine", "batch_size": 8}),
    }
    settings = from_dict(ev.Settings, raw, "test")
    out = ev.evaluate(_encoder(), settings, EvalData(tiny_root, seed=3))
    assert set(out) == ({"top1", "top5"} | ({"top1_best"} if name == "linear" else set()))
    assert all(isinstance(v, float) for v in out.values())
    assert out["top1"] >= 75.0  # the two classes differ in brightness; top5 is 100 with 2 classes
    assert out == ev.evaluate(_encoder(), settings, EvalData(tiny_root, seed=3))  # deterministic


def test_linear_reports_last_and_best_epoch_against_truncated_runs(tiny_root: Path) -> None:
    """Naive reference: with a step schedule the first e epochs of an E-epoch run are exactly an
    e-epoch run (same seed, same shuffles, same lr), so train e = 1..E epochs separately and take
    the last (``top1``) and the maximum (``top1_best``, MoCo main_lincls ``best_acc1``)."""
    settings = LinearSettings(dataset="imagenet", epochs=4, lr=30.0, milestones=(6,), batch_size=4)
    data = EvalData(tiny_root, seed=3)
    out = EVALUATIONS.get("linear").evaluate(_encoder(), settings, data)
    tx, ty = extract_features(_encoder(), "imagenet", data, "train")
    vx, vy = extract_features(_encoder(), "imagenet", data, "val")
    accs = []
    for e in range(1, 5):
        probe = train_probe(tx, ty, 2, replace(settings, epochs=e), seed=3)
        accs.append(topk_accuracy(probe_scores(probe, vx), vy)["top1"])
    assert out["top1"] == pytest.approx(accs[-1]) and out["top1_best"] == pytest.approx(max(accs))
    assert max(accs) > accs[-1]  # this run's best epoch is not its last: the two rules differ


def test_regioncl_linear_references_are_checked_against_the_best_epoch(tmp_path: Path) -> None:
    """RegionCL's README 69.4 is its log's best epoch (Annbless/RegionCL@61bbcab
    logs/Linear-RegionCLM.log: 69.30 last, 69.37 best): ``cropbench check`` must compare it with
    ``top1_best``, not with the last epoch's ``top1``."""
    from cropbench.checks import check
    from cropbench.records import Record, write_record

    records, golden = tmp_path / "records", tmp_path / "golden"
    golden.mkdir()
    metrics = {"top1": 60.0, "top5": 90.0, "top1_best": 69.3}  # last epoch far off, best within 1
    write_record(records, Record("regioncl", "m", "paper", "linear", 0, metrics, {}, 1.0, {}))
    report = check(records, golden, scale="paper")
    ours = [(m, ok) for m, ok in report.compared if m.key == "paper/regioncl/m/linear"]
    assert [(m.metric, ok) for m, ok in ours] == [("top1_best", True)]


def test_micro_feature_protocol_and_paper_presets() -> None:
    """Micro kNN is DINO's (k=20, T=0.07) on the 64-px canvas at 1x, centre crop 56 (7/8, as 224/256),
    for kNN and linear alike; the ``imagenet`` / ``cifar10`` presets keep MoCo's colab k=200, T=0.1
    and their own resolutions, so paper- and small-scale numbers do not move with the micro protocol."""
    knn, linear = EVALUATIONS.get("knn"), EVALUATIONS.get("linear")
    micro = knn.Settings()
    assert (micro.dataset, micro.k, micro.temperature, micro.resize, micro.crop) == ("synth_images", 20, 0.07, 64, 56)
    assert (linear.Settings().resize, linear.Settings().crop) == (64, 56)
    paper = from_dict(knn.Settings, {**knn.presets["imagenet"]}, "test")
    assert (paper.dataset, paper.k, paper.temperature, paper.resize, paper.crop) == ("imagenet", 200, 0.1, 256, 224)
    small = from_dict(knn.Settings, {**knn.presets["cifar10"]}, "test")
    assert (small.k, small.temperature, small.resize, small.crop) == (200, 0.1, 32, 32)
    assert "k" not in linear.presets["imagenet"]  # the linear probe has no k
