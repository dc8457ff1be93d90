"""LeanMeanFieldELBO: the same loss and gradients as TraceMeanField_ELBO, without the unread densities."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm
from pyro.infer import TraceMeanField_ELBO

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI
from abmll_pyro.guides.mean_field import MeanFieldGuide, PointMassGuide
from abmll_pyro.infer.elbo import LeanMeanFieldELBO
from abmll_pyro.infer.objective import global_loss, task_loss
from abmll_pyro.models import TaskData
from abmll_pyro.models.priors import FixedPrior, HierarchicalPrior, StudentTPrior

PRIORS = {"hierarchical": HierarchicalPrior, "fixed": FixedPrior, "student-t": StudentTPrior}
GUIDES = {"mean-field": MeanFieldGuide, "point-mass": PointMassGuide}


def _loss_and_grads(elbo, prior: str, guide: str, beta: float = 0.3, gamma: float = 0.0):
    lm = tiny_lm("llama")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, init_std=0.05))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prior_obj = PRIORS[prior](adapter=adapter) if prior != "fixed" else FixedPrior()
    svi = MetaSVI(adapter, MetaConfig(kl_beta=beta), prior=prior_obj, task_guide=GUIDES[guide](), elbo=elbo)
    theta = svi.theta()
    params = {k: (v * 1.01).detach().requires_grad_() for k, v in theta.items()}
    pyro.set_rng_seed(11)
    loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [params], [TaskData(random_option_batch(4))], beta)
    if gamma:
        loss = loss + global_loss(svi.elbo, svi.model, svi.guide, theta, gamma)
    leaves = list(theta.values()) + list(params.values())
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("prior,guide", [("hierarchical", "mean-field"), ("fixed", "mean-field"),
                                         ("student-t", "mean-field"), ("hierarchical", "point-mass")])
def test_same_loss_and_gradients_as_trace_mean_field(prior, guide):
    """Same terms in the same order, β·Σ KL for Σ β·KL (Student-t: the Monte Carlo fallback)."""
    lean, g_lean = _loss_and_grads(LeanMeanFieldELBO(max_plate_nesting=1), prior, guide, gamma=0.5)
    stock, g_stock = _loss_and_grads(TraceMeanField_ELBO(max_plate_nesting=1), prior, guide, gamma=0.5)
    torch.testing.assert_close(lean, stock, rtol=1e-6, atol=0.0)
    for a, b in zip(g_lean, g_stock):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unread_latent_densities_are_not_evaluated(monkeypatch):
    calls = []
    plain = dist.Normal.log_prob
    monkeypatch.setattr(dist.Normal, "log_prob", lambda self, value: calls.append(1) or plain(self, value))
    _loss_and_grads(LeanMeanFieldELBO(max_plate_nesting=1), "hierarchical", "mean-field")
    assert calls == []  # ΔW's prior and guide densities: the analytic KL replaces both
    _loss_and_grads(TraceMeanField_ELBO(max_plate_nesting=1), "hierarchical", "mean-field")
    assert len(calls) >= 2


def test_plate_stack_overflow_is_still_caught_at_an_unevaluated_latent_site():
    def model():
        with pyro.plate("p", 3, dim=-1), pyro.plate("q", 2, dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 3), 1.0))

    for elbo in (TraceMeanField_ELBO(max_plate_nesting=1), LeanMeanFieldELBO(max_plate_nesting=1)):
        with pytest.raises(ValueError, match="plate stack overflow"):
            elbo.differentiable_loss(model, model)
