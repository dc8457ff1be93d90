"""Meta-SVI: meta-gradients against hand-computed references, scaling, state and reproducibility."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from _support.helpers import family_episode, tiny_lm
from _support.toys import make_data
from _support.toys_svi import toy_svi
from pyro.infer import Trace_ELBO

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.guides import PointMassGuide
from abmll_pyro.infer import Episode
from abmll_pyro.infer.inner import NonFiniteLossError
from abmll_pyro.models import HierarchicalPrior, TaskData

NOISE, BETA, GAMMA, M, LR, K = 0.5, 0.3, 0.2, 4, 0.05, 2
PRIOR = dict(mean_scale=1.0, a0=2.0, b0=0.5)
THETA0 = {"proj:mu_A": 0.5, "proj:mu_B": 0.3, "proj:sigma_A": 0.2, "proj:sigma_B": -0.1}


def _episodes():
    return [Episode(f"t{i}", TaskData(make_data(5, 0.7 + i, NOISE, 10 + i)), TaskData(make_data(6, 0.7 + i, NOISE, 20 + i)))
            for i in range(2)]


def _svi(meta=None, **inner):
    svi = toy_svi(meta=meta, kl_beta=BETA, kl_gamma=GAMMA, init_std=0.5, noise=NOISE, prior=HierarchicalPrior(**PRIOR),
                  task_guide=PointMassGuide(), num_inner_steps=K, inner_lr=LR, optimizer="sgd", **inner)
    with torch.no_grad():
        for k, v in svi.theta().items():
            v.fill_(THETA0[k])
    return svi


def _reference_grads(svi, mode):
    """The same objective written by hand in torch (no Pyro): point-mass task weights w = μ(λ)."""
    ad = svi.adapter
    theta = {k: torch.tensor([[v]], requires_grad=True) for k, v in THETA0.items()}
    mu = lambda p: ad.mean(p, "proj")  # noqa: E731
    sd = lambda p: ad.std(p, "proj")  # noqa: E731

    def nll(lam, data):
        return -dist.Normal(data.x * mu(lam), NOISE).log_prob(data.y[:, None]).sum()

    def kl(lam, th):  # point mass: the KL is −log p(w | θ) up to a constant
        return -BETA * dist.Normal(mu(th), sd(th)).log_prob(mu(lam)).sum()

    def loss(lam, th, data):
        return nll(lam, data) + kl(lam, th)

    total = 0.0
    for ep in _episodes():
        if mode == "second":
            lam = dict(theta)
            for _ in range(K):
                g = torch.autograd.grad(loss(lam, theta, ep.support.batch), [lam[k] for k in lam], create_graph=True, allow_unused=True)
                lam = {k: v if gk is None else v - LR * gk for (k, v), gk in zip(lam.items(), g)}
        else:
            lam = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
            for _ in range(K):
                g = torch.autograd.grad(loss(lam, {k: v.detach() for k, v in theta.items()}, ep.support.batch),
                                        list(lam.values()), allow_unused=True)
                lam = {k: (v if gk is None else v - LR * gk).detach().requires_grad_() for (k, v), gk in zip(lam.items(), g)}
            fixed = {k: v.detach() for k, v in lam.items()}
            if mode in ("first", "first_kl_pass_through"):  # pass-through: ∂L/∂λ_K added to θ's gradient
                lam = {k: lam[k].detach() + theta[k] - theta[k].detach() for k in lam}
            if mode == "first":  # outer_kl="prior": the KL's q held fixed (the M-step for θ)
                total = total + (nll(lam, ep.query.batch) + kl(fixed, theta)) / 2
                continue
        total = total + loss(lam, theta, ep.query.batch) / 2
    log_p_theta = dist.Normal(0.0, PRIOR["mean_scale"]).log_prob(mu(theta)).sum() + \
        dist.Gamma(PRIOR["a0"], PRIOR["b0"]).log_prob(sd(theta).pow(-2)).sum()
    total = total - GAMMA * log_p_theta / M
    grads = torch.autograd.grad(total, list(theta.values()))
    return {k: g for k, g in zip(theta, grads)}, float(total.detach())


@pytest.mark.parametrize("mode", ["first", "first_kl_pass_through", "no_pass_through", "second"])
def test_meta_gradient_matches_hand_computed_reference(mode):
    inner = {"first": {}, "first_kl_pass_through": {}, "no_pass_through": {"pass_through": False},
             "second": {"order": "second"}}[mode]
    meta = {"first_kl_pass_through": {"outer_kl": "pass-through"}}.get(mode, {})
    svi = _svi(meta=meta, **inner)
    result = svi.step(_episodes(), num_tasks=M)
    expected, expected_loss = _reference_grads(svi, mode)
    for k, p in svi.theta().items():
        # float32 through two different code paths: agreement to ~1e-6 relative
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)


def test_pass_through_changes_the_gradient():
    a, b = _svi(), _svi(pass_through=False)
    a.step(_episodes(), num_tasks=M)
    b.step(_episodes(), num_tasks=M)
    assert not torch.allclose(a.theta()["proj:mu_B"].grad, b.theta()["proj:mu_B"].grad)


def _lm_svi(seed=0, **meta):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=2), generator=torch.Generator().manual_seed(seed))
    cfg = MetaConfig(kl_beta=1e-4, outer_lr=1e-2, **meta)
    return MetaSVI(adapter, cfg)


def test_trainable_parameter_count_does_not_grow_with_tasks():
    counts = []
    for num_tasks in (2, 6):
        svi = _lm_svi()
        g = torch.Generator().manual_seed(0)
        before = svi.adapter.num_trainable()
        svi.step([family_episode(i, 3, 4, g) for i in range(num_tasks)], num_tasks=num_tasks)
        state = sum(t.numel() for s in svi.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        counts.append((before, svi.adapter.num_trainable(), len(svi.trainable_parameters()), state))
    assert counts[0] == counts[1]
    assert counts[0][0] == counts[0][1]
    assert len(pyro.get_param_store()) == 0  # nothing in Pyro's global parameter store


def test_step_returns_finite_parts_and_same_seed_same_result():
    def run():
        svi = _lm_svi(seed=3)
        g = torch.Generator().manual_seed(5)
        results = [svi.step([family_episode(i, 3, 4, g) for i in range(2)], num_tasks=8) for _ in range(2)]
        return results, {k: v.detach().clone() for k, v in svi.theta().items()}

    r1, t1 = run()
    r2, t2 = run()
    assert r1 == r2
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    for r in r1:
        assert all(map(lambda v: v == v and abs(v) < float("inf"), (r.loss, r.nll, r.task_kl, r.log_p_theta)))
        assert r.nll > 0 and r.task_kl >= 0


def test_trace_elbo_also_works():
    torch.manual_seed(0)
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=2))
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1e-3), elbo=Trace_ELBO(max_plate_nesting=1))
    g = torch.Generator().manual_seed(0)
    r = svi.step([family_episode(i, 3, 4, g) for i in range(2)], num_tasks=4)
    assert r.loss == r.loss and r.grad_norm > 0


def test_nan_loss_is_a_clear_error():
    svi = _lm_svi(inner=InnerLoopConfig(inner_lr=1e30, optimizer="sgd"))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=r"inner step \d+: loss is (nan|inf)"):
        svi.step([family_episode(0, 3, 4, g)], num_tasks=1)


@pytest.mark.parametrize("field,value,msg", [
    ("kl_beta", -1.0, "kl_beta must be finite and >= 0, got -1.0"),
    ("kl_gamma", -0.5, "kl_gamma must be finite and >= 0, got -0.5"),
    ("outer_lr", 0.0, "outer_lr must be > 0, got 0.0"),
    ("tasks_per_step", 0, "tasks_per_step must be an integer >= 1, got 0"),
])
def test_bad_meta_settings_name_the_value(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        MetaConfig(**{field: value})


def test_bad_inner_settings_name_the_value():
    with pytest.raises(ValueError, match="num_inner_steps must be an integer >= 0, got -1"):
        InnerLoopConfig(num_inner_steps=-1)
    with pytest.raises(ValueError, match=r"optimizer must be one of \['sgd', 'adam', 'kl-precond', 'adam-precond'\], got 'rmsprop'"):
        InnerLoopConfig(optimizer="rmsprop")


def test_loss_and_grads_accumulates_without_stepping():
    svi = _svi()  # the deterministic point-mass toy: two evaluations give identical gradients
    before = {k: v.detach().clone() for k, v in svi.theta().items()}
    first = svi.loss_and_grads(_episodes(), num_tasks=M)
    once = {k: v.grad.clone() for k, v in svi.theta().items()}
    svi.loss_and_grads(_episodes(), num_tasks=M)
    for k, v in svi.theta().items():
        torch.testing.assert_close(v.grad, 2 * once[k])
        assert torch.equal(v.detach(), before[k])  # no optimizer step
    assert first.grad_norm is None
    expected, _ = _reference_grads(svi, "first")
    for k in once:
        torch.testing.assert_close(once[k], expected[k], rtol=1e-4, atol=1e-6)
