"""Shared fixtures: every test is seeded; tiny random HF models are built from configs (no download)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pyro
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: the studies import as scripts.<study>
sys.path.insert(0, str(Path(__file__).parent))  # tests/_support, importable as _support
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to oversubscription


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
