"""The Bayesian-LoRA peers (laplace-lora, blob, ensemble-lora, mc-dropout-lora): each one's core
computation against an oracle, and each one on the tiny model (the contract test in test_methods.py
runs all four through adapt/predict/train_step too)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from abmll_pyro.config import AdapterConfig
from abmll_pyro.data.tasks import TaskSplit
from abmll_pyro.eval.uncertainty import predict_with_uncertainty
from abmll_pyro.lms import tiny_model
from abmll_pyro.lora import BayesLoRA
from abmll_pyro.lora.layer import BayesLoRALayer, LowRankDelta
from abmll_pyro.methods import build_method, option_logits, option_probs
from abmll_pyro.methods.blob import blob_kl
from abmll_pyro.methods.ensemble_lora import mutual_information
from abmll_pyro.methods.laplace_lora import (PRECISIONS, fit_laplace, log_marginal_likelihood, option_jacobian,
                                             predictive_cov, sample_logits, softmax_hessian_sqrt)
from abmll_pyro.presets import _synthetic_task
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder

CONFIG = RunConfig(model="tiny-llama", rank=2, lora_alpha=4.0, num_inner_steps=3, inner_lr=1e-2, outer_lr=1e-2,
                   num_samples=4, ensemble_size=3, laplace_logit_samples=2000)


@pytest.fixture
def setup():
    lm, tok = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0))
    task = _synthetic_task(0, 12, random.Random(0))
    episode = EpisodeEncoder(tok, 128)(TaskSplit(task.name, task.examples[:4], task.examples[4:9]))
    return adapter, episode


def _trained(name, adapter):
    """The method with its LoRA factors moved off B = 0 (as training leaves them)."""
    method = build_method(name, adapter, CONFIG, num_train_tasks=4)
    with torch.no_grad():
        for p in method.lora.factors.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return method


# ----------------------------------------------------------------------------------- laplace-lora
def _linear_softmax_toy(n=6, d=3, m=3, seed=0):
    """f(x; W) = W x: the GGN is the exact Hessian's Gauss-Newton part and J_x = I_M ⊗ xᵀ in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    jac = torch.einsum("oq,nd->noqd", torch.eye(m, dtype=torch.float64), x).reshape(n, m, m * d)  # [n, M, P]
    return x, w, jac, x @ w.T, torch.randint(m, (n,), generator=g)


