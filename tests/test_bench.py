"""``cropbench bench``: the printed structure and JSON of a quick run (not its timings), and its
building blocks against independent references: the inline NT-Xent against a naive loop of SimCLR's
eq. 1 (Chen et al. 2020, arXiv 2002.05709), FLOP counting against hand counts, the A B / B A
interleaving, the peak-memory probe, the bf16 peak table (NVIDIA datasheets, dense)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cropbench import bench as B
from cropbench.cli import cli
from cropbench.dist import DistContext
from cropbench.methods.losses import nt_xent
from cropbench.views.image import ViewConfig

QUICK = ["bench", "--quick", "--only", "views,step,linear", "--threads", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    result = CliRunner().invoke(cli, [*QUICK, "--json", str(path)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(path.read_text())


def test_quick_run_prints_every_section_with_targets(quick_run: tuple[str, dict]) -> None:
    out, _ = quick_run
    for header in ("== views", "== step", "== linear"):
        assert header in out
    assert "== gpu" not in out and "== e2e" not in out  # not asked for
    assert out.count("target >= 3x") == 1 and out.count("target >= 1.5x") == 1 and "target >= 10x" in out
    assert "first-step loss" in out and "GFLOP/step" in out and "top1: cached" in out
    assert "targets:" in out and "wrote " in out


def _check_side(side: dict, repeats: int) -> None:
    assert side["median_s"] > 0 and side["images_per_s"] > 0 and side["peak_mib"] > 0
    assert len(side["times_s"]) == repeats and all(t > 0 for t in side["times_s"])
    assert math.isclose(side["images_per_s"], side["images"] / side["median_s"])


def test_quick_json_views_same_images_shapes_and_dtypes(quick_run: tuple[str, dict]) -> None:
    _, report = quick_run
    assert set(report) == {"meta", "sections", "errors", "misses"} and report["errors"] == {}
    assert report["meta"]["threads"] == 1 and report["meta"]["quick"] is True
    assert report["meta"]["sections"] == ["views", "step", "linear"]
    rows = report["sections"]["views"]
    assert [r["size"] for r in rows] == [32, 224] and [r["target"] for r in rows] == [3.0, 1.5]
    for r in rows:
        ours, ref = r["ours"], r["reference"]
        _check_side(ours, 3)
        _check_side(ref, 3)
        # what each side really produced: one normalised float view per canvas
        assert ours["out_shape"] == ref["out_shape"] == [r["batch"], 3, r["size"], r["size"]]
        assert ours["out_dtype"] == ref["out_dtype"] == "torch.float32"
        assert math.isclose(r["ratio"], ref["median_s"] / ours["median_s"])
        assert r["passed"] == (r["ratio"] >= r["target"])


def test_quick_json_step_is_the_same_model_and_views(quick_run: tuple[str, dict]) -> None:
    (row,) = quick_run[1]["sections"]["step"]
    _check_side(row["ours"], 3)
    _check_side(row["reference"], 3)
    assert row["ours"]["out_shape"] == row["reference"]["out_shape"] == []  # the scalar loss
    assert row["backbone"] == "resnet_micro" and row["batch"] == 64 and row["view_size"] == 32
    # same initial weights, same views, same loss formula: the first losses agree (measured: bit-equal)
    assert row["first_loss_ours"] == pytest.approx(row["first_loss_reference"], abs=1e-5)
    assert row["flops_per_step"] > 0 and row["peak_fraction"] is None  # no bf16 peak on CPU


def test_quick_json_linear_equal_top1(quick_run: tuple[str, dict]) -> None:
    (row,) = quick_run[1]["sections"]["linear"]
    _check_side(row["ours"], 2)  # cached, per-epoch, cached: A B A
    _check_side(row["reference"], 1)
    assert row["epochs"] == 5 and row["train_images"] > 0 and row["target"] == 10.0
    assert abs(row["top1_ours"] - row["top1_reference"]) <= B.TOP1_TOLERANCE and row["equal"] is True
    assert row["top1_ours"] > 10.0  # above chance (10 classes): the probe learned something to compare


def test_nt_xent_plain_matches_the_naive_formula_and_cropbench() -> None:
    g = torch.Generator().manual_seed(0)
    z, tau = torch.randn(10, 7, generator=g), 0.3
    n2 = z.shape[0]
    u = z / z.norm(dim=1, keepdim=True)
    terms = []
    for i in range(n2):  # -log exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau), p = i ± N
        p = (i + n2 // 2) % n2
        den = sum(math.exp(float(u[i] @ u[k]) / tau) for k in range(n2) if k != i)
        terms.append(-math.log(math.exp(float(u[i] @ u[p]) / tau) / den))
    naive = sum(terms) / n2
    assert float(B.nt_xent_plain(z, tau)) == pytest.approx(naive, rel=1e-5)
    z1, z2 = z.chunk(2)
    assert float(nt_xent(z1, z2, tau, DistContext())) == pytest.approx(naive, rel=1e-5)


def test_forward_flops_hand_counted() -> None:
    lin = torch.nn.Linear(8, 4)
    assert B.forward_flops(lambda: lin(torch.randn(5, 8))) == 2 * 5 * 8 * 4
    conv = torch.nn.Conv2d(3, 6, 3)  # 10x10 -> 8x8, 6 outputs of 3*3*3 multiply-adds each
    assert B.forward_flops(lambda: conv(torch.randn(1, 3, 10, 10))) == 2 * 8 * 8 * 6 * 27


def test_interleave_alternates_after_warmup_and_keeps_outputs() -> None:
    calls: list[str] = []

    def side(name: str):  # noqa: ANN202
        return lambda: calls.append(name) or len(calls)

    a, b = B.interleave(side("A"), side("B"), repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]
    assert len(a.times_s) == len(b.times_s) == 3
    assert (a.first, b.first, a.last, b.last) == (1, 2, 7, 8)
    assert a.median_s == sorted(a.times_s)[1]


def test_memory_probe_sees_a_fresh_allocation() -> None:
    mem = B.Memory(torch.device("cpu"))
    if not mem.resettable:
        pytest.skip("no /proc/self/clear_refs: the peak RSS cannot be reset here")
    before = mem.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert mem.peak() - before > 50
    del x


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_bf16_peak_table(monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: name)
    assert B.peak_tflops(torch.device("cuda")) == (name, peak)


def test_torchvision_pipeline_has_the_configs_ops() -> None:
    import torchvision.transforms.v2 as T

    def kinds(cfg: ViewConfig) -> list[str]:
        ops = B.torchvision_pipeline(cfg).transforms
        return [type(o.transforms[0] if isinstance(o, T.RandomApply) else o).__name__ for o in ops]

    base = ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandomGrayscale"]
    tail = ["ToDtype", "Normalize"]
    assert kinds(ViewConfig(size=32, blur_p=0.0)) == base + tail
    assert kinds(ViewConfig(size=224, blur_p=0.5, solarize_p=0.2)) == base + ["GaussianBlur", "RandomSolarize"] + tail
    out = B.torchvision_pipeline(ViewConfig(size=16))(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_bad_only_and_bad_set_are_errors_before_anything_runs() -> None:
    result = CliRunner().invoke(cli, ["bench", "--only", "views,fast"])
    assert result.exit_code == 2 and "--only 'views,fast'" in result.output and "views, step, linear" in result.output
    result = CliRunner().invoke(cli, ["bench", "--set", "train.epochz=1", "--only", "step"])
    assert result.exit_code == 2 and "epochz" in result.output and "==" not in result.output


def test_strict_exits_1_on_a_missed_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def slow_views(_opts, _device, echo):  # noqa: ANN001, ANN202 - a section that misses its target
        run = B.Run(times_s=[1.0], first=torch.zeros(2), last=torch.zeros(2))
        c = B.Comparison("views", "fake", run, run, ("a", "b"), 2, target=3.0)
        echo(c.line())
        return [c]

    monkeypatch.setitem(B.RUNNERS, "views", slow_views)
    args = ["bench", "--only", "views", "--json", str(tmp_path / "b.json")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "1.00x  target >= 3x FAIL" in result.output and "MISS views fake" in result.output
    result = CliRunner().invoke(cli, [*args, "--strict"])
    assert result.exit_code == 1
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["misses"] == ["views fake: 1.00x < 3x"] and report["sections"]["views"][0]["passed"] is False


def _git_head() -> str | None:
    import subprocess

    try:
        repo = Path(B.__file__).parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.mark.slow
def test_e2e_against_a_revision_runs_that_revisions_code(tmp_path: Path) -> None:
    """``--against HEAD`` installs HEAD from git archive and runs the same command with it: on a clean
    checkout both sides are the same code, so the same seed gives the same kNN top-1 and step count."""
    head = _git_head()
    if head is None:
        pytest.skip("not a git checkout")
    path = tmp_path / "e2e.json"
    args = ["bench", "--quick", "--only", "e2e", "--against", "HEAD", "--threads", "1", "--json", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "this code vs HEAD" in result.output and "target >= 1.3x" in result.output
    (c,) = json.loads(path.read_text())["sections"]["e2e"]
    assert c["against"] == "HEAD" and c["target"] == 1.3
    assert c["steps"] == {"ours": 50, "reference": 50}  # --quick: 2 epochs of 25 steps, both sides
    assert c["knn_top1"]["ours"] == c["knn_top1"]["reference"] is not None
    for side in (c["ours"], c["reference"]):
        _check_side(side, 1)


def test_e2e_against_unequal_work_has_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A revision whose recipe runs a different number of steps is not compared against the target."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], env: dict, tmp: Path) -> dict:
        calls.append(cmd)
        ref = "PYTHONPATH" in env and env["PYTHONPATH"].startswith("/rev")
        record = {"provenance": {"recipe": {"backbone": "resnet_micro", "train": {"batch_size": 64}}}}
        return {"cmd": cmd, "record": record, "wall_s": 2.0 if ref else 1.0, "peak_mib": 10.0,
                "pretrain_wall_s": 1.0, "steps": 600 if ref else 400, "knn_top1": 50.0}  # fmt: skip

    monkeypatch.setattr(B, "install_revision", lambda rev, dest: Path("/rev/site"))
    monkeypatch.setattr(B, "run_e2e", fake_run)
    lines: list[str] = []
    opts = B.BenchOptions(only=("e2e",), against="abc123", e2e_repeats=2)
    (c,) = B.bench_e2e(opts, torch.device("cpu"), lines.append)
    assert c.ratio == 2.0 and c.target is None and c.passed is None
    assert any(
        "unequal work (ours 400 steps at batch 64 on resnet_micro, abc123 600 steps at batch 64 on resnet_micro)"
        in line
        for line in lines
    )
    assert len(calls) == 2 + 2 * 2  # one warm-up each, then A B, B A
    assert all(cmd[-2:] == ["--set", "train.epochs=1"] for cmd in calls[:2])
    # equal steps: a verdict against the target
    monkeypatch.setattr(B, "run_e2e", lambda cmd, env, tmp: {**fake_run(cmd, env, tmp), "steps": 400})
    (c,) = B.bench_e2e(opts, torch.device("cpu"), lines.append)
    assert c.target == B.E2E_TARGET and c.passed is True and c.images == 400 * 64

    # a different batch size is unequal work too, at equal steps
    def other_batch(cmd: list[str], env: dict, tmp: Path) -> dict:
        res = {**fake_run(cmd, env, tmp), "steps": 400}
        if env.get("PYTHONPATH", "").startswith("/rev"):
            res["record"] = {"provenance": {"recipe": {"backbone": "resnet_micro", "train": {"batch_size": 128}}}}
        return res

    monkeypatch.setattr(B, "run_e2e", other_batch)
    (c,) = B.bench_e2e(opts, torch.device("cpu"), lines.append)
    assert c.target is None and "at batch 128" in lines[-1]


def test_against_errors_before_anything_runs() -> None:
    result = CliRunner().invoke(cli, ["bench", "--only", "views", "--against", "HEAD"])
    assert result.exit_code == 2 and "--against compares the e2e section" in result.output
    if _git_head() is None:
        return
    with pytest.raises(B.CropbenchError, match="--against no-such-rev: not a commit"):
        B.install_revision("no-such-rev", Path("/nonexistent"))
    # an unknown revision stops the run before the sections that come first (views) start
    result = CliRunner().invoke(cli, ["bench", "--only", "views,e2e", "--against", "no-such-rev"])
    assert result.exit_code == 2 and "--against no-such-rev: not a commit" in result.output
    assert "==" not in result.output
