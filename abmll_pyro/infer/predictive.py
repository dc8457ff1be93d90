"""The posterior predictive of a task's query set.

    p(y | x, S) ≈ (1/S) Σ_s softmax(scores(x; W0 + ΔW_s)),   ΔW_s ~ q(φ | support)

``"sample"`` mode draws each ΔW_s by tracing the Pyro guide and replays the model on it
(``poutine.trace`` + ``poutine.replay``, one sample at a time: memory stays at one ΔW per module),
reading the deterministic ``probs[0]`` site. ``"mean"`` mode uses the mean of q in low-rank form
(no sampling, one pass). The query labels are never observed here.

The uncertainty split (:func:`uncertainty_split`) of the per-sample probabilities p_s = p(y | x, ΔW_s)
(:func:`predictive_samples`), per example, in nats:

    total      H[(1/S) Σ_s p_s]                      entropy of the posterior predictive
    aleatoric  (1/S) Σ_s H[p_s]                      expected entropy: the noise each model sees
    epistemic  total − aleatoric = I(y; ΔW | x, S)   mutual information: disagreement between samples

(Houlsby et al. 2011, "BALD"; Depeweg et al. 2018). Epistemic ≥ 0 by concavity of H; it is 0 when
all samples agree (and in mean mode, one "sample"). Computed in float64 with 0·log 0 = 0 (padded
option slots have probability 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import pyro.poutine as poutine
import torch
from torch import Tensor

from .. import sites
from ..models.likelihoods import TaskData
from .meta import MetaSVI

__all__ = ["posterior_predictive", "mean_probs", "predictive_samples", "uncertainty_split", "UncertaintySplit", "entropy"]


@torch.no_grad()
def posterior_predictive(svi: MetaSVI, task_params: Mapping[str, Tensor], query: TaskData,
                         num_samples: int = 10, mode: str = "sample") -> Tensor:
    """``[n, max_options]`` float32 option probabilities for ``query`` (all its examples, labels
    unused): the mean over samples of :func:`predictive_samples`."""
    return predictive_samples(svi, task_params, query, num_samples, mode).mean(0).float()


@torch.no_grad()
def predictive_samples(svi: MetaSVI, task_params: Mapping[str, Tensor], query: TaskData,
                       num_samples: int = 10, mode: str = "sample") -> Tensor:
    """``[S, n, max_options]`` float64: each posterior sample's option probabilities p_s
    (S = ``num_samples``; S = 1 in ``"mean"`` mode)."""
    if mode not in ("sample", "mean"):
        raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    if mode == "sample" and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    query = TaskData(query.batch, subsample_size=None, observed=False)
    if mode == "mean":
        return mean_probs(svi, task_params, query).double()[None]
    args = (svi.theta(), [task_params], [query])
    out = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(svi.guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(svi.model, trace=guide_trace)).get_trace(*args)
        out.append(model_trace.nodes[sites.probs(0)]["value"].double())
    return torch.stack(out)


def entropy(probs: Tensor) -> Tensor:
    """−Σ_k p_k log p_k over the last dimension, with 0·log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


@dataclass(frozen=True)
class UncertaintySplit:
    """Per example ``[n]`` (float64, nats): ``entropy`` = ``aleatoric`` + ``epistemic``; ``probs``
    ``[n, K]`` is the posterior predictive (the mean of the samples); ``spread`` is the standard
    deviation over the samples of the probability of the predictive's top option (0 for one sample)."""

    probs: Tensor
    entropy: Tensor
    aleatoric: Tensor
    epistemic: Tensor
    spread: Tensor


def uncertainty_split(sample_probs: Tensor) -> UncertaintySplit:
    """Split the predictive entropy of ``sample_probs`` ``[S, n, K]`` (or ``[n, K]``: one sample).

    The mutual information is clamped at 0 against float64 rounding (it is ≥ 0 mathematically).
    """
    if sample_probs.dim() == 2:
        sample_probs = sample_probs[None]
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must be [S, n, K] or [n, K], got shape {tuple(sample_probs.shape)}")
    p = sample_probs.double()
    mean = p.mean(0)
    total = entropy(mean)
    aleatoric = entropy(p).mean(0)
    top = mean.argmax(-1)
    top_probs = p.gather(-1, top[None, :, None].expand(p.shape[0], -1, 1)).squeeze(-1)  # [S, n]
    spread = top_probs.std(0, correction=0)
    return UncertaintySplit(mean, total, aleatoric, (total - aleatoric).clamp_min(0.0), spread)


def mean_probs(svi: MetaSVI, task_params: Mapping[str, Tensor], query: TaskData) -> Tensor:
    """``[n, max_options]`` option probabilities at q's mean (``"mean"`` mode's one pass); differentiable
    in ``task_params`` outside ``no_grad`` (a point-estimate fine-tune uses it as its loss)."""
    adapter = svi.adapter
    task_guide = svi.guide.task_guide
    deltas = {}
    for m in adapter.shapes:
        q = task_guide.task_distribution(adapter, task_params, m)
        deltas[m] = q.mean
    # the mean-field / point-mass guides' mean is (α/r)·B_μ A_μ: use the low-rank form when it applies
    # (values only: under autograd the dense means are used, whose graph reaches every key they depend on)
    if not torch.is_grad_enabled() and all(torch.equal(deltas[m], adapter.mean(task_params, m)) for m in adapter.shapes):
        deltas = adapter.mean_deltas(task_params)
    scores_fn = getattr(svi.model.likelihood, "scores", None)
    if scores_fn is None:
        raise TypeError(f"mean-mode prediction needs a likelihood with scores(); got {type(svi.model.likelihood).__name__}")
    subspace = getattr(svi.model, "subspace", None)
    shifts = subspace.mean_shifts(task_params) if subspace is not None else {}  # z at q's mean
    with adapter.use(deltas), adapter.shifted(shifts):
        return torch.softmax(scores_fn(adapter.lm, query.batch), -1)
