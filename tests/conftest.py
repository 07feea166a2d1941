"""Shared test setup: one embedded-data folder for the whole session (generated once, atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("CROPBENCH_DATA", str(REPO / ".cache" / "test-data"))
torch.set_num_threads(1)  # tests run 2-wide under xdist on 2 cores


@pytest.fixture(scope="session")
def data_root() -> Path:
    return Path(os.environ["CROPBENCH_DATA"])
