"""``train.compile``: the method's backbone and heads run under ``torch.compile`` while training.

Compiling (inductor) fuses and reorders float operations, so the numbers equal eager ones only to
float tolerance. Measured (tiny SimCLR below, fp32): one step's gradients differ from eager by at
most 9.7e-6 relative per tensor on an H200 (eager run-to-run: 2.5e-7); the first loss by 1.5e-4
(CPU: 1.4e-6); after 4 steps the last loss by 7.5e-3 of 6.9 (CPU: 0.02 of 6.05), as updates
amplify rounding (two eager GPU runs already differ by 3e-4 there). Tolerances: gradients 1e-4,
first loss 1e-4 relative, last loss 5 %. On CPU inductor compiles forward and backward for ~2.5
minutes on this machine's 2 shared cores, over the 60 s a default test may take: these tests run
where CUDA is present, or with CROPBENCH_COMPILE_TEST=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cropbench.config import from_dict
from cropbench.data.images import collate_images
from cropbench.dist import DistContext
from cropbench.recipe import Recipe
from cropbench.runner import build_method, build_train_set, method_context
from cropbench.trainer import CHECKPOINT, Trainer, compile_modules, views_generator

TINY = {
    "method": "simclr",
    "backbone": "resnet_micro",
    "backbone_args": {"widths": [8, 8, 16, 16]},
    "data": {"image_size": 32, "limit": 48},
    "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2, "log_every": 1, "amp": False},
    "optim": {"lr": 0.1, "base_batch": 16, "warmup_epochs": 0.5},
    "params": {"views": {"size": 16}, "hidden_dim": 32, "out_dim": 16},
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RUN = DEVICE.type == "cuda" or os.environ.get("CROPBENCH_COMPILE_TEST") == "1"


def _trainer(run_dir: Path, data_root: Path, compile: bool) -> Trainer:
    recipe = from_dict(Recipe, {**TINY, "train": {**TINY["train"], "compile": compile}})
    ds = build_train_set(recipe, data_root)
    method = build_method(recipe, method_context(recipe, len(ds), DistContext()))
    return Trainer(method, ds, recipe, run_dir, DEVICE, quiet=True)


def test_compile_is_not_part_of_the_checkpoint_identity() -> None:
    """A run may be resumed with compile toggled: pretrain_hash leaves train.compile out (and
    data.prefetch_factor), but not a setting that changes training."""
    base = from_dict(Recipe, TINY)
    on = from_dict(Recipe, {**TINY, "train": {**TINY["train"], "compile": True}})
    fetch = from_dict(Recipe, {**TINY, "data": {**TINY["data"], "prefetch_factor": 4}})
    other = from_dict(Recipe, {**TINY, "train": {**TINY["train"], "seed": 1}})
    assert base.pretrain_hash() == on.pretrain_hash() == fetch.pretrain_hash() != other.pretrain_hash()
    assert base.hash() != on.hash()  # the record still says it was compiled


def test_speed_settings_do_not_mark_a_record_modified() -> None:
    """``--compile`` / ``--set data.prefetch_factor=4`` are speed settings: a record made with them
    is not "modified" (it may stand against references); a training setting beside them still is."""
    from cropbench.recipe import load_entry
    from cropbench.runner import RunSpec, overrides_of

    entry = load_entry("simclr")
    sets = {"train": {"compile": True, "epochs": 3}, "data": {"prefetch_factor": 4}}
    spec = RunSpec("simclr", overrides=sets)
    recipe = entry.recipe("default", "micro", sets)
    assert recipe.train.compile and recipe.data.prefetch_factor == 4
    assert overrides_of(entry, spec, recipe) == {"train.epochs": 3}


@pytest.mark.slow
@pytest.mark.skipif(not RUN, reason="inductor compiles for minutes on a 2-core CPU; set CROPBENCH_COMPILE_TEST=1")
def test_compiled_training_matches_eager_and_resumes_eager(tmp_path: Path, data_root: Path) -> None:
    """Two epochs: the first compiled (then stopped after its checkpoint), the second resumed with
    compile off; the losses equal an eager run's within the tolerances above."""
    eager = _trainer(tmp_path / "eager", data_root, compile=False).fit()
    compiled_tr = _trainer(tmp_path / "compiled", data_root, compile=True)
    save = compiled_tr._save

    def save_then_stop() -> None:
        save()
        raise KeyboardInterrupt

    compiled_tr._save = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        compiled_tr.fit()
    assert compiled_tr.method.backbone._compiled_call_impl is None  # eager again (evaluations)
    resumed = _trainer(tmp_path / "compiled", data_root, compile=False).fit(resume=True)  # toggled off
    assert resumed.loss_first == pytest.approx(eager.loss_first, rel=1e-4)
    assert resumed.loss_last == pytest.approx(eager.loss_last, rel=0.05)
    blob = torch.load(tmp_path / "compiled" / CHECKPOINT, weights_only=True)
    assert list(blob["method"]) == list(compiled_tr.method.state_dict())  # no _orig_mod prefix


@pytest.mark.slow
@pytest.mark.skipif(not RUN, reason="inductor compiles for minutes on a 2-core CPU; set CROPBENCH_COMPILE_TEST=1")
def test_one_compiled_step_has_the_eager_gradients(data_root: Path) -> None:
    recipe = from_dict(Recipe, TINY)
    ds = build_train_set(recipe, data_root)
    batch = collate_images([ds[i] for i in range(16)]).to(DEVICE)
    grads = []
    for compiled in (False, True):
        method = build_method(recipe, method_context(recipe, len(ds), DistContext())).to(DEVICE)
        if compiled:
            compile_modules(method)
        method.training_step(batch, 0, views_generator(0, 0, 0, DEVICE)).loss.backward()
        grads.append([p.grad for p in method.parameters()])
    for eager, comp in zip(*grads, strict=True):
        assert (comp - eager).norm() <= 1e-4 * eager.norm() + 1e-12
