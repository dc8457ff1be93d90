"""Lean weight noise: same values and gradients as the plain formulas, few dense buffers for backward."""

import pyro.distributions as dist
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm
from pyro.distributions.kl import kl_divergence

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI
from abmll_pyro.infer.objective import task_loss
from abmll_pyro.lora.noise import (
    LeanNormal, NormalSample, dense_saved_storages, differentiable_twice, normal_kl,
)
from abmll_pyro.models import TaskData

SHAPE = (5, 7)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def test_sample_values_and_gradients_equal_todays_rsample():
    loc, raw = _leaves(SHAPE, SHAPE)
    weight = torch.randn(SHAPE, dtype=torch.float64)
    torch.manual_seed(5)
    lean = LeanNormal(loc, torch.nn.functional.softplus(raw)).rsample()
    torch.manual_seed(5)
    plain = dist.Normal(loc, torch.nn.functional.softplus(raw)).rsample()  # today's path: ε saved for backward
    assert torch.equal(lean, plain)
    g_lean = torch.autograd.grad((weight * lean).sum(), [loc, raw])
    g_plain = torch.autograd.grad((weight * plain).sum(), [loc, raw])
    for a, b in zip(g_lean, g_plain):
        assert torch.equal(a, b)


def test_sample_with_an_explicit_generator_and_twice_differentiable():
    loc, raw = _leaves(SHAPE, SHAPE)
    hessian_vector, draws = [], []
    for lean in (True, False):
        g = torch.Generator().manual_seed(7)
        scale = raw.exp()
        if lean:
            out = NormalSample.apply(loc * loc, scale, g)
        else:
            out = loc * loc + torch.empty(SHAPE, dtype=torch.float64).normal_(generator=g) * scale
        draws.append(out.detach())
        grads = torch.autograd.grad(out.pow(3).sum(), [loc, raw], create_graph=True)
        hessian_vector.append(torch.autograd.grad(sum(x.sum() for x in grads), [loc, raw]))
    assert torch.equal(*draws)
    for a, b in zip(*hessian_vector):
        assert torch.allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("p_shape", [SHAPE, ()])
def test_fused_kl_equals_torch_kl_values_gradients_and_second_order(p_shape):
    mq, rq, mp, rp = _leaves(SHAPE, SHAPE, p_shape, p_shape, seed=3)
    Normal = torch.distributions.Normal
    reference = torch.distributions.kl_divergence(Normal(mq, rq.exp()), Normal(mp, rp.exp()))
    assert torch.allclose(normal_kl(mq, rq.exp(), mp, rp.exp()), reference, rtol=1e-12)
    leaves = [mq, rq, mp, rp]
    g_ref = torch.autograd.grad(reference.sum(), leaves, create_graph=True)
    g_fused = torch.autograd.grad(normal_kl(mq, rq.exp(), mp, rp.exp()).sum(), leaves)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, rtol=1e-10)
    with differentiable_twice():
        g_twice = torch.autograd.grad(normal_kl(mq, rq.exp(), mp, rp.exp()).sum(), leaves, create_graph=True)
    h_ref = torch.autograd.grad(sum((x * x).sum() for x in g_ref), leaves)
    h_twice = torch.autograd.grad(sum((x * x).sum() for x in g_twice), leaves)
    for a, b in zip(h_twice, h_ref):
        assert torch.allclose(a, b, rtol=1e-10)


def test_lean_normal_is_a_normal_with_the_fused_kl():
    mq, rq, mp, rp = _leaves(SHAPE, SHAPE, SHAPE, SHAPE, seed=4)
    q = LeanNormal(mq, rq.exp()).to_event(2)
    p = dist.Normal(mp, rp.exp()).to_event(2)
    assert isinstance(q.base_dist, dist.Normal)
    x = q.rsample()
    assert x.shape == SHAPE and x.grad_fn is not None and "NormalSample" in type(x.grad_fn).__name__
    plain_q = dist.Normal(mq, rq.exp()).to_event(2)
    assert torch.allclose(q.log_prob(x), plain_q.log_prob(x))
    assert torch.allclose(kl_divergence(q, p), kl_divergence(plain_q, p))
    names, stack = set(), [kl_divergence(q, p).grad_fn]  # the fused node is in the KL's graph
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(type(fn).__name__)
            stack += [n for n, _ in fn.next_functions]
    assert "_NormalKLBackward" in names and "PowBackward0" not in names


@pytest.mark.parametrize("theta_grad", [False, True])
def test_dense_buffers_saved_for_backward_per_module(theta_grad):
    """One adapted module at the lowest adapted block: the task loss keeps <= 3 dense ``[out, in]``
    buffers for backward in an inner step (θ fixed: the std map's input and the KL's two products;
    the plain formulas kept 6: σ⊙ε's noise, the KL's pow/div/log intermediates, the std map's input).
    With θ's gradient (the outer loss) it keeps 7 (plain: 10): the KL's three products, both std maps'
    inputs and the hierarchical prior's precision→scale pair (pow, rsqrt) in models/priors.py."""
    lm = tiny_lm("llama")
    name = "model.layers.1.self_attn.q_proj"
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=(name,)))
    svi = MetaSVI(adapter, MetaConfig(kl_beta=0.1))
    theta = svi.theta() if theta_grad else {k: v.detach() for k, v in svi.theta().items()}
    params = {k: v.detach().requires_grad_() for k, v in svi.guide.task_guide.init_task_params(adapter, theta).items()}
    loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [params], [TaskData(random_option_batch(4))], 0.1)
    frozen = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    count = len(dense_saved_storages(loss, adapter.shapes[name], frozen))
    assert 1 <= count <= (3 if not theta_grad else 7)
