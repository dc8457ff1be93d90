"""Every registered prior and guide, plus the example plug-ins loaded by file path, as fixtures.

``prior_spec`` and ``guide_spec`` are parametrized fixtures: a test that takes one runs once per
implementation, so a newly registered prior or guide joins the contract suite without edits here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.registry import GUIDES, PRIORS, resolve_guide, resolve_prior

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_prior_guide.py"
PRIOR_SPECS = PRIORS.names() + [f"{EXAMPLE}:LaplacePrior"]
GUIDE_SPECS = GUIDES.names() + [f"{EXAMPLE}:TemperedGuide"]


def short_id(spec: str) -> str:
    return spec.rpartition(":")[2] if ":" in spec else spec


@pytest.fixture(params=PRIOR_SPECS, ids=short_id)
def prior_spec(request) -> str:
    return request.param


@pytest.fixture(params=GUIDE_SPECS, ids=short_id)
def guide_spec(request) -> str:
    return request.param


def build_svi(prior_spec: str, guide_spec: str, dtype=torch.float32, perturb: bool = True, **meta) -> MetaSVI:
    """A MetaSVI over a tiny Llama (rank 2). ``perturb`` moves θ off its init (B = 0), so every factor's
    gradient is generically nonzero."""
    torch.manual_seed(0)
    adapter = BayesLoRA(tiny_lm("llama", seed=1, dtype=dtype), AdapterConfig(rank=2, init_std=1e-2),
                        generator=torch.Generator().manual_seed(0)).to(dtype)
    if perturb:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for k, v in adapter.global_params().items():
                if k.endswith("_B"):
                    v.copy_(0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype))
    inner = InnerLoopConfig(num_inner_steps=meta.pop("num_inner_steps", 2), inner_lr=1e-3)
    config = MetaConfig(**{"kl_beta": 1e-6, "outer_lr": 3e-2, **meta}, inner=inner)
    return MetaSVI(adapter, config, prior=resolve_prior(prior_spec, adapter=adapter),
                   task_guide=resolve_guide(guide_spec, adapter=adapter))


def episodes(seeds, shots: int = 4, query: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [family_episode(t, shots, query, g) for t in seeds]


@pytest.fixture
def make_svi():
    return build_svi


@pytest.fixture
def make_episodes():
    return episodes
