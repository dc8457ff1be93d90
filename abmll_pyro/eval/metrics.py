"""Per-task predictive metrics over option probabilities: accuracy, ECE, NLL, Brier, reliability data.

Every function takes ``probs`` ``[n, max_options]`` (each row a distribution over the example's
valid options, padded slots exactly ``0``) and ``gold`` ``[n]`` (long), validated by
:func:`abmll_pyro.eval._inputs.check_probs_gold`. With ``c_i = max_k p_ik`` (top-class confidence),
``y_hat_i = argmax_k p_ik`` (first index on ties) and ``y_i`` the gold index:

* accuracy ``= (1/n) sum_i [y_hat_i = y_i]``
* ECE (Guo et al., 2017, "On Calibration of Modern Neural Networks", eq. 3)
  ``= sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` over ``num_bins`` equal-width bins of ``c_i``;
  bin ``b`` is ``(b/B, (b+1)/B]``, the first bin also holding ``0``.
* NLL ``= -(1/n) sum_i log max(p_{i,y_i}, tiny)``.
* Brier (Brier, 1950, multi-class form) ``= (1/n) sum_i sum_k (p_ik - [k = y_i])^2``, in ``[0, 2]``;
  padded slots have ``p = 0`` and are never gold, so they add nothing.

All metrics are computed in float64 and returned as Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from abmll_pyro.eval._inputs import check_num_bins, check_probs_gold

__all__ = [
    "ReliabilityDiagram",
    "TaskMetrics",
    "accuracy",
    "brier_score",
    "compute_metrics",
    "expected_calibration_error",
    "ece_floor",
    "ece_floor_draws",
    "pad_probs",
    "macro_average",
    "negative_log_likelihood",
    "reliability_diagram",
]


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Binned top-class confidence against accuracy (float64 CPU tensors).

    Shapes: ``edges`` ``[B + 1]`` (``b / B``); ``confidence``, ``accuracy`` ``[B]`` (per-bin means,
    ``NaN`` for empty bins); ``count`` ``[B]`` long (examples per bin, summing to ``n``).
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def num_bins(self) -> int:
        return int(self.count.shape[0])

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        """``sum_b (count_b / n) |accuracy_b - confidence_b|`` over non-empty bins."""
        full = self.count > 0
        gaps = (self.accuracy[full] - self.confidence[full]).abs()
        return float((self.count[full].to(torch.float64) * gaps).sum() / self.n)


def _top_class(probs: Tensor, gold: Tensor) -> tuple[Tensor, Tensor]:
    """Top-class confidence ``[n]`` and correctness ``[n]`` (float64, 1.0 when correct)."""
    confidence, predicted = probs.max(dim=1)  # ties: torch returns the first maximal index
    return confidence, (predicted == gold).to(torch.float64)


def _reliability(probs: Tensor, gold: Tensor, num_bins: int, dtype: torch.dtype) -> ReliabilityDiagram:
    confidence, correct = _top_class(probs, gold)
    edges = torch.arange(num_bins + 1, dtype=torch.float64) / num_bins
    # Bin in the caller's precision so that float32 0.3 falls in (0.2, 0.3] as written, not just above.
    inner = edges[1:-1].to(dtype).to(torch.float64).to(confidence.device)
    # bucketize(right=False): index b with inner[b-1] < c <= inner[b], i.e. c in (b/B, (b+1)/B].
    bins = torch.bucketize(confidence, inner, right=False)
    count = torch.bincount(bins, minlength=num_bins)
    denom = count.to(torch.float64)
    nan = torch.full_like(denom, math.nan)
    conf_sum = torch.bincount(bins, weights=confidence, minlength=num_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    full = count > 0
    return ReliabilityDiagram(
        edges=edges,
        confidence=torch.where(full, conf_sum / denom.clamp(min=1), nan).cpu(),
        accuracy=torch.where(full, acc_sum / denom.clamp(min=1), nan).cpu(),
        count=count.cpu(),
    )


def _nll(probs: Tensor, gold: Tensor, dtype: torch.dtype) -> float:
    # Clamp at the smallest normal number of the caller's dtype: only exact zeros (underflow) change,
    # capping one example's loss at -log(tiny) (87.3 nats for float32, 708.4 for float64).
    p_gold = probs.gather(1, gold[:, None]).squeeze(1).clamp(min=torch.finfo(dtype).tiny)
    return float(-p_gold.log().mean())


def _brier(probs: Tensor, gold: Tensor) -> float:
    onehot = torch.zeros_like(probs).scatter_(1, gold[:, None], 1.0)
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def accuracy(probs: Tensor, gold: Tensor) -> float:
    """Fraction of examples whose most probable option (first on ties) is gold."""
    checked, gold = check_probs_gold(probs, gold)
    return float(_top_class(checked, gold)[1].mean())


def reliability_diagram(probs: Tensor, gold: Tensor, num_bins: int = 15) -> ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and count over ``num_bins`` equal-width confidence bins.

    Bin ``b`` covers ``(b/B, (b+1)/B]``; the first bin also holds confidence ``0``.
    """
    num_bins = check_num_bins(num_bins)
    checked, gold = check_probs_gold(probs, gold)
    return _reliability(checked, gold, num_bins, probs.dtype)


