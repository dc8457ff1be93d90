"""The low-rank-precision task guide against dense oracles.

* The distribution: log-density, entropy, marginal variances and the KL to an elementwise Normal
  equal a dense MultivariateNormal with precision diag(1/σ²) + W Wᵀ (float64, to 1e-10); its
  reparameterized draws have that covariance (200k draws: the largest entry error under 5 standard
  errors of a sample covariance, ≈ 5·√(2/n)·max|Σ| ≈ 0.016·max|Σ|); R = 0 is the mean-field Normal;
  rows of U that are zero (skipped by the R×R algebra) change none of that; a column's round-off
  rows come out as exact zeros.
* The GGN start on the LM head: Σ_j vec(u_j v_jᵀ) vec(u_j v_jᵀ)ᵀ equals Jᵀ H J, the option scores'
  Gauss–Newton matrix over the support set computed densely from per-example Jacobians (each column
  is exactly rank 1 for the head, read at one position), to 1e-8 relative.
* The inner loop leaves θ's copied factors alone (``frozen_keys``), the mean moves through its offset
  only in rows that some example reaches, and the pass-through still carries the likelihood's
  gradient to θ.
"""

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.data.sources.known_truth import default_text_pool, family_inputs, sample_task, true_theta
from abmll_pyro.data.templates import DirectTemplate
from abmll_pyro.eval.known_truth import identified_mask
from abmll_pyro.guides import LowRankPrecisionGuide, LowRankPrecisionNormal
from abmll_pyro.guides.low_rank import _rank_one
from abmll_pyro.infer import pass_through
from abmll_pyro.lms import tiny_model
from abmll_pyro.models import HierarchicalPrior


def _dense(q: LowRankPrecisionNormal) -> dist.MultivariateNormal:
    R = q.U.shape[1]
    W = torch.stack([torch.outer(q.U[:, j], q.V[j]).flatten() for j in range(R)], 1)
    precision = torch.diag(q.scale.flatten().pow(-2)) + W @ W.T
    return dist.MultivariateNormal(q.loc.flatten(), precision_matrix=precision)


