"""The β-tempered negative ELBO, split into the pieces the inner and outer loops need.

With the effect handler :func:`~abmll_pyro.infer.handlers.kl_scale` and any Pyro ELBO:

    task_loss   = −E_q[log p(D_i | φ_i)] + β·KL(q(φ_i) ‖ p(φ_i | θ))     (θ sites masked out)
                  [+ β_z·KL(q(z_i) ‖ p(z_i | θ)) with a task subspace]
    global_loss = −γ·log p(θ)                                           (no tasks in the call)

Both run the same model and guide through ``elbo.differentiable_loss``. The diagnostics
(:func:`task_kl`, :func:`log_hyperprior`, :class:`ObservedLogLik`) report the unscaled parts for
logging, in float32/float64.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from pyro.distributions.kl import kl_divergence
from pyro.poutine.messenger import Messenger
from torch import Tensor

from ..guides.base import ABMLLGuide
from ..lora.adapter import full_precision
from ..lora.factored import FactorGaussian, row_blocks
from ..models.hierarchical import HierarchicalModel
from ..models.likelihoods import TaskData
from .handlers import kl_scale

__all__ = ["task_loss", "global_loss", "task_kl", "task_kl_loss", "log_hyperprior", "ObservedLogLik"]

Params = Mapping[str, Tensor]


def task_loss(elbo, model: HierarchicalModel, guide: ABMLLGuide, theta_params: Params,
              task_params: Sequence[Params], tasks: Sequence[TaskData], kl_beta: float,
              latent_beta: float | None = None) -> Tensor:
    """Σ over ``tasks`` of −E_q log p(D_i | φ_i) + kl_beta·KL_i (+ latent_beta·KL of the subspace
    sites, ``kl_beta`` when None) (differentiable)."""
    with kl_scale(kl_beta=kl_beta, kl_gamma=0.0, latent_beta=latent_beta):
        return elbo.differentiable_loss(model, guide, theta_params, task_params, tasks)


def global_loss(elbo, model: HierarchicalModel, guide: ABMLLGuide, theta_params: Params, kl_gamma: float) -> Tensor:
    """−kl_gamma·log p(θ) (differentiable); a zero tensor for priors without global sites."""
    with kl_scale(kl_beta=0.0, kl_gamma=kl_gamma):
        loss = elbo.differentiable_loss(model, guide, theta_params, [], [])
    if torch.is_tensor(loss):
        return loss
    like = next(iter(theta_params.values()))
    return torch.zeros((), dtype=torch.float32, device=like.device)  # Pyro returns 0.0 for no sites


@torch.no_grad()
def log_hyperprior(model: HierarchicalModel, theta_params: Params) -> float:
    """log p(θ) at θ's point values, summed over modules and sites (float64 sums), each module's
    densities made one block of rows at a time (``lora.factored.row_blocks``: a logged value, no
    ``[out, in]`` tensor of a large module made whole)."""
    adapter, prior = model.adapter, model.prior
    total = 0.0
    for m, (rows, columns) in adapter.shapes.items():
        gaussian = FactorGaussian(adapter, m, theta_params)
        for r0, r1 in row_blocks(rows, columns):
            block = gaussian.rows(r0, r1)
            mean, std = block.mean(), block.std()
            hyper = prior.hyperprior((r1 - r0, columns), mean[:0].sum())
            for key, value in prior.global_values(mean, std).items():
                total += float(hyper[key].log_prob(value).sum(dtype=torch.float64))
    return total


def task_kl_loss(model: HierarchicalModel, guide: ABMLLGuide, theta_params: Params, task_params: Params) -> Tensor:
    """KL(q(φ_i) ‖ p(φ_i | θ)) summed over modules, differentiable in both arguments (analytic when
    registered, else one reparameterized draw), summed in float32 or wider (the adapter's factors'
    precision: the model's own KL terms use the same)."""
    adapter, prior = model.adapter, model.prior
    total = None
    for m, shape in adapter.shapes.items():
        mean, std = adapter.moments(theta_params, m)  # factor-backed within factor_backed() (lora/factored.py)
        like = mean[:0].sum() if torch.is_tensor(mean) else full_precision(theta_params[adapter.key(m, "mu_A")].detach()[:0].sum())
        p = prior.task_distribution(prior.global_values(mean, std), shape, like)
        q = guide.task_guide.task_distribution(adapter, task_params, m)
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            x = q.rsample()
            kl = q.log_prob(x) - p.log_prob(x)
        kl = kl.sum()
        kl = kl.float() if kl.dtype in (torch.float16, torch.bfloat16) else kl
        total = kl if total is None else total + kl
    return total


@torch.no_grad()
def task_kl(model: HierarchicalModel, guide: ABMLLGuide, theta_params: Params, task_params: Params) -> float:
    """KL(q(φ_i) ‖ p(φ_i | θ)) summed over modules, as a float (for logging)."""
    return float(task_kl_loss(model, guide, theta_params, task_params).double())


class ObservedLogLik(Messenger):
    """Records Σ scale·log p(obs) of observed, non-deterministic sites (detached), for logging."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or not msg["is_observed"] or msg["infer"].get("_deterministic"):
            return
        with torch.no_grad():
            lp = msg["fn"].log_prob(msg["value"])
            if msg["mask"] is not None and msg["mask"] is not True:
                lp = lp * msg["mask"]
            self.total += float(lp.double().sum()) * float(msg["scale"])


def recorded(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    """Run ``fn`` and return its value with the observed log-likelihood recorded during the call."""
    recorder = ObservedLogLik()
    with recorder:
        out = fn()
    return out, recorder.total
