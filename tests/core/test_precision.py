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
