"""β and γ as effect handlers: exact identities on a Normal–Normal toy."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from abmll_pyro import sites
from abmll_pyro.infer import kl_scale

Y = torch.tensor([0.3, -1.2, 0.8])


def model():
    theta = pyro.sample(sites.theta("m", "mean"), dist.Normal(0.0, 1.0))
    z = pyro.sample(sites.phi(0, "m"), dist.Normal(theta, 2.0))
    with pyro.plate("data", 3):
        pyro.sample("obs", dist.Normal(z, 0.5), obs=Y)


def guide(loc=0.4, scale=0.7, theta=0.1):
    pyro.sample(sites.theta("m", "mean"), dist.Delta(torch.tensor(theta)))
    pyro.sample(sites.phi(0, "m"), dist.Normal(torch.tensor(loc), torch.tensor(scale)))


KL = torch.distributions.kl_divergence(dist.Normal(0.4, 0.7), dist.Normal(0.1, 2.0))
LOG_P_THETA = dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.1))


def loss_at(beta, gamma, elbo):
    pyro.set_rng_seed(123)  # same draw of z for every β: the likelihood term cancels exactly
    with kl_scale(kl_beta=beta, kl_gamma=gamma):
        return elbo.differentiable_loss(model, guide)


@pytest.mark.parametrize("beta", [0.0, 1e-8, 0.3, 5.0])
def test_beta_oracle_mean_field(beta):
    elbo = TraceMeanField_ELBO()
    diff = loss_at(beta, 1.0, elbo) - loss_at(1.0, 1.0, elbo)
    # float32 losses of size ~10: differences hold to a few ulps of the loss
    torch.testing.assert_close(diff, (beta - 1.0) * KL, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1e-6, 2.0])
def test_gamma_scales_the_hyperprior_term(gamma):
    elbo = TraceMeanField_ELBO()
    diff = loss_at(1.0, gamma, elbo) - loss_at(1.0, 1.0, elbo)
    torch.testing.assert_close(diff, -(gamma - 1.0) * LOG_P_THETA, rtol=1e-5, atol=1e-5)


def test_beta_scales_monte_carlo_kl_with_trace_elbo():
    elbo = Trace_ELBO()
    pyro.set_rng_seed(7)
    tr = pyro.poutine.trace(guide).get_trace()
    z = tr.nodes[sites.phi(0, "m")]["value"]
    mc_kl = dist.Normal(0.4, 0.7).log_prob(z) - dist.Normal(0.1, 2.0).log_prob(z)
    pyro.set_rng_seed(7)
    with kl_scale(kl_beta=0.25, kl_gamma=1.0):
        a = elbo.differentiable_loss(model, guide)
    pyro.set_rng_seed(7)
    b = elbo.differentiable_loss(model, guide)
    torch.testing.assert_close(a - b, (0.25 - 1.0) * mc_kl, rtol=1e-5, atol=1e-5)


def test_observed_sites_are_not_scaled():
    with pyro.poutine.trace() as tr, kl_scale(kl_beta=0.5, kl_gamma=0.25):
        pyro.set_rng_seed(0)
        model()
    assert tr.trace.nodes["obs"]["scale"] == 1.0
    assert tr.trace.nodes[sites.phi(0, "m")]["scale"] == 0.5
    assert tr.trace.nodes[sites.theta("m", "mean")]["scale"] == 0.25


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_negative_or_nonfinite_weights_are_errors(bad):
    with pytest.raises(ValueError, match="kl_beta must be finite and >= 0"):
        kl_scale(kl_beta=bad)
    with pytest.raises(ValueError, match="kl_gamma must be finite and >= 0"):
        kl_scale(kl_gamma=bad)


class CountingNormal(dist.Normal):
    """A Normal that counts how often its density is evaluated."""

    calls = 0

    def log_prob(self, value):
        CountingNormal.calls += 1
        return super().log_prob(value)


def counting_model():
    theta = pyro.sample(sites.theta("m", "mean"), CountingNormal(0.0, 1.0))
    z = pyro.sample(sites.phi(0, "m"), dist.Normal(theta, 2.0))
    with pyro.plate("data", 3):
        pyro.sample("obs", dist.Normal(z, 0.5), obs=Y)


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO(), Trace_ELBO()])
def test_a_masked_site_is_never_evaluated_and_the_loss_is_unchanged(elbo):
    pyro.set_rng_seed(3)
    CountingNormal.calls = 0
    with kl_scale(kl_beta=0.5, kl_gamma=0.0):
        lean = elbo.differentiable_loss(counting_model, guide)
    assert CountingNormal.calls == 0
    pyro.set_rng_seed(3)
    with kl_scale(kl_beta=0.5, kl_gamma=1.0):
        full = elbo.differentiable_loss(counting_model, guide)
    assert CountingNormal.calls > 0
    torch.testing.assert_close(full - lean, -LOG_P_THETA, rtol=1e-5, atol=1e-5)
