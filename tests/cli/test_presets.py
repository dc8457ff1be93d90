"""Presets are valid configs; the paper preset carries the paper's settings."""

from __future__ import annotations

import pytest

from abmll_pyro.data.sources import crossfit_splits
from abmll_pyro.presets import PRESETS, get_preset
from abmll_pyro.train.config import RunConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config(name):
    RunConfig.from_dict(PRESETS[name].config)


def test_paper_preset_matches_the_paper():
    c = RunConfig.from_dict(get_preset("paper").config)
    assert (c.rank, c.lora_alpha, c.num_inner_steps, c.kl_beta, c.tasks_per_step) == (8, 16.0, 5, 1e-8, 2)
    assert c.tasks in crossfit_splits() and c.mixed_precision == "bf16"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        get_preset("gpu")


def test_benchmark_jobs_come_from_the_preset_unless_asked(monkeypatch):
    """cpu-long runs two one-thread runs at once, as its documented results were made; `--jobs` wins, and
    under a distributed launch (which parallelizes each run) the preset's jobs fall back to 1."""
    from abmll_pyro.cli import _benchmark_jobs

    long = get_preset("cpu-long")
    assert (long.jobs, long.config["num_threads"]) == (2, 1)
    assert all(p.jobs >= 1 for p in PRESETS.values())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _benchmark_jobs(None, long.jobs) == 2 and _benchmark_jobs(1, long.jobs) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _benchmark_jobs(None, long.jobs) == 1 and _benchmark_jobs(3, long.jobs) == 3
