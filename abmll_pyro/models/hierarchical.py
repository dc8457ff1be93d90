"""The generative model θ → φ_i → D_i as a Pyro model function (docs/method.md).

For every adapted module m with ``[out, in]`` weight:

    θ_m ~ p(θ)                                  global sites  theta/<m>/<key>   (hyperprior)
    for task i in plate("tasks"):                sequential: one LM graph at a time
        ΔW_{i,m} ~ p(ΔW | θ_m)                   task sites    phi[i]/<m>
        [z_{i,m} ~ p(z | θ)]                     task sites    z[i]/<m>     (with a task subspace)
        D_i ~ p(D_i | W0 + ΔW_i [+ U_m z_{i,m}]) data plate    data[i], obs[i]

β and γ are not here: :mod:`abmll_pyro.infer.handlers` scales the task and global sites from
outside, in model and guide alike. The model and the guide take the same arguments
``(theta_params, task_params, tasks)``; the model reads only dtype/device from ``theta_params``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pyro
from torch import Tensor

from .. import sites
from ..lora.adapter import BayesLoRA, full_precision
from .likelihoods import Likelihood, TaskData
from .priors import TaskPrior
from .subspace import TaskSubspace

__all__ = ["HierarchicalModel"]


class HierarchicalModel:
    """Callable Pyro model. ``tasks[i]`` is observed under ΔW drawn at ``phi[i]/<m>`` (and, with a
    ``subspace``, the shift of z drawn at ``z[i]/<m>``; models/subspace.py)."""

    def __init__(self, adapter: BayesLoRA, prior: TaskPrior, likelihood: Likelihood,
                 subspace: TaskSubspace | None = None):
        self.adapter, self.prior, self.likelihood = adapter, prior, likelihood
        self.subspace = subspace

    def __call__(
        self,
        theta_params: Mapping[str, Tensor],
        task_params: Sequence[Mapping[str, Tensor]],
        tasks: Sequence[TaskData],
    ) -> None:
        like = full_precision(next(iter(theta_params.values())).detach()[:0].sum())  # a scalar: dtype, device
        theta = {}
        for m, shape in self.adapter.shapes.items():
            theta[m] = {
                key: pyro.sample(sites.theta(m, key), d)
                for key, d in self.prior.hyperprior(shape, like).items()
            }
        for i in pyro.plate(sites.TASKS, len(tasks)) if tasks else ():  # no tasks: θ's terms alone
            deltas = {
                m: pyro.sample(sites.phi(i, m), self.prior.task_distribution(theta[m], shape, like))
                for m, shape in self.adapter.shapes.items()
            }
            shifts = {}
            if self.subspace is not None:
                zs = {m: pyro.sample(sites.latent(i, m), self.subspace.prior(m)) for m in self.subspace.modules}
                shifts = self.subspace.shifts(zs)
            with self.adapter.use(deltas), self.adapter.shifted(shifts):
                self.likelihood(self.adapter.lm, tasks[i], i)
