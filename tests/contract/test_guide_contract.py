"""The guide contract, and the objective built from every prior × guide pair.

For every task guide (and the example plug-in): ``init_task_params`` returns θ's keys and shapes with
autograd history to θ (and may add keys of its own); ``task_distribution`` has event shape ``[out, in]`` in the LM's dtype; the
traced guide and model have one ``phi[i]/<m>`` site per task and module for 1 and 3 tasks; the
β-tempered loss is finite, linear in β (a KL-scale identity) and its gradient reaches θ's factors
(and the guide's own parameters, when it has any).
"""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from abmll_pyro import sites
from abmll_pyro.infer import pass_through, task_loss

DTYPES = [torch.float32, torch.float64]


def _starts(svi, eps):
    theta = svi.theta()
    return theta, [svi.guide.task_guide.init_task_params(svi.adapter, theta, ep.support) for ep in eps]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guide_start_and_distribution(guide_spec, dtype, make_svi, make_episodes):
    svi = make_svi("hierarchical", guide_spec, dtype)
    adapter, guide = svi.adapter, svi.guide.task_guide
    theta, (start,) = _starts(svi, make_episodes([0]))
    assert set(theta) <= set(start)  # θ's keys, plus any the guide adds for itself (e.g. covariance columns)
    for k in theta:
        v = start[k]
        assert v.shape == theta[k].shape and v.dtype == theta[k].dtype, k
        assert v.requires_grad and v.grad_fn is not None, f"{k}: the start must keep its history to θ"
    for m, shape in adapter.shapes.items():
        q = guide.task_distribution(adapter, start, m)
        assert q.event_shape == shape and q.batch_shape == ()
        x = q.rsample() if q.has_rsample else q.sample()
        assert x.shape == shape and x.dtype == dtype
        assert torch.isfinite(q.log_prob(x))


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_sites_and_loss_for_1_and_3_tasks(prior_spec, guide_spec, num_tasks, make_svi, make_episodes):
    svi = make_svi(prior_spec, guide_spec)
    eps = make_episodes(range(num_tasks))
    theta, starts = _starts(svi, eps)
    tasks = [ep.support for ep in eps]
    guide_tr = poutine.trace(svi.guide).get_trace(theta, starts, tasks)
    model_tr = poutine.trace(poutine.replay(svi.model, trace=guide_tr)).get_trace(theta, starts, tasks)
    phi = [n for n in guide_tr.nodes if sites.is_phi(n)]
    assert phi == [sites.phi(i, m) for i in range(num_tasks) for m in svi.adapter.shapes]
    for i in range(num_tasks):
        for m, shape in svi.adapter.shapes.items():
            assert model_tr.nodes[sites.phi(i, m)]["value"].shape == shape
        assert model_tr.nodes[sites.obs(i)]["value"].shape == (len(eps[i].support.batch),)
    theta_sites = {n for n in guide_tr.nodes if sites.is_theta(n)}
    assert theta_sites == {n for n in model_tr.nodes if sites.is_theta(n)}
    loss = task_loss(svi.elbo, svi.model, svi.guide, theta, starts, tasks, kl_beta=1e-3)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_beta_scaling_identity(prior_spec, guide_spec, dtype, make_svi, make_episodes):
    """Under one seed the guide draws the same ΔW, so L(β) = L(0) + β·(L(1) − L(0)) exactly (analytic
    or Monte Carlo KL alike). Tolerance: a few ulps of the largest term, ~1e-5 relative in float32."""
    svi = make_svi(prior_spec, guide_spec, dtype)
    theta, (start,) = _starts(svi, make_episodes([0]))
    g = torch.Generator().manual_seed(1)
    starts = [{k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}]  # q ≠ p
    tasks = [make_episodes([0])[0].support]

    def loss(kl_beta):
        pyro.set_rng_seed(7)
        with torch.no_grad():
            return float(task_loss(svi.elbo, svi.model, svi.guide, theta, starts, tasks, kl_beta).double())

    l0, l1, lh = loss(0.0), loss(1.0), loss(0.25)
    assert l1 != l0  # the KL term is not zero (the start is moved off θ)
    tol = (1e-5 if dtype == torch.float32 else 1e-10) * max(abs(l0), abs(l1))
    assert abs(lh - (l0 + 0.25 * (l1 - l0))) <= tol, (l0, l1, lh)


def test_gradients_reach_theta_and_guide_parameters(prior_spec, guide_spec, make_svi, make_episodes):
    svi = make_svi(prior_spec, guide_spec)
    eps = make_episodes([0])
    theta, (start,) = _starts(svi, eps)
    refined = svi.refine(theta, start, eps[0].support, num_inner_steps=1)
    task = pass_through(refined, start)
    loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [task], [eps[0].query], kl_beta=1e-3)
    loss.backward()
    # a factor the loss does not use has no gradient (σ under the point-mass guide and the fixed prior)
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in svi.adapter.global_params().items()}
    assert all(torch.isfinite(g).all() for g in grads.values()), grads
    for k in grads:
        if "mu_" in k:  # the means drive the likelihood under every guide
            assert grads[k].abs().sum() > 0, k
    guide = svi.guide.task_guide
    if isinstance(guide, nn.Module):
        own = [p.grad for p in guide.parameters()]
        assert all(g is None or torch.isfinite(g).all() for g in own)
        assert any(g is not None and g.abs().sum() > 0 for g in own), "no gradient reached the guide's parameters"
        assert {id(p) for p in guide.parameters()} <= {id(p) for p in svi.trainable_parameters()}
