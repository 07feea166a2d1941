"""VideoMoCo (Pan et al., CVPR 2021, arXiv 2103.05905): MoCo on clips with (1) an adversarial
generator that drops frames of the query clip and (2) temporal decay of the queue's keys.

* Generator (papers.md §6, official ``moco/builder.py``): the clip's frames are stacked as
  channels, dilated conv + BN blocks give per-frame embeddings, a bidirectional LSTM scores each
  frame, softmax over frames. The ``drop`` lowest-scoring frames are replaced by their mean
  intensity. The selection is hard; its gradient reaches the scores through the official custom
  backward (``VideoTopk``: d/d score[b, t] = the clip gradient summed over frame t), and a
  gradient-reversal layer makes the generator *maximise* the InfoNCE loss the encoder minimises
  (the paper's adversarial objective; the released code instead steps it on
  −100·L1(q_fake, q_real) + InfoNCE: a deviation in the entry).
* Temporal decay: a negative key enqueued ``a`` iterations ago enters the logits as
  t^a · q·k / τ (t = 0.99999; the official code scales the queued keys by t^age, age counted in
  iterations, 1 for the newest; a never-written slot counts the enqueues so far, as official ``count``).
* The query and key are two spatial augmentations of the *same* clip (the official loader), and
  the generator only acts after ``adversarial_from`` of training (official: 100 of 200 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.errors import ConfigError
from cropbench.methods.base import MethodContext, StepOutput
from cropbench.methods.mocov2 import MoCoV2
from cropbench.methods.paramcrop import grad_reverse
from cropbench.methods.vssl import clip_window
from cropbench.registry import METHODS
from cropbench.types import VideoBatch
from cropbench.views.generators import ViewGenerator


class FrameScorer(nn.Module):
    """VideoMoCo's generator, scaled down: B×3×T×H×W clip -> B×T frame scores (softmax over T)."""

    def __init__(self, frames: int, width: int = 32, embed: int = 16, hidden: int = 32):
        super().__init__()
        self.frames, self.embed = frames, embed
        self.convs = nn.Sequential(
            nn.Conv2d(3 * frames, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, frames * embed, 1),
        )
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(2 * hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        if t != self.frames:
            raise ValueError(f"FrameScorer built for {self.frames} frames, got a {t}-frame clip")
        f = self.convs(x.transpose(1, 2).reshape(b, t * c, h, w)).mean(dim=(2, 3))  # B×(T·E)
        seq, _ = self.lstm(f.view(b, t, self.embed))  # B×T×2H
        return torch.softmax(self.score(seq).squeeze(-1), dim=1)


class _TopkDrop(torch.autograd.Function):
    """VideoMoCo's ``VideoTopk`` (tinapan-pt/VideoMoCo@42e069a moco/builder.py): forward drops
    the ``drop`` lowest-scoring frames (each replaced by its mean over C, H, W); backward gives
    the clip no gradient and each score the sum of the output gradient over its frame,
    d/d score[b, t] = Σ_{c,h,w} grad_out[b, c, t, h, w], whether that frame was dropped or not."""

    @staticmethod
    def forward(ctx, x: Tensor, scores: Tensor, drop: int) -> tuple[Tensor, Tensor]:  # noqa: ARG004
        hard = torch.zeros_like(scores, dtype=torch.bool)
        hard.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, True)
        means = x.mean(dim=(1, 3, 4), keepdim=True)  # one grey level per frame
        ctx.mark_non_differentiable(hard)
        return torch.where(hard[:, None, :, None, None], means.expand_as(x), x), hard

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_hard: Tensor) -> tuple[None, Tensor, None]:  # noqa: ARG004
        return None, grad_out.sum(dim=(1, 3, 4)), None


def drop_frames(x: Tensor, scores: Tensor, drop: int) -> tuple[Tensor, Tensor]:
    """Replace the ``drop`` lowest-scoring frames of each clip by their mean intensity.

    x: B×C×T×H×W, scores: B×T (softmax). Returns the clip and the B×T bool mask of dropped frames.
    Gradients follow the official custom backward (``_TopkDrop``): none to the clip, the
    per-frame sum of the clip's gradient to the scores.
    """
    return _TopkDrop.apply(x, scores, drop)


