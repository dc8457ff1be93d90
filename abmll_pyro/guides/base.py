"""Task guides: q(φ_i) for one task, and where its parameters start.

Interface (:class:`TaskGuide`, two methods):

* ``init_task_params(adapter, theta_params, support)`` — the task's starting variational parameters
  (a dict of tensors), computed from θ's factors (and, for amortized guides, the support set) *with*
  autograd history, so a first-order pass-through can route the task gradient back to what produced
  the start; a guide may add keys of its own (e.g. covariance columns). The inner loop then refines
  them (all but the guide's optional ``frozen_keys(params)``); an optional ``refresh(adapter, params,
  support)`` post-processes the refined parameters, and ``bind(model)`` lets a guide read the model.
* ``task_distribution(adapter, task_params, module)`` — q(ΔW_{i,m}), event shape ``[out, in]``.

:class:`ABMLLGuide` turns a task guide plus the prior's θ point values into the Pyro guide function.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pyro
import pyro.distributions as dist
from torch import Tensor

from .. import sites
from ..lora.adapter import BayesLoRA
from ..models.likelihoods import TaskData
from ..models.priors import TaskPrior
from ..models.subspace import TaskSubspace

__all__ = ["TaskGuide", "ABMLLGuide"]

Params = Mapping[str, Tensor]


class TaskGuide:
    """Base class; see the module docstring for the contract."""

    def init_task_params(self, adapter: BayesLoRA, theta_params: Params, support: TaskData | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def task_distribution(self, adapter: BayesLoRA, task_params: Params, module: str) -> dist.Distribution:
        raise NotImplementedError


class ABMLLGuide:
    """Callable Pyro guide with the model's signature ``(theta_params, task_params, tasks)``.

    θ is a point estimate: a Delta at ``prior.global_values(μ_θ, σ_θ)`` for every global site, so the
    ELBO receives log p(θ). Task i's ΔW_{i,m} ~ ``task_guide.task_distribution(task_params[i], m)``;
    with a ``subspace``, z_{i,m} ~ ``subspace.posterior(task_params[i], m)`` after them.
    """

    def __init__(self, adapter: BayesLoRA, prior: TaskPrior, task_guide: TaskGuide,
                 subspace: TaskSubspace | None = None):
        self.adapter, self.prior, self.task_guide = adapter, prior, task_guide
        self.subspace = subspace

    def __call__(self, theta_params: Params, task_params: Sequence[Params], tasks: Sequence[TaskData]) -> None:
        if len(task_params) != len(tasks):
            raise ValueError(f"{len(task_params)} task parameter sets for {len(tasks)} tasks")
        for m in self.adapter.shapes:
            values = self.prior.global_values(*self.adapter.moments(theta_params, m))  # lazy within factor_backed()
            for key, value in values.items():
                pyro.sample(sites.theta(m, key), dist.Delta(value, event_dim=value.dim()))
        for i in pyro.plate(sites.TASKS, len(tasks)) if tasks else ():  # no tasks: θ's terms alone
            for m in self.adapter.shapes:
                pyro.sample(sites.phi(i, m), self.task_guide.task_distribution(self.adapter, task_params[i], m))
            if self.subspace is not None:
                for m in self.subspace.modules:
                    pyro.sample(sites.latent(i, m), self.subspace.posterior(task_params[i], m))
