"""Embedded synthetic action videos: the *motion* of one object is the class, its look is nuisance.

Each video shows an elongated, textured object over a textured background with static blobs.
Its class is how it moves: ``ACTIONS`` lists ten motion families, chosen to survive the
augmentations video SSL uses: a horizontal flip turns "slide left" into "slide right" and a
clockwise spin into an anticlockwise one, so those directions are drawn at random *within* a
class, while up/down and grow/shrink (no augmentation swaps them; time is never reversed) are
separate classes. The look (object shape, colours, texture, size, where it stands and how it is
oriented; background) belongs to a *group* (UCF101's "same actor and scene") and is shared by
the group's clips of every class, so appearance alone says nothing about the class, and clips of
one look differ only in how (how fast, in which phase) the object moves: telling them apart, as
instance discrimination across a batch must, takes motion; a single frame says little (grow vs
shrink, rise vs fall). Per clip: speed, phase, direction, length, camera pan, pixel noise.

The videos are encoded with PyAV (MPEG-4 Part 2 in AVI, like UCF101/HMDB51's XviD files) and laid
out exactly like the official datasets (``video_lists.py`` documents the layouts), so the real
loaders are what runs. Everything is a pure function of ``(seed, dataset, class, group, clip)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

ACTIONS = ("slide", "rise", "fall", "grow", "shrink", "spin", "bounce", "shake", "orbit", "blink")
VIDEO_GENERATOR_VERSION = 1  # bump when rendering changes: golden records depend on it


@dataclass(frozen=True)
class SynthVideoConfig:
    size: int = 48  # frame side in pixels (even, for yuv420p); micro uses a 40-px canvas
    frames: tuple[int, int] = (48, 72)  # length range: BraVe's micro broad window (49) fits
    fps: int = 25  # UCF101 is 25 fps; BraVe's sampling assumes 25 fps
    pan: float = 0.0  # max background pan in px/frame (camera-motion nuisance; HMDB-like set)
    noise: float = 5.0  # per-frame Gaussian pixel noise (std, 0-255 scale)
    distractors: int = 1  # static textured blobs on the background
    groups: int = 9  # UCF101-style groups ("same actor / scene"): appearance shared within a group
    clips_per_group: int = 3
    seed: int = 0


@dataclass(frozen=True)
class Look:
    """Appearance of one group: the nuisance the representation should ignore."""

    fg: np.ndarray  # 3 floats, object colour
    fg2: np.ndarray  # 3 floats, object texture colour
    bg0: np.ndarray  # background gradient colours
    bg1: np.ndarray
    shape: int  # 0 ellipse, 1 rectangle, 2 diamond
    texture: int  # 0 stripes, 1 checker, 2 two-tone halves
    period: float  # texture period in object units
    radius: float  # base radius as a fraction of the frame side
    aspect: float  # elongation (>1 makes rotation visible)
    scene: int  # seed of the background (gradient, texture, blobs): the same for the whole group
    start: tuple[float, float]  # where the object stands (x, y as fractions of the frame side)
    angle: float  # its orientation (rad)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def draw_look(rng: np.random.Generator) -> Look:
    fg, fg2 = _colour(rng), _colour(rng)
    if np.abs(fg - fg2).sum() < 150:  # keep the texture (and so rotation) visible
        fg2 = 255.0 - fg
    shape, texture = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    period, radius, aspect = rng.uniform(0.5, 0.9), rng.uniform(0.17, 0.21), rng.uniform(1.6, 2.2)
    scene, start, angle = (
        int(rng.integers(0, 2**31)),
        tuple(rng.uniform(0.35, 0.65, 2)),
        rng.uniform(0, np.pi),
    )
    bg0, bg1 = _colour(rng), _colour(rng)
    return Look(fg, fg2, bg0, bg1, shape, texture, period, radius, aspect, scene, start, angle)


def motion(rng: np.random.Generator, action: int, n: int, size: int, look: Look) -> dict[str, np.ndarray]:
    """Per-frame pose of the object: centre (cx, cy) in pixels, scale, angle (rad), visibility.

    The object starts where the group's look puts it; ``rng`` draws the clip's speed, phase and
    direction. Every motion shows in any few frames (translations wrap around the frame).
    """
    t = np.arange(n, dtype=np.float32)
    sign = rng.choice([-1.0, 1.0])  # direction within a class (flip / mirror symmetric)
    radius = look.radius
    cx = np.full(n, look.start[0] * size, np.float32)
    cy = np.full(n, look.start[1] * size, np.float32)
    scale, angle = np.ones(n, np.float32), np.full(n, look.angle, np.float32)
    visible = np.ones(n, bool)
    speed, phase = rng.uniform(1.5, 2.2), rng.uniform(0, 2 * np.pi)
    span = size * (1 + 4 * radius)  # wrap period so the object fully leaves before re-entering
    name = ACTIONS[action]
    if name == "slide":
        cx = (cx + sign * speed * t) % span - 2 * radius * size
    elif name in ("rise", "fall"):
        cy = (cy + (-1 if name == "rise" else 1) * speed * t) % span - 2 * radius * size
    elif name in ("grow", "shrink"):
        cycle = ((t / rng.uniform(16, 24) + rng.uniform(0, 1)) % 1.0).astype(np.float32)  # sawtooth
        scale = 0.5 * np.exp(np.log(3.0) * (cycle if name == "grow" else 1 - cycle))
    elif name == "spin":
        angle = angle + sign * rng.uniform(0.25, 0.35) * t
    elif name == "bounce":
        floor = rng.uniform(0.75, 0.85) * size
        cy = floor - rng.uniform(0.3, 0.45) * size * np.abs(np.sin(np.pi * t / rng.uniform(10, 16) + phase))
    elif name == "shake":
        cx = cx + rng.uniform(0.1, 0.14) * size * np.sin(2 * np.pi * t / rng.uniform(6, 10) + phase)
    elif name == "orbit":
        r, w = rng.uniform(0.22, 0.3) * size, sign * rng.uniform(0.18, 0.26)
        cx, cy = size / 2 + r * np.cos(w * t + phase), size / 2 + r * np.sin(w * t + phase)
    elif name == "blink":
        visible = np.sin(2 * np.pi * t / rng.uniform(6, 10) + phase) > -0.2
    else:
        raise ValueError(f"action {action} out of range 0..{len(ACTIONS) - 1}")
    return {
        "cx": cx.astype(np.float32),
        "cy": cy.astype(np.float32),
        "scale": scale.astype(np.float32),
        "angle": angle.astype(np.float32),
        "visible": visible,
    }


def _object_layer(look: Look, pose: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Object mask (T×H×W bool) and colour (T×H×W×3) from per-frame poses (object coordinates)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x[None] - pose["cx"][:, None, None], y[None] - pose["cy"][:, None, None]
    cos, sin = np.cos(pose["angle"])[:, None, None], np.sin(pose["angle"])[:, None, None]
    r = look.radius * size * pose["scale"][:, None, None]
    u = (cos * dx + sin * dy) / (r * np.sqrt(look.aspect))  # along the long axis, in [-1, 1] inside
    v = (-sin * dx + cos * dy) / (r / np.sqrt(look.aspect))
    if look.shape == 0:
        mask = u**2 + v**2 <= 1
    elif look.shape == 1:
        mask = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    else:
        mask = np.abs(u) + np.abs(v) <= 1.1
    mask &= pose["visible"][:, None, None]
    if look.texture == 0:
        pattern = np.sin(2 * np.pi * u / look.period * 2) > 0
    elif look.texture == 1:
        pattern = (np.floor(2 * u / look.period) + np.floor(2 * v / look.period)) % 2 == 0
    else:
        pattern = u > 0
    colour = np.where(pattern[..., None], look.fg, look.fg2)
    return mask, colour


def _background(rng: np.random.Generator, look: Look, n: int, size: int, cfg: SynthVideoConfig) -> np.ndarray:
    """T×H×W×3 background: the group's gradient + soft texture + static blobs; the clip's ``rng``
    only draws the camera pan."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pan = rng.uniform(-cfg.pan, cfg.pan, 2) / size * np.arange(n)[:, None]  # T×2
    xs, ys = (
        x[None] + np.float32(pan[:, 0, None, None]),
        y[None] + np.float32(pan[:, 1, None, None]),
    )
    scene = np.random.default_rng(look.scene)
    a, b, fx, fy = (np.float32(v) for v in (*scene.uniform(-0.6, 0.6, 2), *scene.uniform(1.5, 3, 2)))
    g = np.clip(0.5 + a * (xs - 0.5) + b * (ys - 0.5), 0, 1)[..., None]
    tex = np.sin(np.float32(2 * np.pi) * (fx * xs + fy * ys))[..., None]
    frames = look.bg0 * (1 - g) + look.bg1 * g + np.float32(12.5) * tex
    for _ in range(cfg.distractors):
        cx, cy, rad = (np.float32(v) for v in (*scene.uniform(0.15, 0.85, 2), scene.uniform(0.06, 0.12)))
        blob = (xs - cx) ** 2 + (ys - cy) ** 2 < rad**2
        frames = np.where(blob[..., None], _colour(scene), frames)
    return frames


