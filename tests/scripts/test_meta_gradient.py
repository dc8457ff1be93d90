"""The outer-gradient probe (scripts/meta_gradient/meta_gradient.py): its statistics and an identity of its KL parts."""

from __future__ import annotations

import math

import pytest
import torch

from abmll_pyro.presets import get_preset, synthetic_task_folder
from abmll_pyro.train.config import RunConfig
from scripts.meta_gradient.meta_gradient import gradient_stats, meta_gradient_probe


def test_gradient_stats_against_hand_values():
    same = gradient_stats([torch.tensor([3.0, 4.0])] * 3)
    assert same["norm_of_mean"] == pytest.approx(5.0) and same["rms_deviation"] == 0 and math.isinf(same["snr"])
    opposite = gradient_stats([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
    assert opposite["norm_of_mean"] == 0 and opposite["rms_deviation"] == pytest.approx(1.0) and opposite["snr"] == 0
    assert opposite["mean_norm"] == pytest.approx(1.0)


def test_zero_inner_steps_make_the_kl_parts_vanish_in_the_mean(tmp_path):
    """With K = 0 the task posterior is θ itself: KL(q ‖ p_θ) has zero gradient in θ's mean factors
    for both ways of taking it (q = p at the optimum of the KL)."""
    values = dict(get_preset("smoke").config)
    values.update(tasks=str(synthetic_task_folder(tmp_path / "tasks", num_train=4, num_test=2, examples=12)),
                  num_inner_steps=0)
    r = meta_gradient_probe(RunConfig.from_dict(values), num_batches=2)
    assert r["kl_prior"]["mean_norm"] < 1e-6 * max(r["nll"]["mean_norm"], 1e-12) + 1e-9
    assert r["kl_pass_through"]["mean_norm"] < 1e-9
    assert r["nll"]["mean_norm"] > 0 and r["same_initial_factors"] and r["lora"]["mean_norm"] > 0
