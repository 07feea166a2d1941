"""VideoMoCo (Pan et al., CVPR 2021, arXiv 2103.05905): MoCo on clips with (1) an adversarial
generator that drops frames of the query clip and (2) temporal decay of the queue's keys.

* Generator (papers.md §6, official ``moco/builder.py``): the clip's frames are stacked as
  channels, dilated conv + BN blocks give per-frame embeddings, a bidirectional LSTM scores each
  frame, softmax over frames. The ``drop`` lowest-scoring frames are replaced by their mean
  intensity. The selection is hard; its gradient reaches the scores straight through (the
  dropped-frame mask's surrogate is 1 − T·score), and a gradient-reversal layer makes the
  generator *maximise* the InfoNCE loss the encoder minimises (the paper's adversarial
  objective; the released code instead trains it on −100·L1(q_fake, q_real) with its own
  optimiser: a deviation in the entry).
* Temporal decay: a negative key enqueued ``a`` iterations ago enters the logits as
  t^a · q·k / τ (t = 0.99999; the official code scales the queued keys by t^age, age counted in
  iterations, 1 for the newest).
* The query and key are two spatial augmentations of the *same* clip (the official loader), and
  the generator only acts after ``adversarial_from`` of training (official: 100 of 200 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cropbench.methods.base import MethodContext, StepOutput, VideoBatch, View
from cropbench.methods.paramcrop import grad_reverse
from cropbench.methods.video_views import VideoViewConfig, make_video_view, sample_starts
from cropbench.methods.vssl import VideoMoCoV2
from cropbench.registry import METHODS


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


def drop_frames(x: Tensor, scores: Tensor, drop: int) -> tuple[Tensor, Tensor]:
    """Replace the ``drop`` lowest-scoring frames of each clip by their mean intensity.

    x: B×C×T×H×W, scores: B×T (softmax). Returns the clip and the B×T bool mask of dropped frames.
    Forward is the hard selection; backward treats the mask as 1 − T·score (straight through).
    """
    t = x.shape[2]
    hard = torch.zeros_like(scores).scatter(1, scores.topk(drop, dim=1, largest=False).indices, 1.0)
    soft = 1 - t * scores
    mask = (hard + soft - soft.detach())[:, None, :, None, None]  # B×1×T×1×1
    means = x.mean(dim=(1, 3, 4), keepdim=True)  # one grey level per frame
    return x * (1 - mask) + means * mask, hard.bool()


def decayed_info_nce(
    q: Tensor, k: Tensor, queue: Tensor, age: Tensor, decay: float, temperature: float
) -> Tensor:
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
class VideoMoCo(VideoMoCoV2):
    @dataclass(frozen=True)
    class Config:
        views: VideoViewConfig = field(default_factory=VideoViewConfig)
        window: int = 32
        hidden_dim: int = 2048  # MLP head (official --mlp)
        out_dim: int = 128  # official --moco-dim
        temperature: float = 0.07  # official --moco-t
        queue_size: int = 65536  # official --moco-k
        momentum: float = 0.999  # official --moco-m
        shuffle_bn: bool = True
        projector_bn: bool = False  # MoCoV2's option (BN projector); the official MLP has none
        decay: float = 0.99999  # temporal decay t (official builder.py)
        drop: int = 8  # frames dropped per clip (official: 8 of 32)
        adversarial_from: float = (
            0.5  # fraction of training before the generator acts (100 of 200 epochs)
        )
        generator_weight: float = 1.0  # gradient-reversal strength
        same_clip: bool = True  # query and key from one clip (official loader); False: two clips

    def __init__(self, cfg: Config, backbone: nn.Module, ctx: MethodContext):
        super().__init__(cfg, backbone, ctx)
        if not 0 < cfg.drop < cfg.views.frames:
            raise ValueError(
                f"params.drop: expected 1..{cfg.views.frames - 1} frames, got {cfg.drop}"
            )
        self.generator = FrameScorer(cfg.views.frames)

    def make_views(self, batch: VideoBatch, generator: torch.Generator) -> list[View]:
        starts = None
        if self.cfg.same_clip:
            starts = sample_starts(
                len(batch), batch.video.shape[2], self.cfg.views, generator, batch.video.device
            )
        return [
            make_video_view(batch.video, vc, generator, starts, batch.looped)
            for vc in self.view_configs
        ]

    def queue_age(self) -> Tensor:
        """K: iterations since each queue slot was written (1 = this step's predecessor)."""
        per_step = self.ctx.batch_size * self.ctx.dist.world_size
        return self.queue.age() // per_step + 1

    def instance_loss(self, q: Tensor, k: Tensor) -> Tensor:
        age = self.queue_age()
        return decayed_info_nce(
            q, k, self.queue.keys.clone(), age, self.cfg.decay, self.cfg.temperature
        )

    def training_step(self, batch: VideoBatch, step: int, generator: torch.Generator) -> StepOutput:
        v_q, v_k = self.make_views(batch, generator)
        x_q, logs = v_q.tensor, {}
        if step >= self.cfg.adversarial_from * self.ctx.total_steps:
            scores = grad_reverse(self.generator(x_q.detach()), self.cfg.generator_weight)  # B×T
            x_q, dropped = drop_frames(x_q, scores, self.cfg.drop)
            logs["dropped_first_half"] = dropped[:, : dropped.shape[1] // 2].float().mean().detach()
        q = self.encode_query(x_q)
        k = self.encode_key(v_k.tensor, generator)
        loss = self.instance_loss(q, k)
        self.enqueue(k)
        return StepOutput(loss, logs)
