"""Embedded synthetic action videos: a class is an object's *texture* and its *motion*.

Each video shows one large textured object over a smooth background (static blobs in the HMDB51
set). Its class sets two cues. First, appearance that persists through the clip: the object wears
the texture family of the image data (``synth._texture``: stripes, checkerboard, dots, rings, ...),
drawn in the object's own frame, so it moves and turns with the object in every frame; a texture
survives the crops, flips and colour jitter (hue included) video SSL uses, colour would not. The
frame is a torus (an object leaving on one side re-enters on the other), so the object is whole
in every frame and in most crops. Second, motion: ``ACTIONS`` lists ten motion families chosen to
survive those augmentations: a horizontal flip turns "slide left" into "slide right" and a
clockwise spin into an anticlockwise one, so those directions are drawn at random *within* a
class, while up/down and grow/shrink (no augmentation swaps them; time is never reversed) are
separate classes. The scene (background colours and layout) and the object's shape, size, place
and orientation belong to a *group* (UCF101's "same actor and scene"), shared by the group's clips
of every class, and the test groups are disjoint from the training groups. Per clip: the object's
two colours, texture period and phase, speed, motion phase, direction, length, camera pan, noise.

Why (version 2): version 1 made the class motion only (texture per group). Every micro video
entry then sat at chance: UCF101 / HMDB51 top-1 10.0-11.1 / 6.7-13.3 against 13.3 / 13.3 at random
init (the seed-0 goldens before version 2), and so did the supervised control (``vsupervised``,
seeds 0-1: UCF101 10.0 / 10.0 vs 13.3 / 12.2; its training loss stayed at log 10). A first
texture design (class texture, but colours and texture period per group, a smaller object that
slid out of view) taught the supervised control (UCF101 top-1 38.8-41.3 vs 17.5 at 40 epochs) but
not clip contrast: vsimclr stayed at 11.3-18.8 vs 17.5, and its features' nearest neighbours
shared the group more often than at random init (97 % vs 93 %) and the class across groups less
(16 % vs 24 %): with per-group colours and mostly background in a crop, what two clips of one
video share is the group's look. Per-clip object colours (which hue jitter removes) and a large,
always-whole object leave the class texture as what the clips of one video share.

The videos are encoded with PyAV (MPEG-4 Part 2 in AVI, like UCF101/HMDB51's XviD files) and laid
out exactly like the official datasets (``video_lists.py`` documents the layouts), so the real
loaders are what runs. Everything is a pure function of ``(seed, dataset, class, group, clip)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np

from cropbench.data.synth import CLASSES as TEXTURES
from cropbench.data.synth import _texture

ACTIONS = ("slide", "rise", "fall", "grow", "shrink", "spin", "bounce", "shake", "orbit", "blink")
# Bump when rendering changes: golden records depend on it, and it names the data folder
# (``synth_ucf101-v2``), so a changed generator never reads videos an older one wrote.
# 2: the class also sets the object's texture family; object colours per clip; toroidal frame
VIDEO_GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SynthVideoConfig:
    size: int = 48  # frame side in pixels (even, for yuv420p); micro resizes it to a 32-px canvas
    frames: tuple[int, int] = (48, 72)  # length range: BraVe's micro broad window (49) fits
    fps: int = 25  # UCF101 is 25 fps; BraVe's sampling assumes 25 fps
    pan: float = 0.0  # max background pan in px/frame (camera-motion nuisance; HMDB-like set)
    noise: float = 5.0  # per-frame Gaussian pixel noise (std, 0-255 scale)
    distractors: int = 1  # static textured blobs on the background
    # Amplitude of the background's wave (0-255). Version 1 drew 12.5: a group-level stripe
    # texture, which competes with the class texture as the cue that tells clips apart.
    wave: float = 0.0
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
    period: float  # texture period as a fraction of the frame side
    radius: float  # base radius as a fraction of the frame side
    aspect: float  # elongation (>1 makes rotation visible)
    scene: int  # seed of the background (gradient, texture, blobs): the same for the whole group
    start: tuple[float, float]  # where the object stands (x, y as fractions of the frame side)
    angle: float  # its orientation (rad)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def draw_look(rng: np.random.Generator) -> Look:
    """A group's look. The object is large (about 0.8 x 0.7 of the frame, 0.3-0.45 of its area)
    and so is its texture period, 0.22-0.28 of the frame side: >= 7 px on the 32-px micro canvas,
    >= 5 px in a 24-px view of all of it. r3d_micro's stem convolves with stride 2, so a finer
    period aliases away in its first layer. The colours and period drawn here are replaced per clip
    (``clip_look``); they are still drawn, so the rest of the look keeps its random stream."""
    fg, fg2 = object_colours(rng)
    shape = int(rng.integers(0, 3))
    period, radius, aspect = rng.uniform(0.22, 0.28), rng.uniform(0.36, 0.4), rng.uniform(1.1, 1.25)
    scene, start, angle = (
        int(rng.integers(0, 2**31)),
        tuple(rng.uniform(0.4, 0.6, 2)),
        rng.uniform(0, np.pi),
    )
    bg0, bg1 = _colour(rng), _colour(rng)
    return Look(fg, fg2, bg0, bg1, shape, period, radius, aspect, scene, start, angle)


def object_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The object's two texture colours, far enough apart to keep the texture visible."""
    fg, fg2 = _colour(rng), _colour(rng)
    if np.abs(fg - fg2).sum() < 150:
        fg2 = 255.0 - fg
    return fg, fg2


