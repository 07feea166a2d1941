"""The video supervised control (``vsupervised``): its loss against a naive cross-entropy loop
written from the formula, its refusal of unlabelled videos, and its entry's micro recipe matching
the micro video SSL recipe it controls for."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cropbench.methods.base import MethodContext
from cropbench.recipe import load_entry
from cropbench.registry import BACKBONES
from cropbench.runner import method_from_params
from cropbench.types import VideoBatch

CLIP = {"frames": 4, "stride": 2, "image": {"size": 16}}


def _method(count: int = 2, num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = BACKBONES.get("r3d_micro")(widths=(8, 8, 16, 16))
    params = {"num_classes": num_classes, "window": 8, "views": {"clip": CLIP, "count": count}}
    return method_from_params("vsupervised", params, backbone, MethodContext(batch_size=4))


def _batch(labels: list[int]) -> VideoBatch:
    n = len(labels)
    video = torch.randint(0, 256, (n, 3, 8, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return VideoBatch(video, torch.tensor(labels), torch.arange(n), looped=torch.zeros(n, dtype=torch.bool))


def naive_loss(m: torch.nn.Module, batch: VideoBatch, seed: int) -> float:
    """-1/(K·B) Σ_k Σ_b log softmax(W f(clip_kb) + c)[y_b], one clip at a time in plain Python
    (the logits of a clip are taken from its view's forward pass: BatchNorm runs on the batch)."""
    views = m.views(batch, torch.Generator().manual_seed(seed))
    total, count = 0.0, 0
    for view in views:
        logits = m.classifier(m.backbone(view.tensor)).tolist()
        for row, y in zip(logits, batch.labels.tolist(), strict=True):
            total += -(row[y] - math.log(sum(math.exp(z) for z in row)))
            count += 1
    return total / count


@pytest.mark.parametrize("count", [1, 2])
def test_loss_is_the_mean_cross_entropy_of_every_clip_with_its_videos_label(count):
    m = _method(count)
    batch = _batch([0, 3, 1, 4])
    loss = m.training_step(batch, 0, torch.Generator().manual_seed(7)).loss
    assert loss.item() == pytest.approx(naive_loss(m, batch, 7), rel=1e-5)


def test_the_naive_reference_can_tell_a_wrong_label_pairing():
    """Pairing clip k of video b with another video's label (a broken ``repeat``) moves the loss
    well beyond the float tolerance above: the comparison can fail."""
    m = _method(2)
    batch = _batch([0, 3, 1, 4])
    loss = m.training_step(batch, 0, torch.Generator().manual_seed(7)).loss.item()
    shuffled = VideoBatch(batch.video, batch.labels.roll(1), batch.index, batch.looped)
    assert abs(loss - naive_loss(m, shuffled, 7)) > 1e-3


def test_unlabelled_videos_are_refused():
    """Label -1 marks an unlabelled video (e.g. pytorchvideo's UCF101 testlist): an error naming
    the setting, never a silently skipped sample; so is a label beyond params.num_classes."""
    m = _method()
    with pytest.raises(ValueError, match=r"unlabelled.*cannot train"):
        m.training_step(_batch([0, -1, 2, 1]), 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"params\.num_classes"):
        m.training_step(_batch([0, 5, 2, 1]), 0, torch.Generator().manual_seed(0))


def test_a_training_step_learns_the_labels():
    """A few steps on a fixed batch fit its labels (the loss falls from about log C)."""
    m = _method(1)
    batch = _batch([0, 3, 1, 4])
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(15):
        out = m.training_step(batch, step, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(math.log(5), abs=0.5) and losses[-1] < 0.5 * losses[0], losses


def test_micro_recipe_is_vsimclrs_but_for_the_objective():
    """Backbone, data, clips (one per video), batch, epochs and optimiser are vsimclr micro's, but
    for the learning rate (0.3 x B/256: the entry's deviation says why)."""
    sup = load_entry("vsupervised").recipe("default", "micro")
    ssl = load_entry("vsimclr").recipe("default", "micro")
    assert (sup.backbone, sup.data, sup.train) == (ssl.backbone, ssl.data, ssl.train)
    assert replace(sup.optim, lr=ssl.optim.lr) == ssl.optim and sup.optim.lr == 0.3
    assert sup.params["views"]["clip"] == ssl.params["views"]["clip"] and sup.params["views"]["count"] == 1
    assert sup.eval == ssl.eval and sup.params["num_classes"] == 10
