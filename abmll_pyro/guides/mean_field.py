"""The paper's task guide and its point-mass limit.

:class:`MeanFieldGuide` — q(ΔW_{i,m}) = N(μ_φi, σ_φi²) elementwise with μ_φi = (α/r)·B_μφ A_μφ and
σ_φi = std_map(B_σφ A_σφ) from the task's own two LoRA pairs, started as a copy of θ's pairs
(docs/method.md, equation 9: the amortization is this shared initialization plus the shared prior).

:class:`PointMassGuide` — q(ΔW_{i,m}) = δ(μ_φi): MAP task weights in the same model (the
Structured-LoRA limit); the ELBO's task term becomes log p(μ_φi | θ).
"""

from __future__ import annotations

import pyro.distributions as dist

from ..lora.adapter import BayesLoRA
from ..lora.factored import normal
from ..lora.noise import LeanNormal
from ..models.likelihoods import TaskData
from .base import Params, TaskGuide

__all__ = ["MeanFieldGuide", "PointMassGuide"]


class MeanFieldGuide(TaskGuide):
    def init_task_params(self, adapter: BayesLoRA, theta_params: Params, support: TaskData | None = None) -> dict:
        # identity (with history): d start / d θ = I, what the first-order pass-through relies on
        return {k: v * 1.0 for k, v in theta_params.items()}

    def task_distribution(self, adapter: BayesLoRA, task_params: Params, module: str) -> dist.Distribution:
        # LeanNormal: a Normal whose rsample keeps no dense noise for backward (lora/noise.py); unchecked
        # arguments like the priors' (σ = std_map(·) > 0 by construction; models/priors.py); factor-backed
        # (lora/factored.py) within factor_backed(): the same Normal, holding the factors, not μ and σ
        mean, std = adapter.moments(task_params, module)
        return normal(mean, std, LeanNormal, validate_args=False).to_event(2)


class PointMassGuide(MeanFieldGuide):
    def task_distribution(self, adapter: BayesLoRA, task_params: Params, module: str) -> dist.Distribution:
        return dist.Delta(adapter.mean(task_params, module), event_dim=2)
