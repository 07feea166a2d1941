"""View operators, shared by every layer: tensors in, views with provenance out.

* ``image``: batched image views (random resized crop, flip, colour jitter, grayscale, blur,
  solarize, normalisation) and the statistics between two views (box IoU, centre distance,
  grid centres for dense correspondence);
* ``video``: clip views (a temporal window + one spatial crop + per-clip photometric ops) and
  the cube statistics between two clip views;
* ``video_transforms``: the video tensor operators under them (differentiable cube sampling,
  Kinetics normalisation, evaluation crops).

Everything here is deterministic given an explicit ``torch.Generator`` and runs on the device of
its input. The package imports only the core (``cropbench.types``, ``cropbench.errors``, the data
layer's normalisation constants): methods, evaluations and the plotting module import it, never
the other way round.
"""
