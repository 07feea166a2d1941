"""cropbench: a reproducibility benchmark suite for how views are built in contrastive SSL."""

__version__ = "0.1.0"
