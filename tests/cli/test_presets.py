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
