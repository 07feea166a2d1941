"""Video entries end to end through the runner on the embedded UCF101-layout data (tiny budgets):
pretraining with the entry's micro recipe, the hmdb51 evaluation (BraVe's end-to-end run is too
slow for the suite; its method is covered in test_video_methods), records, checkpoints, and
ParamCrop's per-epoch view statistics and curve."""

from __future__ import annotations

import json

import pytest
import torch

from cropbench.recipe import load_entry
from cropbench.runner import RunSpec, load_encoder, run

TINY = {
    "data": {"limit": 12},  # decode only the first 12 training videos
    "train": {"epochs": 2, "batch_size": 6, "max_steps_per_epoch": 1},
    "eval": {"hmdb51": {"test_clips": 1, "train_clips": 1, "batch_size": 64}},
}


@pytest.mark.slow
@pytest.mark.parametrize(("entry", "variant"), [("vsimclr", "default"), ("paramcrop", "simclr")])
def test_video_entry_runs_end_to_end(entry, variant, data_root, tmp_path):
    spec = RunSpec(
        entry,
        variant,
        "micro",
        ("hmdb51",),
        (0,),
        data_root,
        "cpu",
        out=tmp_path / "records",
        work_dir=tmp_path / "runs",
        overrides=TINY,
        quiet=True,
    )
    (record,) = run(spec)
    assert record.entry == entry and record.eval == "hmdb51" and 0 <= record.metrics["top1"] <= 100
    assert record.pretrain["steps"] == 2 and record.pretrain["loss_first"] > 0
    assert (tmp_path / "records" / "micro" / entry / variant / "hmdb51" / "seed0.json").exists()
    run_dir = tmp_path / "runs" / "micro" / entry / variant / "seed0"
    encoder = load_encoder(run_dir / "checkpoint.pt", torch.device("cpu"))
    assert encoder.modality == "video" and encoder(torch.rand(1, 3, 8, 24, 24)).shape == (1, encoder.feat_dim)
    if entry == "paramcrop":
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [r for r in rows if "view_iou" in r]
        assert [r["epoch"] for r in curve] == [1, 2]
        assert all(0 < r["view_iou"] <= 1 and r["view_centre_distance"] >= 0 for r in curve)
        assert (run_dir / "paramcrop_views.png").read_bytes()[:4] == b"\x89PNG"


def test_every_video_entry_validates_at_every_scale():
    from cropbench.config import from_dict
    from cropbench.registry import EVALUATIONS
    from cropbench.runner import resolved_config

    for name in ("vsimclr", "vmoco", "vbyol", "videomoco", "paramcrop", "brave"):
        entry = load_entry(name)
        assert entry.modality == "video" and set(entry.evaluations) == {"ucf101", "hmdb51"}
        for variant in entry.variants:
            for scale in ("micro", "small", "paper"):
                recipe = entry.recipe(variant, scale)
                resolved_config(recipe, name)  # the method's Config and the generator's it names
                for ev in entry.evaluations:
                    from_dict(EVALUATIONS.get(ev).Settings, recipe.eval.get(ev, {}), name, f"eval.{ev}")
                assert recipe.deviations, f"{name}/{variant}/{scale}: every departure needs a note"
