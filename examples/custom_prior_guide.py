"""A prior and a task guide written outside the library, used by import path (docs/extending.md).

    abmll train ... --prior examples/custom_prior_guide.py:LaplacePrior \\
                    --guide examples/custom_prior_guide.py:TemperedGuide

or from Python: ``resolve_prior("examples/custom_prior_guide.py:LaplacePrior", scale_rate=10.0)``.

LaplacePrior — a sparsity-favouring task prior with a hierarchy over its location and scale:

    μ_θ ~ N(0, mean_scale²),   b_θ ~ Gamma(a0, rate b0),   ΔW_i ~ Laplace(μ_θ, b_θ)   elementwise,

with θ's point values read off the global factors' Gaussian as μ_θ = mean and b_θ = std/√2 (the Laplace
with the same variance). KL(Normal ‖ Laplace) has no closed form in torch, so TraceMeanField_ELBO uses
its Monte Carlo estimate.

TemperedGuide — the mean-field guide with one learned temperature per adapted module,

    q(ΔW_{i,m}) = N(μ_φi, (τ_m σ_φi)²),   τ_m = exp(log_τ_m),  log_τ_m = 0 at the start,

an ``nn.Module``, so the meta-learning loop trains log τ with θ (the guide receives the adapter because
its constructor has an ``adapter`` parameter).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from abmll_pyro.guides import MeanFieldGuide, TaskGuide
from abmll_pyro.lora import BayesLoRA
from abmll_pyro.models import TaskData, TaskPrior


def _const(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


class LaplacePrior(TaskPrior):
    """ΔW_i ~ Laplace(μ_θ, b_θ) with μ_θ ~ N(0, mean_scale²) and b_θ ~ Gamma(a0, scale_rate)."""

    def __init__(self, mean_scale: float = 1.0, a0: float = 1.0, scale_rate: float = 1.0):
        for name, v in (("mean_scale", mean_scale), ("a0", a0), ("scale_rate", scale_rate)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        self.mean_scale, self.a0, self.scale_rate = float(mean_scale), float(a0), float(scale_rate)

    def hyperprior(self, shape: tuple[int, ...], like: Tensor) -> dict[str, dist.Distribution]:
        # the keys here and in global_values are the same: they name the global sites theta/<m>/<key>
        return {
            "mean": dist.Normal(_const(0.0, like), _const(self.mean_scale, like)).expand(shape).to_event(len(shape)),
            "scale": dist.Gamma(_const(self.a0, like), _const(self.scale_rate, like)).expand(shape).to_event(len(shape)),
        }

    def global_values(self, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
        return {"mean": mean, "scale": std / math.sqrt(2.0)}

    def task_distribution(self, theta: dict[str, Tensor], shape: tuple[int, ...], like: Tensor) -> dist.Distribution:
        return dist.Laplace(theta["mean"], theta["scale"]).to_event(len(shape))


class TemperedGuide(nn.Module, TaskGuide):
    """Mean-field q with σ multiplied by a learned per-module temperature τ_m (starts at 1)."""

    def __init__(self, adapter: BayesLoRA, init_temperature: float = 1.0):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature!r}")
        self.base = MeanFieldGuide()
        self.log_temperature = nn.ParameterDict({
            adapter.key(m, "tau"): nn.Parameter(torch.tensor(math.log(init_temperature))) for m in adapter.shapes
        })

    def temperature(self, adapter: BayesLoRA, module: str) -> Tensor:
        return self.log_temperature[adapter.key(module, "tau")].exp()

    def init_task_params(self, adapter: BayesLoRA, theta_params, support: TaskData | None = None) -> dict[str, Tensor]:
        return self.base.init_task_params(adapter, theta_params, support)  # θ's copy, with history

    def task_distribution(self, adapter: BayesLoRA, task_params, module: str) -> dist.Distribution:
        mean, std = adapter.mean(task_params, module), adapter.std(task_params, module)
        tau = self.temperature(adapter, module).to(std.dtype)
        return dist.Normal(mean, tau * std).to_event(2)
