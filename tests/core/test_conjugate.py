"""Conjugate check: the inner loop's guide converges to the closed-form Gaussian posterior."""

import math

import pytest
import torch
from _support.toys import make_data
from _support.toys_svi import toy_svi
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from abmll_pyro.infer import inner_loop
from abmll_pyro.models import TaskData


@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO])
def test_guide_converges_to_closed_form_posterior(elbo):
    noise, n = 0.5, 20
    data = make_data(n, w=0.7, noise=noise, seed=3)
    svi = toy_svi(kl_beta=1.0, init_std=1.0, noise=noise, elbo=elbo(max_plate_nesting=1))
    # prior: θ has B = 0, so p(ΔW) = N(0, 1²); posterior of a scalar weight in closed form
    precision = 1.0 + float((data.x.squeeze(-1) ** 2).sum()) / noise**2
    post_mean = float((data.x.squeeze(-1) * data.y).sum()) / noise**2 / precision
    post_std = 1.0 / math.sqrt(precision)

    theta = svi.theta()
    loss_fn = svi._support_loss_fn({k: v.detach() for k, v in theta.items()}, TaskData(data))
    params = {k: v.detach().clone() for k, v in theta.items()}
    for lr, steps in ((0.05, 800), (0.01, 600), (0.002, 600), (5e-4, 600), (2e-4, 400)):  # decaying: noisy gradients
        params = inner_loop(loss_fn, params, steps, lr, "adam")
    name = svi.adapter.module_names[0]
    with torch.no_grad():
        mean = float(svi.adapter.mean(params, name))
        std = float(svi.adapter.std(params, name))
    # one-sample reparameterized gradients leave jitter of order lr at the end of the schedule (seen:
    # ≤1% of the posterior std in the mean, ≤2% in the std over seeds); the tolerances are 10% and 5%,
    # far below the prior-to-posterior change (the std shrinks ×7)
    assert abs(mean - post_mean) < 0.1 * post_std, (mean, post_mean, post_std)
    assert abs(std / post_std - 1.0) < 0.05, (std, post_std)
