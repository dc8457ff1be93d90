"""The example plug-in file (docs/extending.md) loads by path and meta-trains through MetaSVI."""

import math
from pathlib import Path

import pyro.distributions as dist
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI, posterior_predictive
from abmll_pyro.registry import resolve_guide, resolve_prior

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_prior_guide.py"


def test_laplace_prior_and_tempered_guide_train_by_file_path():
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=2, init_std=1e-2),
                        generator=torch.Generator().manual_seed(0))
    prior = resolve_prior(f"{EXAMPLE}:LaplacePrior", scale_rate=10.0)
    guide = resolve_guide(f"{EXAMPLE}:TemperedGuide", adapter=adapter)
    assert type(prior).__name__ == "LaplacePrior" and prior.scale_rate == 10.0
    config = MetaConfig(kl_beta=1e-3, outer_lr=3e-2, inner=InnerLoopConfig(num_inner_steps=2, inner_lr=1e-3))
    svi = MetaSVI(adapter, config, prior=prior, task_guide=guide)
    tau = {k: float(v.detach()) for k, v in guide.log_temperature.items()}
    assert {id(p) for p in guide.parameters()} <= {id(p) for p in svi.trainable_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        result = svi.step([family_episode(t, 4, 6, g) for t in (0, 1)], num_tasks=40)
        assert math.isfinite(result.loss) and math.isfinite(result.log_p_theta)
    assert all(float(v.detach()) != tau[k] for k, v in guide.log_temperature.items())  # the temperatures learn
    ep = family_episode(100, 4, 6, g)
    probs = posterior_predictive(svi, svi.adapt(ep.support), ep.query, num_samples=2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(ep.query.batch)))
    # Laplace has no closed-form KL against the Normal q: the task KL is the Monte Carlo estimate
    m = adapter.module_names[0]
    p = prior.task_distribution(prior.global_values(adapter.mean(svi.theta(), m), adapter.std(svi.theta(), m)),
                                adapter.shapes[m], torch.zeros(()))
    assert isinstance(p.base_dist, dist.Laplace)
