"""A linear-Gaussian toy through the real adapter, model and guide: y = x·(W0 + ΔW) + noise.

The LM is ``nn.Linear(1, 1)`` with W0 = 0, so ΔW is a scalar and the posterior is closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from abmll_pyro import sites
from abmll_pyro.models import Likelihood, TaskData
from abmll_pyro.models.likelihoods import data_plate


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        return self.proj(x)


@dataclass(frozen=True)
class XY:
    x: torch.Tensor  # [n, 1]
    y: torch.Tensor  # [n]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, index):
        return XY(self.x[index], self.y[index])


class GaussianLikelihood(Likelihood):
    def __init__(self, noise: float):
        self.noise = noise

    def __call__(self, lm, task: TaskData, index: int) -> None:
        with data_plate(task, index) as batch:
            mean = lm(batch.x).squeeze(-1)
            pyro.sample(sites.obs(index), dist.Normal(mean, self.noise), obs=batch.y if task.observed else None)


def make_data(n: int, w: float, noise: float, seed: int) -> XY:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    y = x.squeeze(-1) * w + noise * torch.randn(n, generator=g)
    return XY(x, y)
