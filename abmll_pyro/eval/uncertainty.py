"""The uncertainty split for any method, per example and averaged, for predictions and results files.

A method with ``predict_samples(state, episode) -> [S, n, K]`` (ABMLL: one row per posterior sample)
is split into total = aleatoric + epistemic (:func:`abmll_pyro.infer.predictive.uncertainty_split`);
a method with only ``predict`` is one sample, so its epistemic part is 0 and total = aleatoric.

* :func:`predict_with_uncertainty` — the split of one episode's query set (``.probs`` is what
  ``predict`` returns, up to float rounding, under the same seed);
* :func:`example_fields` — ``[{"entropy", "aleatoric", "epistemic", "spread"}, ...]`` per query example, to add
  to each line of ``predictions.jsonl`` / ``abmll predict`` output;
* :func:`uncertainty_means` — per-task means and the pooled mean over all examples, for results.json.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ..infer.predictive import UncertaintySplit, uncertainty_split

__all__ = ["FIELDS", "sample_probs", "predict_with_uncertainty", "example_fields", "uncertainty_means"]

FIELDS = ("entropy", "aleatoric", "epistemic", "spread")


@torch.no_grad()
def sample_probs(method: Any, state: Any, episode: Any) -> Tensor:
    """``[S, n, K]`` float64 per-sample probabilities (S = 1 for a method without ``predict_samples``)."""
    fn = getattr(method, "predict_samples", None)
    if fn is not None:
        return fn(state, episode).double()
    return method.predict(state, episode).double()[None]


def predict_with_uncertainty(method: Any, state: Any, episode: Any) -> UncertaintySplit:
    """The query set's posterior predictive and its per-example uncertainty split (CPU, float64)."""
    return uncertainty_split(sample_probs(method, state, episode).cpu())


def example_fields(split: UncertaintySplit) -> list[dict[str, float]]:
    """One ``{"entropy", "aleatoric", "epistemic"}`` dict (nats) per example, with ``spread`` (the std over
    posterior samples of the top option's probability)."""
    cols = [getattr(split, f).tolist() for f in FIELDS]
    return [dict(zip(FIELDS, row)) for row in zip(*cols)]


def uncertainty_means(splits: Mapping[str, UncertaintySplit]) -> dict[str, dict]:
    """``{"per_task": {task: {field: mean}}, "pooled": {field: mean over all examples, "n": count}}``."""
    per_task = {name: {f: float(getattr(s, f).mean()) for f in FIELDS} for name, s in splits.items()}
    pooled: dict[str, float] = {}
    if splits:
        for f in FIELDS:
            pooled[f] = float(torch.cat([getattr(s, f) for s in splits.values()]).mean())
        pooled["n"] = sum(int(s.entropy.numel()) for s in splits.values())
    return {"per_task": per_task, "pooled": pooled}
