"""Build a MetaSVI over the 1×1 linear-Gaussian toy."""

from __future__ import annotations

import torch

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.models import HierarchicalPrior

from .toys import GaussianLikelihood, Regressor


def toy_svi(kl_beta=1.0, kl_gamma=None, init_std=1.0, noise=0.5, prior=None, task_guide=None, elbo=None,
            seed=0, meta=None, **inner) -> MetaSVI:
    lm = Regressor()
    config = AdapterConfig(rank=1, lora_alpha=1.0, target_modules=("proj",), init_std=init_std)
    adapter = BayesLoRA(lm, config, generator=torch.Generator().manual_seed(seed))
    meta = MetaConfig(kl_beta=kl_beta, kl_gamma=kl_gamma, outer_lr=1e-2, grad_clip=None,
                      inner=InnerLoopConfig(**inner), **(meta or {}))
    return MetaSVI(adapter, meta, prior=prior or HierarchicalPrior(adapter=adapter), task_guide=task_guide,
                   likelihood=GaussianLikelihood(noise), elbo=elbo)