def expected_calibration_error(probs: Tensor, gold: Tensor, num_bins: int = 15) -> float:
    """ECE: ``sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` over equal-width top-class confidence bins.

    Bins as in :func:`reliability_diagram`; with ``num_bins = 1`` it is ``|mean confidence - accuracy|``.
    """
    return reliability_diagram(probs, gold, num_bins).ece


def negative_log_likelihood(probs: Tensor, gold: Tensor) -> float:
    """Mean ``-log p(gold)`` in nats; ``p(gold)`` is clamped below at ``torch.finfo(probs.dtype).tiny``
    so that a zero probability gives a large finite loss instead of ``inf``."""
    checked, gold = check_probs_gold(probs, gold)
    return _nll(checked, gold, probs.dtype)


def brier_score(probs: Tensor, gold: Tensor) -> float:
    """Multi-class Brier score ``(1/n) sum_i sum_k (p_ik - [k = y_i])^2`` (range ``[0, 2]``)."""
    checked, gold = check_probs_gold(probs, gold)
    return _brier(checked, gold)


def ece_floor_draws(probs: Tensor, num_bins: int = 15, draws: int = 200, seed: int = 0) -> Tensor:
    """The ECE of a perfectly calibrated predictor with these confidences, once per draw: ``[draws]`` float64.

    Labels are drawn from the predicted distributions themselves, so the prediction is calibrated by
    construction; the top label is then correct with probability ``c_i`` (its confidence). Draw ``d``
    scores ``Σ_b |Σ_{i ∈ B_b} (z_di − c_i)| / n`` with ``z_di ~ Bernoulli(c_i)`` (generator seeded by
    ``seed``) and the bins of :func:`reliability_diagram`. Their mean is :func:`ece_floor`; their
    spread says how often a calibrated predictor scores below a given ECE at this ``n``.
    """
    num_bins = check_num_bins(num_bins)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    checked, _ = check_probs_gold(probs, torch.zeros(probs.shape[0], dtype=torch.long))
    confidence = checked.max(dim=1).values  # [n] float64
    edges = (torch.arange(num_bins + 1, dtype=torch.float64) / num_bins)[1:-1].to(probs.dtype).to(torch.float64)
    bins = torch.bucketize(confidence, edges.to(confidence.device), right=False)  # [n]
    g = torch.Generator().manual_seed(seed)
    hits = (torch.rand((draws, confidence.numel()), generator=g, dtype=torch.float64) < confidence.cpu()).double()
    gaps = hits - confidence.cpu()  # [D, n]
    per_bin = torch.zeros((draws, num_bins), dtype=torch.float64).index_add_(1, bins.cpu(), gaps)  # [D, B]
    return per_bin.abs().sum(1) / confidence.numel()


def ece_floor(probs: Tensor, num_bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated predictor with these confidences scores at this ``n``: its noise floor.

    The mean of :func:`ece_floor_draws`:

        floor = E_{z_i ~ Bernoulli(c_i)} [ Σ_b |Σ_{i ∈ B_b} (z_i − c_i)| / n ],

    with ``c_i`` each example's top-label confidence. It shrinks like ``1/√n``: a measured ECE is only
    evidence of miscalibration by how far it sits above this value.
    """
    return float(ece_floor_draws(probs, num_bins, draws, seed).mean())


def pad_probs(parts: list[Tensor]) -> Tensor:
    """Concatenate ``[n_t, M_t]`` probability blocks of tasks with different option counts, padding
    with probability 0 (never gold, adds nothing to any metric)."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


@dataclass(frozen=True)
class TaskMetrics:
    """The metrics of one task over its ``n`` evaluation examples."""

    accuracy: float
    ece: float
    nll: float
    brier: float
    n: int


def compute_metrics(probs: Tensor, gold: Tensor, num_bins: int = 15) -> TaskMetrics:
    """All four metrics of one task, validating the inputs once."""
    num_bins = check_num_bins(num_bins)
    checked, gold64 = check_probs_gold(probs, gold)
    return TaskMetrics(
        accuracy=float(_top_class(checked, gold64)[1].mean()),
        ece=_reliability(checked, gold64, num_bins, probs.dtype).ece,
        nll=_nll(checked, gold64, probs.dtype),
        brier=_brier(checked, gold64),
        n=int(gold64.shape[0]),
    )


_AVERAGED = ("accuracy", "ece", "nll", "brier")


def macro_average(per_task: Mapping[str, TaskMetrics]) -> dict[str, float | int]:
    """Unweighted mean over tasks of accuracy, ECE, NLL and Brier, plus ``n`` (total examples)
    and ``num_tasks``. Each task counts once whatever its size (macro, not micro, averaging)."""
    if not per_task:
        raise ValueError("macro_average needs at least one task, got an empty mapping")
    for name, metrics in per_task.items():
        if not isinstance(metrics, TaskMetrics):
            raise TypeError(f"task {name!r}: expected TaskMetrics, got {type(metrics).__name__}")
    num_tasks = len(per_task)
    out: dict[str, float | int] = {
        key: sum(getattr(m, key) for m in per_task.values()) / num_tasks for key in _AVERAGED
    }
    out["n"] = sum(m.n for m in per_task.values())
    out["num_tasks"] = num_tasks
    return out