def clip_look(rng: np.random.Generator, look: Look) -> Look:
    """The group's look with the object's colours and texture period drawn for one clip."""
    fg, fg2 = object_colours(rng)
    return replace(look, fg=fg, fg2=fg2, period=float(rng.uniform(0.22, 0.28)))


def texture_family(action: int) -> int:
    """The texture family (index into ``synth.CLASSES``) that class ``action`` wears."""
    return action % len(TEXTURES)


def motion(rng: np.random.Generator, action: int, n: int, size: int, look: Look) -> dict[str, np.ndarray]:
    """Per-frame pose of the object: centre (cx, cy) in pixels, scale, angle (rad), visibility.

    The object starts where the group's look puts it; ``rng`` draws the clip's speed, phase and
    direction. Every motion shows in any few frames (translations wrap around the frame).
    """
    t = np.arange(n, dtype=np.float32)
    sign = rng.choice([-1.0, 1.0])  # direction within a class (flip / mirror symmetric)
    cx = np.full(n, look.start[0] * size, np.float32)
    cy = np.full(n, look.start[1] * size, np.float32)
    scale, angle = np.ones(n, np.float32), np.full(n, look.angle, np.float32)
    visible = np.ones(n, bool)
    speed, phase = rng.uniform(1.5, 2.2), rng.uniform(0, 2 * np.pi)
    name = ACTIONS[action]
    if name == "slide":  # the frame is a torus (``_object_layer``): the object leaves on one side
        cx = cx + sign * speed * t  # and re-enters on the other, never smaller than it is
    elif name in ("rise", "fall"):
        cy = cy + (-1 if name == "rise" else 1) * speed * t
    elif name in ("grow", "shrink"):
        cycle = ((t / rng.uniform(16, 24) + rng.uniform(0, 1)) % 1.0).astype(np.float32)  # sawtooth
        scale = 0.5 * np.exp(np.log(2.5) * (cycle if name == "grow" else 1 - cycle))
    elif name == "spin":
        angle = angle + sign * rng.uniform(0.25, 0.35) * t
    elif name == "bounce":
        floor = rng.uniform(0.7, 0.8) * size
        cy = floor - rng.uniform(0.25, 0.4) * size * np.abs(np.sin(np.pi * t / rng.uniform(10, 16) + phase))
    elif name == "shake":
        cx = cx + rng.uniform(0.1, 0.14) * size * np.sin(2 * np.pi * t / rng.uniform(6, 10) + phase)
    elif name == "orbit":
        r, w = rng.uniform(0.2, 0.26) * size, sign * rng.uniform(0.18, 0.26)
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


def texture_tile(rng: np.random.Generator, action: int, look: Look, size: int) -> np.ndarray:
    """The object's texture in its own frame: a (2·size)² binary tile of family
    ``texture_family(action)`` (``synth._texture``) at the clip's period, centred on the object;
    ``rng`` draws the clip's phase."""
    tile = 2 * size
    period = (look.period * size / tile,) * 2  # _texture's period is a fraction of its canvas
    return _texture(rng, texture_family(action), tile, size, size, period) > 0.5


