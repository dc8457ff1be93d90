"""The posterior predictive of a task's query set.

    p(y | x, S) ≈ (1/S) Σ_s softmax(scores(x; W0 + ΔW_s)),   ΔW_s ~ q(φ | support)

``"sample"`` mode draws each ΔW_s by tracing the Pyro guide and replays the model on it
(``poutine.trace`` + ``poutine.replay``, one sample at a time: memory stays at one ΔW per module),
reading the deterministic ``probs[0]`` site. ``"mean"`` mode uses the mean of q in low-rank form
(no sampling, one pass). The query labels are never observed here.
"""

from __future__ import annotations

from typing import Mapping

import pyro.poutine as poutine
import torch
from torch import Tensor

from .. import sites
from ..models.likelihoods import TaskData
from .meta import MetaSVI

__all__ = ["posterior_predictive"]


@torch.no_grad()
def posterior_predictive(svi: MetaSVI, task_params: Mapping[str, Tensor], query: TaskData,
                         num_samples: int = 10, mode: str = "sample") -> Tensor:
    """``[n, max_options]`` option probabilities for ``query`` (all its examples, labels unused)."""
    if mode not in ("sample", "mean"):
        raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    if mode == "sample" and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    query = TaskData(query.batch, subsample_size=None, observed=False)
    theta = svi.theta()
    args = (theta, [task_params], [query])
    if mode == "mean":
        return _mean_probs(svi, task_params, query)
    total = None
    for _ in range(num_samples):
        guide_trace = poutine.trace(svi.guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(svi.model, trace=guide_trace)).get_trace(*args)
        probs = model_trace.nodes[sites.probs(0)]["value"].double()
        total = probs if total is None else total + probs
    return (total / num_samples).float()


def _mean_probs(svi: MetaSVI, task_params: Mapping[str, Tensor], query: TaskData) -> Tensor:
    adapter = svi.adapter
    task_guide = svi.guide.task_guide
    deltas = {}
    for m in adapter.shapes:
        q = task_guide.task_distribution(adapter, task_params, m)
        deltas[m] = q.mean
    # the mean-field / point-mass guides' mean is (α/r)·B_μ A_μ: use the low-rank form when it applies
    if all(torch.equal(deltas[m], adapter.mean(task_params, m)) for m in adapter.shapes):
        deltas = adapter.mean_deltas(task_params)
    scores_fn = getattr(svi.model.likelihood, "scores", None)
    if scores_fn is None:
        raise TypeError(f"mean-mode prediction needs a likelihood with scores(); got {type(svi.model.likelihood).__name__}")
    with adapter.use(deltas):
        return torch.softmax(scores_fn(adapter.lm, query.batch), -1)
