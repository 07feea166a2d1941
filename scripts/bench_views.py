"""Time the batched view pipeline (``make_view``) and its colour jitter alone, one thread.

    python scripts/bench_views.py                          # 32 and 224 px, batch 256 and 64
    python scripts/bench_views.py --reference OLD_VIEWS.py  # and another views.py, interleaved

``--reference`` loads a second copy of ``cropbench/views/image.py`` (e.g. ``git show
HEAD~1:cropbench/views/image.py > /tmp/old_views.py``) and times it in the same loop, on the same
canvases and draws, so a before / after comparison shares the machine's load; it also prints the
largest output difference. Canvas: 64 px for 32-px views (the micro recipes), 256 px for 224-px
views (ImageNet recipes); view recipe:
``ViewConfig`` defaults (MoCo v2: random-order jitter), blur only at 224 px as the recipes do.
``cropbench bench`` reuses ``view_inputs`` and ``time_call``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch

from cropbench.views import image as views


def view_inputs(size: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, views.ViewConfig]:
    """uint8 canvases (64 px for 32-px views, else 256 px) and the view recipe timed."""
    canvas = 64 if size <= 32 else 256
    images = torch.randint(
        0, 256, (batch, 3, canvas, canvas), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return images, views.ViewConfig(size=size, blur_p=0.5 if size >= 96 else 0.0)


def time_call(fn: Callable[[], object], reps: int, device: torch.device | None = None) -> list[float]:
    """Seconds per call, ``reps`` calls after one warm-up (on CUDA: until the device is done)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    out = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference_views", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference_views"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _calls(mod: ModuleType, size: int, batch: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The two timed calls of one views module, on fixed inputs and draws (a CPU generator, so
    that every device sees the same draws)."""
    images, cfg = view_inputs(size, batch)
    images, cfg = images.to(device), mod.ViewConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    factors, order = mod.sample_jitter(batch, cfg, torch.Generator().manual_seed(2), device)
    return {
        "make_view": lambda: mod.make_view(images, cfg, torch.Generator().manual_seed(3)).tensor,
        "color_jitter": lambda: mod.color_jitter(x, factors, order),
    }


def bench(size: int, batch: int, reps: int, reference: ModuleType | None, device: torch.device) -> None:
    mods = {"ours": views} | ({"reference": reference} if reference else {})
    calls = {name: _calls(mod, size, batch, device) for name, mod in mods.items()}
    for what in ("make_view", "color_jitter"):
        times: dict[str, list[float]] = {name: [] for name in mods}
        for _ in range(reps):  # interleaved: both see the same load
            for name in mods:
                times[name] += time_call(calls[name][what], 1, device)
        line = f"{size:4d} px  batch {batch:4d}  {device.type} {what:13s}"
        for name, t in times.items():
            line += f"  {name} {1e3 * min(t):8.1f} ms (median {1e3 * statistics.median(t):8.1f})"
        if reference:
            diff = (calls["ours"][what]() - calls["reference"][what]()).abs().max()
            line += f"  speed-up {min(times['reference']) / min(times['ours']):.2f}x  max|diff| {float(diff):.1e}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", help="another views.py to time alongside (before / after)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the canvases and views live")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = _load(args.reference) if args.reference else None
    for size in args.sizes:
        for batch in args.batches:
            bench(size, batch, args.reps, reference, torch.device(args.device))


if __name__ == "__main__":
    main()
