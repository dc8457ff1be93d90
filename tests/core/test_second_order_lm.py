"""order="second" on real (tiny) transformer LMs with their default (sdpa) attention: the gradient of
the query loss after K differentiable inner steps matches central finite differences."""

import pyro
import pytest
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.infer.inner import pass_through
from abmll_pyro.infer.objective import task_loss

TARGETS = {"llama": ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
           "gpt2": ("transformer.h.1.attn.c_attn",)}
# (finite-difference step, relative tolerance). GPT-2 runs wholly in float64: h = 1e-5 leaves truncation
# and round-off near 1e-9 (observed 2e-8). HF's Llama RMSNorm computes in float32 even in a float64
# model, so that loss carries ~1e-7 relative noise: h = 1e-3 (truncation ~h²), tolerance 1e-3 (observed 7e-5).
FD = {"llama": (1e-3, 1e-3), "gpt2": (1e-5, 1e-6)}


def _setup(kind):
    lm = tiny_lm(kind, dtype=torch.float64)
    assert lm.config._attn_implementation == "sdpa"  # the default, whose fused kernels have no double backward
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=2.0, target_modules=TARGETS[kind], init_std=0.05))
    adapter.double()  # θ in float64 too, so central differences resolve the gradient
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    # large inner steps, so the second-order terms are large and a first-order gradient fails the check
    inner = InnerLoopConfig(num_inner_steps=2, inner_lr=0.5, optimizer="sgd", order="second")
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1e-3, inner=inner))
    episode = family_episode(1, 3, 3, torch.Generator().manual_seed(1))
    return svi, episode


def _outer_loss(svi, episode, theta, second=True):
    pyro.set_rng_seed(0)  # the same ε in every evaluation: the loss is a smooth function of θ
    start = svi.guide.task_guide.init_task_params(svi.adapter, theta, episode.support)
    refined = svi.refine(theta, start, episode.support, create_graph=second)
    if not second:
        refined = pass_through(refined, start)
    return task_loss(svi.elbo, svi.model, svi.guide, theta, [refined], [episode.query], svi.config.kl_beta)


def _directional(svi, episode, theta, direction, second):
    keys = list(theta)
    grads = torch.autograd.grad(_outer_loss(svi, episode, theta, second), [theta[k] for k in keys], allow_unused=True)
    return sum(float((g * direction[k]).sum()) for k, g in zip(keys, grads) if g is not None)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_second_order_gradient_matches_finite_differences(kind):
    svi, episode = _setup(kind)
    theta = svi.theta()
    g = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    h, rtol = FD[kind]
    with torch.no_grad():
        plus = {k: (v + h * direction[k]).requires_grad_() for k, v in theta.items()}
        minus = {k: (v - h * direction[k]).requires_grad_() for k, v in theta.items()}
    numeric = (float(_outer_loss(svi, episode, plus)) - float(_outer_loss(svi, episode, minus))) / (2 * h)
    assert abs(_directional(svi, episode, theta, direction, True) - numeric) <= rtol * abs(numeric)
    # the check has teeth: the first-order pass-through misses the finite difference by far more
    assert abs(_directional(svi, episode, theta, direction, False) - numeric) > 100 * rtol * abs(numeric)
