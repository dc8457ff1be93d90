"""One tiny trained run shared by the reliability tests that only read it (copy it before changing it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from abmll_pyro.cli import main

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny ABMLL run on the hand-written tasks: 2 steps, checkpoints step-000001 and step-000002."""
    out = tmp_path_factory.mktemp("shared") / "run"
    assert main(["--quiet", "train", "--method", "abmll", "--tasks", str(HANDWRITTEN), "--out", str(out), *TINY,
                 "--steps", "2", "--checkpoint-every", "1"]) == 0
    return out