def _random_q(R: int, seed: int = 0) -> LowRankPrecisionNormal:
    g = torch.Generator().manual_seed(seed)
    o, i = 3, 4
    return LowRankPrecisionNormal(torch.randn(o, i, generator=g, dtype=torch.float64),
                                  torch.rand(o, i, generator=g, dtype=torch.float64) + 0.3,
                                  torch.randn(o, R, generator=g, dtype=torch.float64),
                                  torch.randn(R, i, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("R", [1, 2, 5])
def test_distribution_equals_the_dense_gaussian(R):
    q = _random_q(R)
    ref = _dense(q)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert float(q.log_prob(x)) == pytest.approx(float(ref.log_prob(x.flatten())), abs=1e-10)
    assert float(q.entropy()) == pytest.approx(float(ref.entropy()), abs=1e-10)
    torch.testing.assert_close(q.variance.flatten(), ref.covariance_matrix.diag(), rtol=1e-10, atol=1e-12)
    m, s = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.2
    p = dist.Normal(m, s).to_event(2)
    p_dense = dist.MultivariateNormal(m.flatten(), torch.diag(s.flatten().pow(2)))
    assert float(kl_divergence(q, p)) == pytest.approx(float(kl_divergence(ref, p_dense)), abs=1e-9)
    torch.manual_seed(0)
    n = 200_000
    draws = q.rsample((n,)).reshape(n, -1)
    cov = ref.covariance_matrix
    assert float((torch.cov(draws.T) - cov).abs().max()) < 5 * (2 / n) ** 0.5 * float(cov.abs().max())
    torch.testing.assert_close(draws.mean(0), q.loc.flatten(), atol=0.02, rtol=0)


def test_rows_without_columns_are_skipped_exactly():
    """U with zero rows (the LM head: every row but the options') takes the row-restricted path; it
    equals the dense Gaussian, and those rows keep σ² and are drawn as the prior's."""
    full = _random_q(3)
    U = full.U.clone()
    U[1] = 0.0
    q = LowRankPrecisionNormal(full.loc, full.scale, U, full.V)
    assert q._rows().tolist() == [0, 2]
    ref = _dense(q)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert float(q.log_prob(x)) == pytest.approx(float(ref.log_prob(x.flatten())), abs=1e-10)
    assert float(q.entropy()) == pytest.approx(float(ref.entropy()), abs=1e-10)
    torch.testing.assert_close(q.variance.flatten(), ref.covariance_matrix.diag(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.variance[1], q.scale[1].pow(2), rtol=0, atol=0)
    torch.manual_seed(0)
    n = 200_000
    cov = ref.covariance_matrix
    draws = q.rsample((n,)).reshape(n, -1)
    assert float((torch.cov(draws.T) - cov).abs().max()) < 5 * (2 / n) ** 0.5 * float(cov.abs().max())


def test_rank_one_drops_round_off_rows():
    """A rank-1 G with rows at round-off (1e-9 of the largest in float32: the option softmax's
    cancelled shared term on the LM head's other rows) gives u = 0 there, exactly, and u vᵀ = G
    elsewhere."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=g), torch.randn(5, generator=g)
    G = torch.outer(a, b)
    G[[1, 4]] *= 1e-9
    u, v = _rank_one(G, 8)
    assert u[[1, 4]].eq(0).all() and u[[0, 2, 3, 5]].ne(0).all()
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(torch.outer(u, v)[keep], G[keep], rtol=1e-5, atol=1e-6)


def test_zero_columns_are_the_mean_field_normal():
    q = _random_q(2)
    q0 = LowRankPrecisionNormal(q.loc, q.scale, torch.zeros_like(q.U), torch.zeros_like(q.V))
    mf = dist.Normal(q.loc, q.scale).to_event(2)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert float(q0.log_prob(x)) == pytest.approx(float(mf.log_prob(x)), abs=1e-12)
    torch.testing.assert_close(q0.variance, q.scale.pow(2))


def _head_svi(**guide_kwargs):
    lm, tok = tiny_model("llama", seed=0)
    lm = lm.double()
    adapter = BayesLoRA(lm, AdapterConfig(rank=4, lora_alpha=4.0, target_modules=("lm_head",), std_map="log-rowcol",
                                          init_std=0.3), generator=torch.Generator().manual_seed(0)).double()
    guide = LowRankPrecisionGuide(cov_rank=16, **guide_kwargs)
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1.0, inner=InnerLoopConfig(num_inner_steps=3, inner_lr=0.05,
                                                                         optimizer="adam-precond")),
                  prior=HierarchicalPrior(init_std=0.3), task_guide=guide)
    theta = true_theta(adapter, 0.3, 0.1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k, p in adapter.global_params().items():
            p.copy_(theta[k])
    template = DirectTemplate(sep="")
    task = sample_task(svi.model, theta, family_inputs(tok, default_text_pool(), 8, torch.Generator().manual_seed(2),
                                                       template=template), seed=0)
    return svi, tok, template, task.split(6)[0]


def test_ggn_start_is_the_option_scores_gauss_newton_matrix():
    svi, tok, template, support = _head_svi()
    adapter, guide = svi.adapter, svi.guide.task_guide
    m = adapter.module_names[0]
    theta = svi.theta()
    start = guide.init_task_params(adapter, theta, support)
    U, V = start[adapter.key(m, "cov_U")], start[adapter.key(m, "cov_V")]
    W = torch.stack([torch.outer(U[:, j], V[j]).flatten() for j in range(U.shape[1])], 1)
    ggn_lowrank = W @ W.T
    # dense: per example, J = d scores / d ΔW (K × out·in), H = diag p − p pᵀ
    mean = adapter.mean(theta, m).detach().requires_grad_(True)
    with adapter.use({m: mean}):
        scores = svi.model.likelihood.scores(adapter.lm, support.batch)
    ggn = torch.zeros_like(ggn_lowrank)
    for n in range(scores.shape[0]):
        J = torch.stack([torch.autograd.grad(scores[n, k], mean, retain_graph=True)[0].flatten()
                         for k in range(scores.shape[1])])
        p = torch.softmax(scores[n].detach(), -1)
        ggn += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    assert 6 * 2 <= U.shape[1]  # every (example, contrast) column kept: 6 examples × (3 − 1)
    torch.testing.assert_close(ggn_lowrank, ggn, rtol=1e-8, atol=1e-8 * float(ggn.abs().max()))
    rows = identified_mask(adapter, tok, template=template)[m].any(1)
    assert float(U[~rows].abs().max()) < 1e-12  # no data direction outside the option rows


def test_inner_loop_keeps_thetas_copy_moves_only_reached_rows_and_passes_gradient_to_theta():
    svi, tok, template, support = _head_svi()
    adapter = svi.adapter
    m = adapter.module_names[0]
    theta = svi.theta()
    start = svi.guide.task_guide.init_task_params(adapter, theta, support)
    refined = svi.refine(theta, start, support)
    for k in theta:
        torch.testing.assert_close(refined[k], start[k].detach(), rtol=0, atol=0)
    res_B = refined[adapter.key(m, "res_B")].detach()
    rows = identified_mask(adapter, tok, template=template)[m].any(1)
    assert float(res_B[rows].abs().max()) > 1e-3  # the offset moved where the labels reach
    assert float(res_B[~rows].abs().max()) < 1e-12  # and nowhere else
    task = pass_through(refined, start)
    q = svi.guide.task_guide.task_distribution(adapter, task, m)
    with adapter.use({m: q.mean}):
        scores = svi.model.likelihood.scores(adapter.lm, support.batch)
    torch.log_softmax(scores, -1).gather(-1, support.batch.gold[:, None]).sum().backward()
    assert theta[adapter.key(m, "mu_A")].grad is not None and float(theta[adapter.key(m, "mu_A")].grad.abs().max()) > 0
