"""KL, prior and likelihood terms stay in float32 when the LM runs in bfloat16."""

import pyro.poutine as poutine
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI, sites


def test_bf16_model_keeps_latent_and_observed_terms_in_float32():
    lm = tiny_lm("llama", dtype=torch.bfloat16)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1e-8))
    ep = family_episode(0, 3, 4, torch.Generator().manual_seed(0))
    theta = svi.theta()
    assert all(v.dtype == torch.float32 for v in theta.values())
    task = svi.adapt(ep.support)
    args = (theta, [task], [ep.query])
    guide_tr = poutine.trace(svi.guide).get_trace(*args)
    model_tr = poutine.trace(poutine.replay(svi.model, trace=guide_tr)).get_trace(*args)
    model_tr.compute_log_prob()
    latent = [n for n in model_tr.nodes if sites.is_phi(n) or sites.is_theta(n)]
    assert latent
    for name in latent + [sites.obs(0)]:
        assert model_tr.nodes[name]["log_prob"].dtype == torch.float32, name
    result = svi.step([ep], num_tasks=1)
    assert result.loss == result.loss and result.task_kl >= 0
    from abmll_pyro.infer import task_loss

    loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [task], [ep.query], kl_beta=1e-8)
    assert loss.dtype == torch.float32  # the β-scaled KL is added in float32, not bf16


def test_factor_products_and_kl_stay_float32_under_bf16_autocast():
    """Mixed precision (float32 weights, bf16 autocast): autocast would run μ = (α/r)·B A and σ's factor
    product in bf16; they, and the task KL built from them, are computed outside it, bit for bit the
    values without autocast."""
    import pyro.distributions as dist
    from torch.distributions import kl_divergence

    for std_map in ("softplus", "log-rowcol"):
        adapter = BayesLoRA(tiny_lm("llama"), AdapterConfig(rank=2, std_map=std_map), generator=torch.Generator().manual_seed(0))
        svi = MetaSVI(adapter, MetaConfig(kl_beta=1.0))
        prior = {k: v.detach() for k, v in svi.theta().items()}
        task = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in prior.items()}
        m = adapter.module_names[0]

        def terms():
            q = svi.guide.task_guide.task_distribution(adapter, task, m)
            p = dist.Normal(adapter.mean(prior, m), adapter.std(prior, m))
            return adapter.mean(task, m), adapter.std(task, m), kl_divergence(q.base_dist, p).sum()

        plain = terms()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = terms()
        for a, b in zip(plain, mixed):
            assert b.dtype == torch.float32, std_map
            assert torch.equal(a, b), std_map
