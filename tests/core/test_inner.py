"""The inner loop: a pure function with the identities a user relies on."""

import pyro
import pytest
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.infer import inner_loop


def _svi(**inner):
    adapter = BayesLoRA(tiny_lm("llama", seed=2), AdapterConfig(rank=2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a non-trivial θ (B ≠ 0) so every factor has a gradient
        for k, v in adapter.global_params().items():
            if k.endswith("_B"):
                v.normal_(0, 0.05)
    return MetaSVI(adapter, MetaConfig(kl_beta=1e-2, inner=InnerLoopConfig(**inner)))


def test_zero_inner_steps_return_the_start_unchanged():
    svi = _svi(num_inner_steps=0)
    ep = family_episode(0, 4, 4, torch.Generator().manual_seed(0))
    post = svi.adapt(ep.support)
    theta = svi.theta()
    assert post.keys() == theta.keys()
    assert all(torch.equal(post[k], theta[k]) for k in theta)
    start = {"w": torch.randn(3)}
    out = inner_loop(lambda p: (p["w"] ** 2).sum(), start, 0, 0.1)
    assert torch.equal(out["w"], start["w"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_inner_step_lowers_the_support_loss(optimizer):
    lr = 1e-6  # small: the first-order decrease dominates (the KL curvature is ~kl_beta/σ² = 1e4 here)
    svi = _svi(num_inner_steps=1, inner_lr=lr, optimizer=optimizer)
    ep = family_episode(0, 6, 4, torch.Generator().manual_seed(0))
    theta = {k: v.detach() for k, v in svi.theta().items()}
    loss_fn = svi._support_loss_fn(theta, ep.support)

    def loss_at(params):  # the same ε for both evaluations: a deterministic comparison
        pyro.set_rng_seed(11)
        return float(loss_fn(params).detach())

    start = {k: v.clone() for k, v in theta.items()}
    pyro.set_rng_seed(11)
    after = svi.refine(theta, start, ep.support)
    assert loss_at(after) < loss_at(start)
    assert not all(torch.equal(after[k], start[k]) for k in start)  # no state kept: start untouched
    assert all(torch.equal(start[k], theta[k]) for k in theta)


def test_functional_adam_matches_torch_adam():
    target = torch.tensor([1.0, -2.0, 0.5])
    loss_fn = lambda p: ((p["w"] - target) ** 2 * torch.tensor([1.0, 10.0, 0.1])).sum()  # noqa: E731
    ours = inner_loop(loss_fn, {"w": torch.zeros(3)}, 7, 0.05, "adam")["w"]
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05, eps=1e-8)
    for _ in range(7):
        opt.zero_grad()
        loss_fn({"w": w}).backward()
        opt.step()
    # ε sits inside the square root here (differentiable at v = 0): a ~1e-8 relative difference
    torch.testing.assert_close(ours, w.detach(), rtol=1e-5, atol=1e-6)


def test_functional_sgd_is_plain_gradient_descent():
    out = inner_loop(lambda p: (p["w"] ** 2).sum() / 2, {"w": torch.tensor([4.0])}, 3, 0.5, "sgd")
    torch.testing.assert_close(out["w"], torch.tensor([0.5]))  # w ← w/2 three times


def test_second_order_keeps_history_first_order_does_not():
    theta = torch.tensor([2.0], requires_grad=True)
    start = {"w": theta * 1.0}
    loss_fn = lambda p: (p["w"] ** 2).sum()  # noqa: E731
    second = inner_loop(loss_fn, start, 2, 0.25, "sgd", create_graph=True)["w"]
    (g,) = torch.autograd.grad(second.sum(), theta)
    torch.testing.assert_close(g, torch.tensor([0.25]))  # w_K = (1 − 2·lr)^K · θ
    first = inner_loop(loss_fn, start, 2, 0.25, "sgd")["w"]
    assert first.grad_fn is None
