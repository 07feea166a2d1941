"""Decoding video files through pytorchvideo's PyAV backend, with truncation checks, canvas
resizing and window indices (looping short videos, as BraVe does)."""

from __future__ import annotations

import av
import numpy as np
import torch
from pytorchvideo.data.encoded_video import EncodedVideo
from torch import Tensor
from torch.nn import functional as F


class BadVideoWarning(UserWarning):
    """A video that could not be decoded (or is truncated) was skipped."""


class VideoDecodeError(RuntimeError):
    pass


def decode_video(path: str, start_frame: int = 0, num_frames: int | None = None) -> Tensor:
    """Frames ``[start_frame, start_frame + num_frames)`` (all when None) as T×3×H×W uint8.

    Raises ``VideoDecodeError`` for unreadable files and for truncated ones (fewer frames decoded
    than the container header promises).
    """
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps, header_frames = float(stream.average_rate or 25), stream.frames
        video = EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")
    except (RuntimeError, OSError, IndexError, av.error.FFmpegError) as e:
        raise VideoDecodeError(f"cannot open: {e}") from e
    try:
        expected = round(float(video.duration) * fps)
        if header_frames:
            expected = max(expected, header_frames)
        end = expected if num_frames is None else min(start_frame + num_frames, expected)
        clip = video.get_clip((start_frame - 0.5) / fps, (end - 0.5) / fps)["video"]
    finally:
        video.close()
    if clip is None or clip.shape[1] < 0.9 * (end - start_frame):
        got = 0 if clip is None else clip.shape[1]
        raise VideoDecodeError(f"truncated or corrupt: decoded {got} of {end - start_frame} frames")
    return clip.permute(1, 0, 2, 3).round().clamp(0, 255).to(torch.uint8)


def to_canvas(frames: Tensor, size: int) -> Tensor:
    """T×3×H×W uint8 -> T×3×size×size uint8: shorter side to ``size`` (antialiased), centre crop."""
    t, _, h, w = frames.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        frames = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        y0, x0 = (nh - size) // 2, (nw - size) // 2
        frames = frames[:, :, y0 : y0 + size, x0 : x0 + size].round().clamp(0, 255).to(torch.uint8)
    return frames.contiguous()


def window_indices(n: int, frames: int, stride: int, rng: np.random.Generator | None) -> tuple[np.ndarray, bool]:
    """Frame indices of a window of ``frames`` frames every ``stride`` frames in a video of ``n``.

    Random start (``rng``) or the centred window (``rng=None``). A video shorter than the window's
    span is looped: indices wrap modulo ``n`` (BraVe's rule) and ``looped`` is True.
    """
    span = (frames - 1) * stride + 1
    if n >= span:
        start = int(rng.integers(0, n - span + 1)) if rng is not None else (n - span) // 2
        return start + stride * np.arange(frames), False
    start = int(rng.integers(0, n)) if rng is not None else 0
    return (start + stride * np.arange(frames)) % n, True


def header_frames(path: str) -> int:
    try:
        with av.open(path) as container:
            return int(container.streams.video[0].frames or 0)
    except (OSError, av.error.FFmpegError, IndexError):
        return 0