def _object_layer(
    look: Look, pose: dict[str, np.ndarray], size: int, tile: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Object mask (T×H×W bool) and colour (T×H×W×3) from per-frame poses. The texture ``tile``
    is read in the object's frame (translated and turned with it, not scaled: its period stays
    visible as the object grows and shrinks)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x[None] - pose["cx"][:, None, None], y[None] - pose["cy"][:, None, None]
    dx, dy = (dx + size / 2) % size - size / 2, (dy + size / 2) % size - size / 2  # torus: wrap the edges
    cos, sin = np.cos(pose["angle"])[:, None, None], np.sin(pose["angle"])[:, None, None]
    along, across = cos * dx + sin * dy, -sin * dx + cos * dy  # object frame, pixels
    r = look.radius * size * pose["scale"][:, None, None]
    u, v = along / (r * np.sqrt(look.aspect)), across / (r / np.sqrt(look.aspect))  # [-1, 1] inside
    if look.shape == 0:
        mask = u**2 + v**2 <= 1
    elif look.shape == 1:
        mask = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    else:
        mask = np.abs(u) + np.abs(v) <= 1.1
    mask &= pose["visible"][:, None, None]
    n = tile.shape[0]
    iu = np.clip(np.floor(along + n / 2), 0, n - 1).astype(np.intp)
    iv = np.clip(np.floor(across + n / 2), 0, n - 1).astype(np.intp)
    colour = np.where(tile[iv, iu][..., None], look.fg, look.fg2)
    return mask, colour


def _background(rng: np.random.Generator, look: Look, n: int, size: int, cfg: SynthVideoConfig) -> np.ndarray:
    """T×H×W×3 background: the group's gradient + ``cfg.wave`` + static blobs; the clip's ``rng``
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
    frames = look.bg0 * (1 - g) + look.bg1 * g + np.float32(cfg.wave) * tex
    for _ in range(cfg.distractors):
        cx, cy, rad = (np.float32(v) for v in (*scene.uniform(0.15, 0.85, 2), scene.uniform(0.06, 0.12)))
        blob = (xs - cx) ** 2 + (ys - cy) ** 2 < rad**2
        frames = np.where(blob[..., None], _colour(scene), frames)
    return frames


def render_video(rng: np.random.Generator, action: int, look: Look, cfg: SynthVideoConfig) -> np.ndarray:
    """One clip of class ``action``: T×H×W×3 uint8."""
    n = int(rng.integers(cfg.frames[0], cfg.frames[1] + 1))
    look = clip_look(rng, look)
    tile = texture_tile(rng, action, look, cfg.size)
    pose = motion(rng, action, n, cfg.size, look)
    frames = _background(rng, look, n, cfg.size, cfg)
    mask, colour = _object_layer(look, pose, cfg.size, tile)
    frames = np.where(mask[..., None], colour, frames)
    frames += np.float32(cfg.noise) * rng.standard_normal(frames.shape, dtype=np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def clip_rng(cfg: SynthVideoConfig, dataset: str, action: int, group: int, clip: int) -> np.random.Generator:
    key = {"ucf": 0, "hmdb": 1}[dataset]
    return np.random.default_rng([cfg.seed, key, action, group, clip, VIDEO_GENERATOR_VERSION])


def group_look(cfg: SynthVideoConfig, dataset: str, group: int) -> Look:
    """Appearance (object shape, size, place, orientation; scene) shared by every clip of one
    group, whatever its class: UCF101's 'same actor and scene'. Each clip redraws the object's
    colours and texture period (``clip_look``); the class adds the texture family
    (``texture_family``) and the motion."""
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
# 12 groups of 2 clips: the linear probe sees 8 training looks per class (9 x 3 gave 6), and a
# batch of 30 still holds ~3.5 clips of each clip's group, which only the class cues tell apart.
UCF_SYNTH = SynthVideoConfig(noise=3.0, distractors=0, groups=12, clips_per_group=2)  # 10 x 12 x 2 = 240 videos
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
