"""Shared CLI fixtures: the hand-written task folder and the small settings every CLI test uses."""

from __future__ import annotations

from pathlib import Path

import pytest

HANDWRITTEN = Path(__file__).parent / "handwritten"
# tiny random Llama; small budgets: each train/evaluate call takes about a second on one core
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]


@pytest.fixture
def handwritten() -> Path:
    return HANDWRITTEN


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
