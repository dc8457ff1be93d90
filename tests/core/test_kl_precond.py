"""The ``kl-precond`` inner step (issue 13, item 3): the β-KL's curvature, and β = 1 without blow-up.

Oracles: (1) the curvature equals twice the exact Hessian of β·KL in each factor's rows (B) or
columns (A), r×r blocks that couple the rank components (the KL's mean term is quadratic in each
factor of B·A; the abs map has no second derivative, and at q = p the smooth maps' ∂KL/∂σ_q = 0, so
Gauss–Newton is exact there); (2) with kl_beta = 0 the step is SGD.
"""

import pytest
import torch
from pyro.distributions.kl import kl_divergence
from _support.helpers import family_episode, random_option_batch, tiny_lm
from torch import nn

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.infer.kl_curvature import RankBlocks, kl_curvature, precondition
from abmll_pyro.infer.objective import task_kl
from abmll_pyro.models import HierarchicalPrior, Likelihood, TaskData


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 4, bias=False)


def _blocks_of(hess, shape, dim):
    """The exact Hessian's r×r blocks of a factor's rows (dim 0, [out, r]) or columns (dim 1, [r, in])."""
    idx = torch.arange(shape[0] * shape[1]).reshape(shape)
    groups = idx if dim == 0 else idx.T  # [n, r] flat indices of each row (column)
    return torch.stack([hess[g][:, g] for g in groups])


@pytest.mark.parametrize("std_map", ["softplus", "paper", "log-rowcol", "log-full"])
def test_curvature_is_the_exact_hessian_of_the_kl_rank_blocks_included(std_map):
    """Oracle: torch's Hessian of β·KL in each factor (float64). The pair factors' curvature is twice
    the exact Hessian's r×r block of each row of B / column of A (the rank coupling kept); the free
    log-scale's is its exact diagonal (q = p, where Gauss–Newton is exact), the additive log-scales'
    three times it (three terms move each element)."""
    adapter = BayesLoRA(Small(), AdapterConfig(rank=2, lora_alpha=3.0, target_modules=("proj",), init_std=0.1,
                                               std_map=std_map), generator=torch.Generator().manual_seed(0))
    theta = {k: v.detach().double() for k, v in adapter.global_params().items()}
    prior = HierarchicalPrior(adapter=adapter)
    g = torch.Generator().manual_seed(1)
    task = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    if std_map != "paper":  # q's σ = p's σ: where Gauss–Newton is exact for the smooth maps
        task.update({k: v for k, v in theta.items() if ":sigma" in k})
    beta = 0.7
    curv = kl_curvature(adapter, prior, theta, beta)(task)
    assert set(curv) == set(task)
    p = prior.task_distribution(prior.global_values(adapter.mean(theta, "proj"), adapter.std(theta, "proj")), (4, 5), theta["proj:mu_A"][:0].sum())
    for key, value in task.items():
        def kl_of(x):
            params = dict(task, **{key: x.reshape(value.shape)})
            q = torch.distributions.Normal(adapter.mean(params, "proj"), adapter.std(params, "proj"))
            return beta * kl_divergence(q, p.base_dist).sum()

        hess = torch.autograd.functional.hessian(kl_of, value.flatten())
        h = curv[key]
        if isinstance(h, RankBlocks):
            assert h.dim == (0 if key.endswith("_B") else 1)
            torch.testing.assert_close(h.blocks, 2 * _blocks_of(hess, value.shape, h.dim), rtol=1e-8, atol=1e-10)
        else:
            factor = 1.0 if key.endswith("sigma_log") else 3.0
            torch.testing.assert_close(h, factor * hess.diagonal().reshape(value.shape), rtol=1e-8, atol=1e-10)


