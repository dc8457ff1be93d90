"""Task families drawn from the model's own hierarchy: a known θ*, a known spread s, known φ_i.

For an adapter whose scales are free log-scales (:class:`~abmll_pyro.lora.positivity.LogStd`, so a
uniform spread s is exactly representable: s_0 = log((s − floor)/(init_std − floor)), r = c = 0):

    θ*   = (μ*, s):  μ* = (α/r)·B* A*, rank r, elementwise RMS ``mean_rms``; σ* = s everywhere
    φ_i  ~ p(ΔW | θ*)                                  the model's task site, conditioned on θ*
    x_ij ~ the text pool (uniform, without replacement within a task)
    y_ij ~ Categorical(softmax(scores(x_ij; W0 + ΔW_i)))   the model's own observation site

Each task is one trace of :class:`~abmll_pyro.models.hierarchical.HierarchicalModel` with the θ sites
conditioned on θ*'s values and the labels left unobserved (so Pyro samples them), which makes the
generator the model's generative story itself, not a re-implementation. The trace keeps the true
ΔW_i (for simulation-based calibration) and the true label distribution of every example (the
oracle predictor, whose expected NLL is the label entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import pyro.poutine as poutine
import torch
from torch import Tensor

from ... import sites
from ...lora.adapter import BayesLoRA
from ...lora.positivity import LogStd
from ...models.hierarchical import HierarchicalModel
from ...models.likelihoods import TaskData
from ..encoding import encode_options
from ..scoring import OptionBatch
from ..tasks import Example
from ..templates import Template

__all__ = ["true_theta", "KnownTask", "sample_task", "default_text_pool", "OPTIONS"]

#: the family's options: single characters, so every option is the same number of tokens
OPTIONS = ("A", "B", "C")


def true_theta(adapter: BayesLoRA, spread: float, mean_rms: float, generator: torch.Generator) -> dict[str, Tensor]:
    """θ*'s factors, keyed like ``adapter.global_params()`` (float64): a random rank-r mean of
    elementwise RMS ``mean_rms`` and the uniform spread σ* = ``spread``."""
    std_map = adapter.std_map
    if not isinstance(std_map, LogStd):
        raise ValueError(f"a known spread needs a free log-scale map (std_map 'log-rowcol' or 'log-full'), got {std_map!r}")
    if not spread > std_map.floor:
        raise ValueError(f"spread must exceed the std floor {std_map.floor:g}, got {spread!r}")
    if not mean_rms >= 0:
        raise ValueError(f"mean_rms must be >= 0, got {mean_rms!r}")
    log_scale = math.log((spread - std_map.floor) / (std_map.init_std - std_map.floor))
    out = {}
    for m, (n_out, n_in) in adapter.shapes.items():
        rank = adapter.config.rank
        A = torch.randn(rank, n_in, generator=generator, dtype=torch.float64) / math.sqrt(n_in)
        B = torch.randn(n_out, rank, generator=generator, dtype=torch.float64)
        rms = float((adapter.config.scaling * B @ A).pow(2).mean().sqrt())
        out[adapter.key(m, "mu_A")], out[adapter.key(m, "mu_B")] = A, B * (mean_rms / rms if rms > 0 else 0.0)
        for kind, value in std_map.init_factors(n_out, n_in, rank).items():
            value = value.double()
            out[adapter.key(m, kind)] = value + log_scale if kind in ("sigma_log0", "sigma_log") else value
    return out


@dataclass(frozen=True)
class KnownTask:
    """One task drawn from the family: ``batch`` (labels = sampled gold), the true ΔW_i per module,
    ``true_probs`` ``[n, K]``, the label distribution the labels were drawn from, and with a task
    subspace in the model the true z_i per module (``latent``; empty without one)."""

    batch: OptionBatch
    delta: dict[str, Tensor]
    true_probs: Tensor
    latent: dict[str, Tensor] = field(default_factory=dict)

    def split(self, shots: int) -> tuple[TaskData, TaskData]:
        """``(support, query)``: the first ``shots`` examples and the rest."""
        n = len(self.batch)
        if not 0 < shots < n:
            raise ValueError(f"shots must be in 1..{n - 1} for a task of {n} examples, got {shots}")
        return TaskData(self.batch.select(torch.arange(shots))), TaskData(self.batch.select(torch.arange(shots, n)))

    def oracle_nll(self, start: int = 0) -> float:
        """Mean over examples ``start..`` of −log p_true(y): the oracle's NLL on the sampled labels."""
        p = self.true_probs[start:].gather(-1, self.batch.gold[start:, None]).squeeze(-1)
        return float(-p.double().log().mean())


def sample_task(model: HierarchicalModel, theta_star: dict[str, Tensor], batch: OptionBatch, seed: int) -> KnownTask:
    """One task of the family on the inputs of ``batch`` (its gold ignored): a trace of ``model`` with
    θ's sites conditioned on θ*'s point values, φ_i and the labels sampled (torch seeded with ``seed``,
    the global RNG state restored afterwards)."""
    adapter, prior = model.adapter, model.prior
    with torch.no_grad():
        values = {}
        for m in adapter.shapes:
            point = prior.global_values(adapter.mean(theta_star, m), adapter.std(theta_star, m))
            values.update({sites.theta(m, k): v for k, v in point.items()})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                theta_star, [{}], [TaskData(batch, observed=False)])
    gold = trace.nodes[sites.obs(0)]["value"].detach().cpu().long()
    delta = {m: trace.nodes[sites.phi(0, m)]["value"].detach() for m in adapter.shapes}
    probs = trace.nodes[sites.probs(0)]["value"].detach().cpu()
    subspace = getattr(model, "subspace", None)
    latent = {m: trace.nodes[sites.latent(0, m)]["value"].detach() for m in subspace.modules} if subspace is not None else {}
    return KnownTask(replace(batch, gold=gold), delta, probs, latent)


def family_inputs(tokenizer, pool: Sequence[str], n: int, generator: torch.Generator,
                  options: Sequence[str] = OPTIONS, template: Template | str = "direct", max_length: int | None = None) -> OptionBatch:
    """``n`` inputs drawn from ``pool`` without replacement (each text as it is: no shared suffix, so
    the LM's state before the option differs from input to input), encoded with ``options`` (gold 0,
    a placeholder that :func:`sample_task` replaces)."""
    if n > len(pool):
        raise ValueError(f"the text pool holds {len(pool)} inputs, fewer than the {n} a task needs")
    pick = torch.randperm(len(pool), generator=generator)[:n].tolist()
    examples = [Example(pool[i], tuple(options), 0) for i in pick]
    return encode_options(tokenizer, examples, template, max_length=max_length, name="known-truth inputs")


def default_text_pool() -> list[str]:
    """Real English sentences available offline, in a fixed order: ``abmll_pyro/data/known_truth_pool.json``,
    651 sentences of 20–160 ASCII characters taken once from this package's own docstrings and frozen
    there (read live, every edit of a docstring changed the family's inputs, and with them every
    known-truth figure and seeded test value)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "known_truth_pool.json"
    return json.loads(path.read_text(encoding="utf-8"))
