"""Shared fixtures: every test is seeded; tiny random HF models are built from configs (no download).

``device``: the torch device of the tests marked ``device`` (tests/device/), ``$ABMLL_TEST_DEVICE``
(``cpu`` when unset; ``scripts/device_check/run.py --device cuda`` sets it to ``cuda``). A device torch
cannot use stops the session at once rather than skipping every test.
"""

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
TEST_DEVICE_ENV = "ABMLL_TEST_DEVICE"


def pytest_configure(config):
    config.addinivalue_line("markers", f"device: puts its tensors on ${TEST_DEVICE_ENV} (default cpu); "
                                       "scripts/device_check runs these on a GPU")


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = os.environ.get(TEST_DEVICE_ENV) or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        pytest.exit(f"{TEST_DEVICE_ENV}={name!r} is not a torch device: {err}", returncode=4)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"{TEST_DEVICE_ENV}={name!r} but torch sees no CUDA GPU", returncode=4)
    if dev.type not in ("cpu", "cuda"):
        pytest.exit(f"{TEST_DEVICE_ENV}={name!r}: only cpu and cuda are supported", returncode=4)
    return dev


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