def test_block_step_solves_the_damped_newton_system():
    """(I + D·H)⁻¹·D·d per row against a dense solve of the whole factor's system."""
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    blocks = RankBlocks(L @ L.transpose(1, 2), 0)
    d, D = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.rand(3, 2, generator=g, dtype=torch.float64)
    dense = torch.block_diag(*blocks.blocks)
    want = torch.linalg.solve(torch.eye(6, dtype=torch.float64) + D.flatten()[:, None] * dense, D.flatten() * d.flatten())
    torch.testing.assert_close(precondition(d, D, blocks), want.reshape(3, 2), rtol=1e-12, atol=1e-12)
    cols = RankBlocks(blocks.blocks, 1)  # the same blocks on the columns of the transposed factor
    torch.testing.assert_close(precondition(d.T, D.T, cols), want.reshape(3, 2).T, rtol=1e-12, atol=1e-12)


def _svi(kl_beta, optimizer, lr, steps=5, init_std=1e-3):
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=4, init_std=init_std),
                        generator=torch.Generator().manual_seed(0))
    inner = InnerLoopConfig(num_inner_steps=steps, inner_lr=lr, optimizer=optimizer)
    return MetaSVI(adapter, MetaConfig(kl_beta=kl_beta, inner=inner))


def _adapted_kl(kl_beta, optimizer, lr):
    svi = _svi(kl_beta, optimizer, lr)
    ep = family_episode(0, 8, 4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    post = svi.adapt(ep.support)
    return task_kl(svi.model, svi.guide, svi.theta(), post), post


def test_zero_beta_is_sgd():
    torch.manual_seed(0)
    _, a = _adapted_kl(0.0, "kl-precond", 1e-2)
    torch.manual_seed(0)
    _, b = _adapted_kl(0.0, "sgd", 1e-2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_kl_follows_beta_under_precond_but_sits_on_adams_floor():
    """σ_p = 1e-3, 5 inner steps at lr 1e-2 on one task of 8 examples."""
    adam = {beta: _adapted_kl(beta, "adam", 1e-2)[0] for beta in (1e-2, 1.0)}
    precond = {beta: _adapted_kl(beta, "kl-precond", 1e-2)[0] for beta in (1e-2, 1.0)}
    # Adam: the KL is set by the step size, not by β (seen: equal within 2%); SGD at this lr diverges
    assert adam[1.0] == pytest.approx(adam[1e-2], rel=0.2), adam
    # kl-precond: a 100x stronger KL gives a smaller KL, and far below Adam's floor at β = 1
    assert precond[1.0] < 0.5 * precond[1e-2], precond
    assert precond[1.0] < 1e-2 * adam[1.0], (precond, adam)


class _NoData(Likelihood):
    """Observes nothing: the inner objective is the β-KL alone."""

    def __call__(self, lm, task, index):
        return None


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_kl_only_problem_is_resolved_in_five_steps_at_every_rank(rank):
    """β = 1, σ_p = 1e-3, the task's mean factors displaced by 1e-2 (float64), 5 steps at lr 1e-2.
    With the rank blocks the residual shrinks by a constant factor per step whatever the rank: seen
    KL/KL₀ = 1.2e-6, 4.3e-6, 1.4e-5 at ranks 2, 8, 16 (with the diagonal curvature the issue measured 0.1%, 1.3–3% and
    17–46%, and the KL rose again at some steps); the bound 1e-4 leaves a margin of 7x at rank 16."""
    adapter = BayesLoRA(tiny_lm("llama", seed=1, dtype=torch.float64), AdapterConfig(rank=rank, init_std=1e-3),
                        generator=torch.Generator().manual_seed(0)).double()
    inner = InnerLoopConfig(num_inner_steps=5, inner_lr=1e-2, optimizer="kl-precond")
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1.0, inner=inner), likelihood=_NoData())
    theta = {k: v.detach() for k, v in svi.theta().items()}
    g = torch.Generator().manual_seed(rank)
    start = {k: v + (1e-2 * torch.randn(v.shape, generator=g, dtype=v.dtype) if ":mu" in k else 0) for k, v in theta.items()}
    support = TaskData(random_option_batch(4))
    kls = [task_kl(svi.model, svi.guide, theta, svi.refine(theta, start, support, num_inner_steps=k)) for k in range(6)]
    assert all(b < a for a, b in zip(kls, kls[1:])), kls  # monotone
    assert kls[-1] < 1e-4 * kls[0], kls