def decayed_info_nce(q: Tensor, k: Tensor, queue: Tensor, age: Tensor, decay: float, temperature: float) -> Tensor:
    """InfoNCE with temporally decayed negatives (VideoMoCo): logits [q·k, t^age_j · q·n_j] / τ.

    q, k: N×D (k without gradient), queue: K×D, age: K (iterations since each key was enqueued).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    negatives = F.normalize(queue.detach().float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = (q @ negatives.T) * decay ** age.float()[None]
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@METHODS.register("videomoco")
class VideoMoCo(MoCoV2):
    # shuffle-BN, no SyncBN [tinapan-pt/VideoMoCo@0ed0a13 moco/builder.py _batch_shuffle_ddp]
    batchnorm = "shuffle"
    ddp_find_unused_parameters = True  # the frame generator gets no gradient before adversarial_from

    modality = "video"
    # query and key from one clip (official loader): the entry's clip_pair sets shared_start
    default_views = "clip_pair"

    @dataclass(frozen=True)
    class Config(MoCoV2.Config):  # MoCo v2's heads, queue, momentum and shuffle-BN (official: the same)
        window: int = 32
        temperature: float = 0.07  # official --moco-t
        decay: float = 0.99999  # temporal decay t (official builder.py)
        drop: int = 8  # frames dropped per clip (official: 8 of 32)
        adversarial_from: float = 0.5  # fraction of training before the generator acts (100 of 200 epochs)
        generator_weight: float = 1.0  # gradient-reversal strength ("reverse")
        # "reverse": the generator ascends the InfoNCE (paper); "official": released train.py,
        # the generator descends −l1_weight·L1(q_fake, q_real) + InfoNCE, the encoder InfoNCE only
        generator_loss: Literal["reverse", "official"] = "reverse"
        l1_weight: float = 100.0  # official train.py: loss_g = -100 * L1Loss(q_fake, q_real)

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext, views: ViewGenerator):
        super().__init__(cfg, backbone, ctx, views)
        frames = getattr(views, "frames", None)  # the query clip's: the frame scorer's input
        if not isinstance(frames, int):
            raise ConfigError(f"params.views: VideoMoCo needs a clip generator (clip_pair), got {type(views).__name__}")
        if not 0 < cfg.drop < frames:
            raise ValueError(f"params.drop: expected 1..{frames - 1} frames (params.views.clip.frames), got {cfg.drop}")
        self.generator = FrameScorer(frames)
        # iterations since each slot was written, as the official ``count``: every enqueue adds 1
        # to all slots and sets the written ones to 1; a never-written slot counts the enqueues so far
        self.register_buffer("slot_age", torch.zeros(cfg.queue_size, dtype=torch.long))

    def prepare_dataset(self, dataset: Any, run_dir: Path) -> Any:
        return clip_window(dataset, self.cfg.window, self.views)

    def queue_age(self) -> Tensor:
        """K: iterations since each queue slot was written (1 = the previous step's keys; a slot
        still holding its random initial key counts every enqueue so far, 0 at the first step)."""
        return self.slot_age

    @torch.no_grad()
    def enqueue(self, k: Tensor) -> None:
        """MoCo's enqueue (all processes' keys), then the official count update."""
        start = self.queue.ptr.clone()
        super().enqueue(k)
        n = min(k.shape[0] * self.ctx.dist.world_size, self.queue.size)
        written = (start + torch.arange(n, device=start.device)) % self.queue.size
        self.slot_age.add_(1).index_fill_(0, written, 1)

    def instance_loss(self, q: Tensor, k: Tensor) -> Tensor:
        age = self.queue_age()
        return decayed_info_nce(q, k, self.queue.keys.clone(), age, self.cfg.decay, self.cfg.temperature)

    def _adversarial_query(self, x_q: Tensor, logs: dict[str, Tensor]) -> Tensor:
        """Query of the frame-dropped clip; wires the generator's gradient per ``generator_loss``."""
        raw = self.generator(x_q.detach())  # B×T softmax scores
        official = self.cfg.generator_loss == "official"
        if official:  # train.py encodes the real clip first; its gradient reaches no parameter
            with torch.no_grad():
                q_real = F.normalize(self.encode_query(x_q), dim=1)
        scores = raw if official else grad_reverse(raw, self.cfg.generator_weight)
        x_fake, dropped = drop_frames(x_q, scores, self.cfg.drop)
        logs["dropped_first_half"] = dropped[:, : dropped.shape[1] // 2].float().mean().detach()
        q = self.encode_query(x_fake)
        if official:
            l1 = F.l1_loss(F.normalize(q, dim=1), q_real)
            # loss_g's gradient reaches the generator only (train.py freezes D for it): add it
            # to the scores' gradient; the InfoNCE's own gradient flows there too (train.py
            # accumulates loss_d.backward() into netG before optimizer_g.step())
            (g_adv,) = torch.autograd.grad(-self.cfg.l1_weight * l1, raw, retain_graph=True)
            raw.register_hook(partial(torch.add, other=g_adv))
            logs["loss_generator_l1"] = l1.detach()
        return q

    def training_step(self, batch: VideoBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        x_q, logs = v_q.tensor, {}
        if step < self.cfg.adversarial_from * self.ctx.total_steps:
            q = self.encode_query(x_q)
        else:
            q = self._adversarial_query(x_q, logs)
        k = self.encode_key(v_k.tensor, generator)
        loss = self.instance_loss(q, k)
        self.enqueue(k)
        return StepOutput(loss, logs)
