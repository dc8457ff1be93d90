"""Does meta-training amplify round-off? Two training runs of one config whose starting weights differ
by about one float32 ulp, on the same episodes and the same noise draws; the relative distance between
their trainable factors after every outer step, per factor kind (``mu_A``, ``mu_B``, ``sigma_A``,
``sigma_B`` for the Bayesian methods, ``all`` otherwise).

A distance that stays near its start (≈ 2⁻²³) or levels off means the training forgets round-off; one
that keeps growing by a constant factor per step means any change of summation order (another batch
composition, thread count, BLAS) ends in a different trained model, and one run per seed says little
about the method (docs/RESULTS.md, "Why ABMLL's training amplifies round-off"). ``rel=0`` gives two
identical runs — the check that the two trajectories compare like with like.

The steps are the training loop's own (:func:`~abmll_pyro.train.run._micro_batch`: per-episode seeds
and weights, gradient clipping, the method's optimizer), single process.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import torch

from abmll_pyro.data.trunk import TRUNK_DIR_ENV, shared_trunk_dir
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.distributed import Ranks
from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler
from abmll_pyro.train.run import _micro_batch, make_accelerator
from abmll_pyro.train.setup import build

__all__ = ["roundoff_growth"]

KINDS = ("mu_A", "mu_B", "sigma_A", "sigma_B")


def _kind(name: str) -> str:
    return next((k for k in KINDS if name.endswith(k)), "all")


def _named_parameters(method) -> dict[str, torch.Tensor]:
    svi = getattr(method, "svi", None)
    if svi is not None:
        return dict(svi.adapter.global_params())
    return {f"p{i}": p for i, p in enumerate(method.parameters())}


def _trajectory(config: RunConfig, steps: int, rel: float, perturb_seed: int) -> list[dict[str, torch.Tensor]]:
    accelerator = make_accelerator(config)
    built, taskset = build(config, accelerator.device)
    method = built.method
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template,
                             method.in_context, accelerator.device)
    optimizer = method.make_optimizer()
    named = _named_parameters(method)
    params = list(method.parameters())
    generator = torch.Generator().manual_seed(perturb_seed)
    with torch.no_grad():  # relative, so a factor started at zero (LoRA's B) stays exactly zero
        for p in named.values():
            p.mul_(1 + rel * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device, p.dtype))
    ranks = Ranks.of(accelerator)
    states = [{k: p.detach().double().clone() for k, p in named.items()}]
    for step in range(steps):
        _micro_batch(method, sampler, encoder, ranks, step, config.seed, lambda loss: loss.backward())
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states.append({k: p.detach().double().clone() for k, p in named.items()})
    return states


def roundoff_growth(config: RunConfig, steps: int | None = None, rel: float = 2.0 ** -23,
                    perturb_seed: int = 123) -> dict:
    """Per outer step and factor kind, ‖θ_a − θ_b‖ / ‖θ_a‖ for runs started at θ and θ·(1 + rel·ε)."""
    if config.method in ("pretrained", "icl", "bayes-lora", "lora-ts"):
        raise ValueError(f"method {config.method!r} trains nothing of its own: choose a meta-trained method")
    if not (rel >= 0 and math.isfinite(rel)):
        raise ValueError(f"rel must be finite and >= 0, got {rel!r}")
    steps = config.steps if steps is None else steps
    with contextlib.ExitStack() as stack:
        if config.trunk_cache and not os.environ.get(TRUNK_DIR_ENV):
            # both runs read one shared trunk (its entries do not depend on who computed them)
            stack.enter_context(shared_trunk_dir(stack.enter_context(tempfile.TemporaryDirectory())))
        a = _trajectory(config, steps, 0.0, perturb_seed)
        b = _trajectory(config, steps, rel, perturb_seed)
    kinds = sorted({_kind(k) for k in a[0]}, key=lambda k: (KINDS + ("all",)).index(k))
    divergence: dict[str, list[float]] = {k: [] for k in kinds}
    for x, y in zip(a, b):
        for kind in kinds:
            names = [n for n in x if _kind(n) == kind]
            xa = torch.cat([x[n].flatten() for n in names])
            ya = torch.cat([y[n].flatten() for n in names])
            norm = float(xa.norm())
            divergence[kind].append(float((xa - ya).norm()) / norm if norm > 0 else 0.0)
    return {"method": config.method, "rel": rel, "steps": steps, "divergence": divergence}