def render_video(rng: np.random.Generator, action: int, look: Look, cfg: SynthVideoConfig) -> np.ndarray:
    """One clip of class ``action``: T×H×W×3 uint8."""
    n = int(rng.integers(cfg.frames[0], cfg.frames[1] + 1))
    pose = motion(rng, action, n, cfg.size, look)
    frames = _background(rng, look, n, cfg.size, cfg)
    mask, colour = _object_layer(look, pose, cfg.size)
    frames = np.where(mask[..., None], colour, frames)
    frames += np.float32(cfg.noise) * rng.standard_normal(frames.shape, dtype=np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def clip_rng(cfg: SynthVideoConfig, dataset: str, action: int, group: int, clip: int) -> np.random.Generator:
    key = {"ucf": 0, "hmdb": 1}[dataset]
    return np.random.default_rng([cfg.seed, key, action, group, clip, VIDEO_GENERATOR_VERSION])


def group_look(cfg: SynthVideoConfig, dataset: str, group: int) -> Look:
    """Appearance (object and scene) shared by every clip of one group, whatever its class:
    UCF101's 'same actor and scene'. Appearance says nothing about the class; motion does."""
    return draw_look(np.random.default_rng([cfg.seed, {"ucf": 0, "hmdb": 1}[dataset], group, VIDEO_GENERATOR_VERSION]))


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode T×H×W×3 uint8 frames with PyAV: MPEG-4 Part 2, yuv420p, high bit rate (~31 dB PSNR,
    limited by chroma subsampling and the pixel noise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate, stream.options = 2_000_000, {"qmin": "1", "qmax": "4"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- the official layouts ------------------------------------------------------------------------

UCF_CLASSES = tuple(a.capitalize() for a in ACTIONS)  # UCF101 spells classes in CamelCase
HMDB_CLASSES = ACTIONS  # HMDB51 spells them lower_snake_case
UCF_SYNTH = SynthVideoConfig(noise=3.0, distractors=0)  # 10 classes x 9 groups x 3 clips = 270 videos
HMDB_SYNTH = SynthVideoConfig(pan=0.6, noise=8.0, distractors=2, groups=10, clips_per_group=2)  # 200, harder


def ucf_test_groups(cfg: SynthVideoConfig, fold: int) -> range:
    """Groups held out by split ``fold`` (UCF101: split k tests groups 7(k-1)+1..7k of 25)."""
    per = cfg.groups // 3
    return range(per * (fold - 1) + 1, per * fold + 1)


def write_ucf101(folder: Path, cfg: SynthVideoConfig = UCF_SYNTH) -> None:
    """``UCF-101/<Class>/v_<Class>_gGG_cCC.avi`` + ``ucfTrainTestlist/*.txt``.

    Split files follow the official format: 1-based labels in ``trainlist``, none in ``testlist``.
    """
    names: dict[int, list[tuple[int, str]]] = {}
    for a, cls in enumerate(UCF_CLASSES):
        for g in range(1, cfg.groups + 1):
            look = group_look(cfg, "ucf", g)
            for c in range(1, cfg.clips_per_group + 1):
                rel = f"{cls}/v_{cls}_g{g:02d}_c{c:02d}.avi"
                write_video(
                    folder / "UCF-101" / rel,
                    render_video(clip_rng(cfg, "ucf", a, g, c), a, look, cfg),
                    cfg.fps,
                )
                names.setdefault(g, []).append((a, rel))
    lists = folder / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    for fold in (1, 2, 3):
        test = set(ucf_test_groups(cfg, fold))
        rows = sorted((rel, a) for g, items in names.items() for a, rel in items if g not in test)
        (lists / f"trainlist0{fold}.txt").write_text("".join(f"{rel} {a + 1}\n" for rel, a in rows))
        rows = sorted(rel for g, items in names.items() for _, rel in items if g in test)
        (lists / f"testlist0{fold}.txt").write_text("".join(f"{rel}\n" for rel in rows))


def hmdb_marks(cfg: SynthVideoConfig, fold: int) -> dict[int, int]:
    """Group -> split mark of fold ``fold`` (1 train, 2 test, 0 unused; HMDB51's 70/30 split).

    The same groups are held out for every class, so no test look was seen in training."""
    order = np.random.default_rng([cfg.seed, 7, fold]).permutation(cfg.groups) + 1
    n_test, n_unused = round(0.3 * cfg.groups), max(1, round(0.1 * cfg.groups))
    return {int(g): 2 if i < n_test else 0 if i < n_test + n_unused else 1 for i, g in enumerate(order)}


def write_hmdb51(folder: Path, cfg: SynthVideoConfig = HMDB_SYNTH) -> None:
    """``videos/<class>/<name>_<class>_<5 tags>_<id>.avi`` + ``testTrainMulti_7030_splits/``."""
    splits = folder / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True, exist_ok=True)
    for a, cls in enumerate(HMDB_CLASSES):
        files: list[tuple[int, str]] = []
        for g in range(1, cfg.groups + 1):
            look = group_look(cfg, "hmdb", g)
            for c in range(cfg.clips_per_group):
                name = f"Synth{g:02d}_{cls}_f_cm_np1_fr_med_{c}.avi"
                write_video(
                    folder / "videos" / cls / name,
                    render_video(clip_rng(cfg, "hmdb", a, g, c), a, look, cfg),
                    cfg.fps,
                )
                files.append((g, name))
        for fold in (1, 2, 3):
            marks = hmdb_marks(cfg, fold)
            (splits / f"{cls}_test_split{fold}.txt").write_text("".join(f"{n} {marks[g]} \n" for g, n in files))
