"""The hyperprior centred on the starting scale (issue 13, item 1) and the σ logging.

Oracles: the Gamma density's stationary point (d/dτ log p = (a0 − 1)/τ − b0 = 0 at τ = 1/init_std²);
with no data, θ's only pull is −γ·log p(θ) (the task KL is 0 at q = p), so the centred prior keeps
σ_θ at init_std while ABML's Gamma(1, 0.01), whose mode is τ = 0, inflates it.
"""

from types import SimpleNamespace

import pytest
import torch
from _support.helpers import family_episode, tiny_lm
from _support.toys import make_data
from _support.toys_svi import toy_svi

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.infer import Episode
from abmll_pyro.infer.meta import mean_prior_std
from abmll_pyro.methods import ABMLL
from abmll_pyro.models import HierarchicalPrior, Likelihood, TaskData
from abmll_pyro.registry import resolve_prior

INIT_STD = 1e-2


class NoData(Likelihood):
    """Observes nothing: the objective is the β-KL and −γ·log p(θ) alone."""

    def __call__(self, lm, task, index):
        return None


def _adapter(init_std=INIT_STD, std_map="softplus"):
    return BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=2, init_std=init_std, std_map=std_map),
                     generator=torch.Generator().manual_seed(0))


def _svi(adapter, prior, likelihood=None, kl_beta=1.0, steps=2):
    meta = MetaConfig(kl_beta=kl_beta, kl_gamma=1.0, outer_lr=1e-2, grad_clip=None,
                      inner=InnerLoopConfig(num_inner_steps=steps, inner_lr=1e-2))
    return MetaSVI(adapter, meta, prior=prior, likelihood=likelihood, num_tasks=2)


def test_centred_rate_puts_the_precision_mode_at_init_std():
    prior = HierarchicalPrior(init_std=1e-3)
    assert prior.a0 > 1 and prior.precision_mode == pytest.approx(1e6, rel=1e-12)
    tau = torch.tensor(1e6, dtype=torch.float64, requires_grad=True)
    lp = prior.hyperprior((1,), tau.detach())["precision"].base_dist.log_prob(tau)
    (grad,) = torch.autograd.grad(lp, tau)
    assert abs(float(grad)) < 1e-12  # the stationary point of the Gamma log density (float64)
    # a wider or narrower prior keeps the mode
    assert HierarchicalPrior(a0=11.0, init_std=1e-3).precision_mode == pytest.approx(1e6)


def test_init_std_comes_from_the_adapter_through_the_registry():
    adapter = _adapter(init_std=0.05)
    prior = resolve_prior("hierarchical", adapter=adapter)
    assert prior.precision_mode == pytest.approx(0.05 ** -2)
    abml = resolve_prior("hierarchical-abml", adapter=adapter)
    assert (abml.a0, abml.b0) == (1.0, 0.01) and abml.precision_mode == 0.0
    assert resolve_prior("student-t", adapter=adapter).precision_mode == pytest.approx(0.05 ** -2)
    with pytest.raises(ValueError, match="a0 must be > 1"):
        HierarchicalPrior(a0=1.0)


def _no_data_episodes():
    data = make_data(2, 0.7, 0.5, 0)
    return [Episode(f"t{i}", TaskData(data), TaskData(data)) for i in range(2)]


def _elementwise_change(adapter, svi) -> float:
    """mean over all elements of |σ_θ / init_std − 1|"""
    with torch.no_grad():
        return float(torch.cat([(adapter.std(svi.theta(), m) / INIT_STD - 1).abs().flatten() for m in adapter.shapes]).mean())


@pytest.mark.parametrize("name,stays", [("hierarchical", True), ("hierarchical-abml", False)])
def test_without_data_sigma_theta_stays_at_init_std_only_under_the_centred_prior(name, stays):
    """The 1×1 toy (fast): 100 outer steps of KL and −γ·log p(θ)/M only."""
    svi = toy_svi(kl_beta=1.0, kl_gamma=1.0, init_std=INIT_STD, num_inner_steps=2, inner_lr=1e-2)
    svi = MetaSVI(svi.adapter, svi.config, prior=resolve_prior(name, adapter=svi.adapter), likelihood=NoData(), num_tasks=2)
    eps = _no_data_episodes()
    results = [svi.step(eps) for _ in range(100)]
    sigma = mean_prior_std(svi.adapter, svi.theta())
    assert results[0].sigma_theta == pytest.approx(INIT_STD, rel=1e-5)
    assert results[0].sigma_q == pytest.approx(INIT_STD, rel=1e-5)  # q starts as θ's copy; no data moves it
    if stays:  # "a few percent": 3%
        assert abs(sigma / INIT_STD - 1) < 0.03, sigma
    else:  # the ABML prior's pull has no fixed point: σ_θ keeps growing
        assert sigma > 1.5 * INIT_STD, sigma
    assert results[-1].sigma_theta == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("data", [False, True])
def test_with_data_sigma_moves_and_is_logged(data):
    adapter = _adapter()
    svi = _svi(adapter, HierarchicalPrior(adapter=adapter), likelihood=None if data else NoData(), kl_beta=1e-3)
    method = ABMLL(svi, num_train_tasks=2, num_samples=2, predict_mode="sample")
    g = torch.Generator().manual_seed(0)
    parts = []
    for _ in range(5):
        svi.optimizer.zero_grad(set_to_none=True)
        eps = [family_episode(t, 4, 4, g) for t in (0, 1)]  # the harness's episodes carry bare batches
        eps = [SimpleNamespace(name=e.name, support=e.support.batch, query=e.query.batch) for e in eps]
        parts.append(method.train_step(eps, lambda loss: loss.backward()))
        svi.optimizer.step()
    assert parts[0]["sigma_theta"] == pytest.approx(INIT_STD, rel=1e-5)
    assert parts[0]["sigma_q"] > 0
    # the likelihood's gradient reaches σ_θ through the pass-through; elementwise σ_θ leaves init_std
    # (up and down, so the mean moves less). Seen: 6.6e-4 with data after 5 steps, 0 without.
    change = _elementwise_change(adapter, svi)
    assert (change > 1e-4) if data else (change < 1e-6), change


def test_a_prior_built_without_an_adapter_is_centred_on_the_adapters_init_std_by_meta_svi():
    """Python's default equals the CLI's: HierarchicalPrior() given to MetaSVI centres on the adapter's
    init_std (b0 = (a0 - 1)·init_std²), not on AdapterConfig's default; an explicit b0 is kept."""
    from abmll_pyro import AdapterConfig, BayesLoRA, MetaSVI
    from abmll_pyro.lms import load_lm
    from abmll_pyro.models.priors import HierarchicalPrior, StudentTPrior

    model, _ = load_lm("tiny-llama")
    adapter = BayesLoRA(model, AdapterConfig(rank=2, init_std=0.05))
    svi = MetaSVI(adapter, prior=HierarchicalPrior())
    assert svi.model.prior.b0 == pytest.approx(0.05 ** 2)
    t = MetaSVI(adapter, prior=StudentTPrior(df=5.0)).model.prior
    assert isinstance(t, StudentTPrior) and t.df == 5.0 and t.b0 == pytest.approx(0.05 ** 2)
    kept = HierarchicalPrior(b0=0.01)
    assert MetaSVI(adapter, prior=kept).model.prior is kept
