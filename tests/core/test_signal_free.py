"""On tasks without shared signal σ_θ stays where it started (issue 27, item 2).

Setting (float64, so nothing below is round-off): the tiny Llama, rank 2, init_std 1e-3, inner lr 1e-2,
outer lr 1e-2, 8 tasks whose labels are uniform draws independent of the inputs, β = 1 (the ELBO),
40 outer steps of 2 tasks. The labels carry no spread for the prior to learn: the empirical-Bayes
M-step (σ_θ² → σ_q² + (μ_q − μ_θ)²) should leave σ_θ where it is, if the inner loop optimizes the
β-ELBO, whose q stays at p when a few random labels cannot pay for moving weights by more than σ_p.

* the inner optimizers that optimize the β-ELBO (``kl-precond``, ``adam-precond``), with every std map:
  σ_θ within ×1.2 of its start (seen: ×1.000; elementwise |Δ log σ| ≤ 1e-3, so it is not frozen);
* plain ``adam``, the 'before': its ~lr-sized steps scatter q's means far beyond σ_p (a KL floor set by
  the step size), and the M-step matches σ_θ to that scatter: seen ×1.48 after 40 steps on the
  softplus map, ×7.1 after 80 (the issue's ×7.2; ×4.4 at β = 1e-8), ×9.7 after 80 on log-rowcol;
* plain ``sgd``: stable only for inner lr < 2σ_p²/β = 2e-6, so at 1e-2 its inner loop diverges;
* with the whitened low-rank-precision guide every inner optimizer keeps σ_θ within ×1.2 (seen ×1.006 at
  most): its mean offset is measured in units of θ's σ.
"""

import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.config import INNER_OPTIMIZERS
from abmll_pyro.guides import LowRankPrecisionGuide
from abmll_pyro.infer import Episode
from abmll_pyro.infer.inner import NonFiniteLossError
from abmll_pyro.infer.meta import mean_prior_std
from abmll_pyro.models import TaskData

STEPS = 40
INIT_STD = 1e-3


def _growth(optimizer: str, std_map: str, task_guide=None) -> float:
    """σ_θ after STEPS outer steps over σ_θ at the start (the mean over every element)."""
    lm = tiny_lm("llama", seed=1, dtype=torch.float64)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, init_std=INIT_STD, std_map=std_map),
                        generator=torch.Generator().manual_seed(0)).double()
    inner = InnerLoopConfig(num_inner_steps=5, inner_lr=1e-2, optimizer=optimizer)
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1.0, outer_lr=1e-2, inner=inner), num_tasks=8, task_guide=task_guide)
    g = torch.Generator().manual_seed(0)
    episodes = [Episode(f"t{i}", TaskData(random_option_batch(8, generator=g)), TaskData(random_option_batch(8, generator=g)))
                for i in range(8)]
    start = mean_prior_std(adapter, svi.theta())
    for step in range(STEPS):
        svi.step([episodes[(2 * step) % 8], episodes[(2 * step + 1) % 8]])
    return mean_prior_std(adapter, svi.theta()) / start


def test_every_inner_optimizer_is_covered():
    assert set(INNER_OPTIMIZERS) == {"sgd", "adam", "kl-precond", "adam-precond"}


@pytest.mark.parametrize("optimizer,std_map", [
    ("kl-precond", "log-rowcol"), ("adam-precond", "log-rowcol"), ("adam-precond", "softplus"), ("adam-precond", "log-full"),
])
def test_beta_elbo_optimizers_keep_sigma_theta_on_signal_free_tasks(optimizer, std_map):
    growth = _growth(optimizer, std_map)
    assert 1 / 1.2 < growth < 1.2, growth  # the tolerance; seen ×1.000


@pytest.mark.parametrize("optimizer", INNER_OPTIMIZERS)
def test_every_inner_optimizer_keeps_sigma_theta_with_the_whitened_low_rank_guide(optimizer):
    """The low-rank-precision guide with ``whiten``: q's mean offset is in units of θ's σ, so an inner
    step of size lr moves it by about lr·σ whatever σ is (the KL's curvature per offset unit is β, not
    β/σ_p² = 1e6): plain SGD is stable and Adam's steps stay inside the prior. Seen: ×0.99997 (sgd),
    ×1.006 (adam), ×0.99996 (kl-precond), ×0.9995 (adam-precond)."""
    growth = _growth(optimizer, "log-rowcol", LowRankPrecisionGuide(whiten=True))
    assert 1 / 1.2 < growth < 1.2, growth


def test_plain_adam_inflates_sigma_theta_the_failure_reproduced():
    growth = _growth("adam", "softplus")
    assert growth > 1.2, growth  # outside the tolerance; seen ×1.48 at 40 steps (×7.1 after 80)


def test_plain_sgd_diverges_at_this_inner_lr():
    # NaN logits reach the Categorical (ValueError) or the loss check (NonFiniteLossError) first
    with pytest.raises((NonFiniteLossError, ValueError), match="nan|inf"):
        _growth("sgd", "log-rowcol")
