"""Downstream protocols, one module each, all with the signature
``evaluate(encoder, settings, data) -> dict[str, float]`` (see ``base.py``)."""