def test_laplace_kernel_form_equals_the_explicit_ggn_posterior():
    """Oracle: on a linear softmax model, Σ = (Σ_x J_xᵀ Λ_x J_x + δI)⁻¹ formed explicitly (P × P) gives the
    same predictive covariance and log marginal likelihood as the function-space (Woodbury) form."""
    x, w, jac, scores, gold = _linear_softmax_toy()
    n, m, p = jac.shape
    lam = torch.diag_embed(torch.softmax(scores, -1)) - torch.softmax(scores, -1)[:, :, None] * torch.softmax(scores, -1)[:, None, :]
    ggn = torch.einsum("nop,noq,nqr->pr", jac, lam, jac)
    sq_dist = 0.7
    fit = fit_laplace(jac, scores, gold, sq_dist)
    log_lik = float(torch.log_softmax(scores, -1).gather(1, gold[:, None]).sum())
    brute = torch.stack([log_lik - 0.5 * d * sq_dist - 0.5 * (torch.linalg.slogdet(ggn + d * torch.eye(p, dtype=torch.float64))[1]
                                                                 - p * torch.log(d)) for d in PRECISIONS])
    kernel = (softmax_hessian_sqrt(scores) @ jac).reshape(n * m, p)
    fast = log_marginal_likelihood(torch.linalg.eigvalsh(kernel @ kernel.T), log_lik, sq_dist)
    assert torch.allclose(fast, brute, rtol=1e-9, atol=1e-7)  # float64 eigen/slogdet round-off
    assert fit.prior_precision == pytest.approx(float(PRECISIONS[brute.argmax()]))
    xq = torch.randn(4, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jq = torch.einsum("oq,nd->noqd", torch.eye(m, dtype=torch.float64), xq).reshape(4, m, m * x.shape[1])
    sigma = torch.linalg.inv(ggn + fit.prior_precision * torch.eye(p, dtype=torch.float64))
    assert torch.allclose(predictive_cov(fit, jq), jq @ sigma @ jq.transpose(1, 2), atol=1e-10)


def test_laplace_padded_options_change_nothing():
    """An example with fewer options (a −inf slot, a zero Jacobian row) contributes exactly its real ones."""
    _, _, jac, scores, gold = _linear_softmax_toy(m=3)
    gold = gold.clamp(max=1)
    padded_scores, padded_jac = scores.clone(), jac.clone()
    padded_scores[:, 2], padded_jac[:, 2] = float("-inf"), 0.0
    a = fit_laplace(padded_jac, padded_scores, gold, 0.3)
    b = fit_laplace(jac[:, :2], scores[:, :2], gold, 0.3)
    assert a.prior_precision == b.prior_precision and a.log_marglik == pytest.approx(b.log_marglik, abs=1e-9)
    cov = predictive_cov(a, padded_jac[:3])
    assert torch.allclose(cov[:, :2, :2], predictive_cov(b, jac[:3, :2]), atol=1e-12) and (cov[:, 2] == 0).all()
    draws = sample_logits(padded_scores[:3], cov, 5)
    assert torch.isinf(draws[..., 2]).all() and torch.isfinite(draws[..., :2]).all()


def test_laplace_logit_draws_have_the_predictive_moments():
    torch.manual_seed(0)
    mean = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    cov = torch.tensor([[[2.0, 0.6], [0.6, 0.5]]], dtype=torch.float64)
    draws = sample_logits(mean, cov, 200_000)[:, 0]
    # 200k draws: the sample mean's sd is ≤ √2/447 ≈ 0.003, the covariance's ≈ 0.006
    assert torch.allclose(draws.mean(0), mean[0], atol=0.015)
    assert torch.allclose(torch.cov(draws.T), cov[0], atol=0.03)


def test_laplace_jacobian_matches_finite_differences(setup):
    adapter, episode = setup
    method = _trained("laplace-lora", adapter)
    params = {k: v.detach() for k, v in method.lora.params().items()}
    scores, jac = option_jacobian(adapter, params, episode.support, method.likelihood)
    g = torch.Generator().manual_seed(7)
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    eps = 1e-3
    shifted = [option_logits(adapter, {k: params[k] + s * eps * v[k] for k in params}, episode.support,
                             method.likelihood).double() for s in (1, -1)]
    flat_v = torch.cat([t.reshape(-1) for t in v.values()]).double()
    assert torch.allclose(scores, option_logits(adapter, params, episode.support, method.likelihood).double())
    directional = jac @ flat_v
    # float32 scores (|f| ≈ 20): the central difference carries up to ~6e-8·20/ε ≈ 1.2e-3 of round-off
    assert torch.allclose(directional, (shifted[0] - shifted[1]) / (2 * eps), rtol=0, atol=2e-3)
    assert directional.abs().max() > 1e-2  # not trivially zero


def test_laplace_lora_on_the_tiny_model(setup):
    adapter, episode = setup
    method = _trained("laplace-lora", adapter)
    torch.manual_seed(0)
    fit = method.adapt(episode)
    assert fit.prior_precision in PRECISIONS.tolist() and math.isfinite(fit.log_marglik)
    assert set(method.adapt_diagnostics(fit)) == {"log10_prior_precision", "log_marglik"}
    split = predict_with_uncertainty(method, fit, episode)
    assert split.probs.shape == (5, 2) and (split.epistemic >= 0).all() and split.epistemic.sum() > 0
    # one query example at a time (prediction) = the whole query set's Jacobian at once (same draws)
    scores, jac = option_jacobian(adapter, fit.params, episode.query, method.likelihood)
    torch.manual_seed(5)
    whole = torch.softmax(sample_logits(scores, predictive_cov(fit, jac), CONFIG.laplace_logit_samples), -1)
    torch.manual_seed(5)
    assert torch.allclose(method.predict_samples(fit, episode), whole, atol=1e-10)
    # the predictive mean sits near the MAP's (2000 logit draws, small posterior variance on 4 examples)
    assert torch.allclose(split.probs, option_probs(adapter, fit.params, episode.query, method.likelihood).double(), atol=0.1)


# ----------------------------------------------------------------------------------- blob
def test_blob_kl_is_the_gaussian_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    mean, factor = torch.randn(3, 5, generator=g), 0.1 + torch.rand(3, 5, generator=g)
    omega = factor.double() ** 2
    by_hand = (math.log(0.2) - omega.log() + (omega**2 + mean.double() ** 2) / (2 * 0.04) - 0.5).sum()
    dists = torch.distributions
    library = dists.kl_divergence(dists.Normal(mean.double(), omega), dists.Normal(0.0, 0.2)).sum()
    assert blob_kl(mean, factor, 0.2) == pytest.approx(float(by_hand), rel=1e-12)
    assert blob_kl(mean, factor, 0.2) == pytest.approx(float(library), rel=1e-6)  # Normal(0.0, 0.2) holds float32


def test_blob_starts_at_the_trained_factors_with_blobs_scale_init(setup):
    adapter, episode = setup
    method = _trained("blob", adapter)
    start = method.variational_start()
    for k, v in method.lora.params().items():
        assert torch.equal(start[k], v.detach())
    eps = CONFIG.blob_init_eps
    scales = torch.cat([v.flatten() for k, v in start.items() if k.endswith(":blob_G")])
    assert len(scales) == sum(v.numel() for k, v in start.items() if k.endswith(":mu_A"))
    assert scales.min() >= eps / math.sqrt(2) and scales.max() <= eps
    # the objective: the support NLL under one draw of A plus KL / n (the draw replayed by the seed)
    torch.manual_seed(3)
    loss = method.negative_elbo(start, episode.support)
    torch.manual_seed(3)
    logp = torch.log_softmax(method.scores(start, episode.support), -1)
    nll = -logp.gather(1, episode.support.gold[:, None]).mean()
    assert float(loss) == pytest.approx(float(nll + method.kl(start) / len(episode.support)), rel=1e-6)
    state = method.adapt(episode)
    samples = method.predict_samples(state, episode)
    assert samples.shape == (CONFIG.num_samples, 5, 2) and not torch.equal(samples[0], samples[1])
    assert method.adapt_diagnostics(state)["blob_mean_std"] > 0


# ----------------------------------------------------------------------------------- ensemble-lora
def test_ensemble_mutual_information_by_hand(setup):
    adapter, episode = setup
    method = _trained("ensemble-lora", adapter)
    torch.manual_seed(0)
    members = method.adapt(episode)
    assert len(members) == CONFIG.ensemble_size
    per_member = []
    for params in members:  # each member's probabilities, by hand: its rank-2r delta in the model
        with adapter.use(method.deltas(params)):
            per_member.append(torch.softmax(method.likelihood.scores(adapter.lm, episode.query).double(), -1))
    per_member = torch.stack(per_member)
    mean = per_member.mean(0)
    h = lambda p: -(p * p.log()).sum(-1)  # noqa: E731 - every option has p > 0 here
    by_hand = h(mean) - torch.stack([h(p) for p in per_member]).mean(0)
    split = predict_with_uncertainty(method, members, episode)
    assert torch.allclose(split.probs, mean, atol=1e-12) and torch.allclose(split.epistemic, by_hand, atol=1e-12)
    assert torch.allclose(mutual_information(per_member), by_hand, atol=1e-12)
    assert (by_hand > 0).all(), "the members are independently initialised: they disagree"


def test_ensemble_members_start_at_the_trained_lora(setup):
    adapter, episode = setup
    method = _trained("ensemble-lora", adapter)
    torch.manual_seed(0)
    a, b = method.member_start(), method.member_start()
    with adapter.use(method.deltas(a)):
        start_probs = torch.softmax(method.likelihood.scores(adapter.lm, episode.query), -1)
    # B_e = 0: the same function as the trained LoRA (the rank-2r product adds exact zeros)
    assert torch.allclose(start_probs, option_probs(adapter, method.lora.params(), episode.query, method.likelihood), atol=1e-6)
    assert not torch.equal(a[next(k for k in a if k.endswith(":member_A"))], b[next(k for k in b if k.endswith(":member_A"))])


def test_mutual_information_of_identical_members_is_zero():
    p = torch.softmax(torch.randn(4, 3), -1)
    assert torch.allclose(mutual_information(p.expand(5, 4, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-12)


# ----------------------------------------------------------------------------------- mc-dropout-lora
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_on_the_adapted_path_has_the_mask_rate(rate):
    """With A = B = I the adapted path returns dropout(x): a share p of zeros, the rest 1/(1 − p); the
    frozen path is untouched (B = 0 gives the base output exactly)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64)
    layer = BayesLoRALayer(base, "probe")
    x = torch.ones(2000, 64)
    layer.delta = LowRankDelta(torch.eye(64), torch.eye(64), 1.0, dropout=rate)
    with torch.no_grad():
        h = layer(x) - base(x)
    dropped = (h.abs() < 1e-4).double().mean()
    # 128,000 Bernoulli draws: the share's sd is ≤ 0.0014; 5 sd
    assert float(dropped) == pytest.approx(rate, abs=0.007)
    kept = h[h.abs() >= 1e-4]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - rate)), atol=1e-4)
    layer.delta = LowRankDelta(torch.eye(64), torch.zeros(64, 64), 1.0, dropout=rate)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_mc_dropout_lora_keeps_dropout_on_at_prediction(setup):
    adapter, episode = setup
    method = _trained("mc-dropout-lora", adapter)
    torch.manual_seed(0)
    state = method.adapt(episode)
    torch.manual_seed(1)
    samples = method.predict_samples(state, episode)
    assert samples.shape == (CONFIG.num_samples, 5, 2) and not torch.equal(samples[0], samples[1])
    torch.manual_seed(1)
    assert torch.allclose(method.predict(state, episode), samples.mean(0).float())
    assert (predict_with_uncertainty(method, state, episode).epistemic > 0).all()


@pytest.mark.parametrize("key, value, message", [
    ("ensemble_size", 0, "ensemble_size must be an integer >= 1"),
    ("laplace_logit_samples", 0, "laplace_logit_samples must be an integer >= 1"),
    ("mc_dropout_rate", 1.0, "mc_dropout_rate must be in \\(0, 1\\)"),
    ("blob_prior_std", 0.0, "blob_prior_std must be > 0"),
    ("blob_init_eps", -0.05, "blob_init_eps must be > 0"),
])
def test_the_peers_settings_are_validated(key, value, message):
    from abmll_pyro.train.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({key: value})
