"""Validation shared by every metric: ``probs`` ``[n, max_options]`` and ``gold`` ``[n]``.

The contract (kept in this one place): ``probs`` is a floating tensor whose rows are predictive
distributions over the valid options of each example, padded option slots holding ``0`` (so each row
sums to ``1`` over all ``max_options`` slots); ``gold`` is an integer tensor of gold option indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PROB_ATOL", "check_probs_gold", "check_num_bins"]

# Rows of float32 softmax outputs sum to 1 within ~1e-6 per 1,000 options; 1e-4 leaves room for
# probabilities that went through exp(log_softmax) or a half-precision LM while still catching
# unnormalized scores (which are off by far more).
PROB_ATOL = 1e-4


def check_probs_gold(probs: Tensor, gold: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` / ``gold`` and return them detached, ``probs`` as float64.

    Raises ``TypeError`` for wrong dtypes and ``ValueError`` (naming the offending row or value) for
    wrong shapes, empty input, non-finite entries, entries outside ``[0, 1]``, rows not summing to 1
    within :data:`PROB_ATOL`, and gold indices outside ``[0, max_options)``.
    """
    if not isinstance(probs, Tensor) or not isinstance(gold, Tensor):
        raise TypeError(f"probs and gold must be torch tensors, got {type(probs).__name__} and {type(gold).__name__}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating tensor, got dtype {probs.dtype}")
    if gold.dtype == torch.bool or gold.is_floating_point() or gold.is_complex():
        raise TypeError(f"gold must be an integer tensor of option indices, got dtype {gold.dtype}")
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [n, max_options], got {tuple(probs.shape)}")
    if gold.dim() != 1:
        raise ValueError(f"gold must have shape [n], got {tuple(gold.shape)}")
    n, max_options = probs.shape
    if gold.shape[0] != n:
        raise ValueError(f"probs has {n} rows but gold has {gold.shape[0]} entries")
    if n == 0:
        raise ValueError("metrics of an empty set of examples are undefined (n = 0)")
    if max_options == 0:
        raise ValueError(f"probs has no option slots (shape {tuple(probs.shape)})")
    probs = probs.detach().to(torch.float64)
    gold = gold.detach().to(torch.long)

    finite = torch.isfinite(probs).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise ValueError(f"probs row {row} has a non-finite entry: {probs[row].tolist()}")
    outside = ((probs < -PROB_ATOL) | (probs > 1 + PROB_ATOL)).any(dim=1)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        raise ValueError(f"probs row {row} has an entry outside [0, 1]: {probs[row].tolist()}")
    sums = probs.sum(dim=1)
    off = (sums - 1).abs() > PROB_ATOL
    if bool(off.any()):
        row = int(off.nonzero()[0])
        raise ValueError(
            f"probs row {row} sums to {float(sums[row]):.6g}, not 1 (tolerance {PROB_ATOL}); "
            "pass probabilities (e.g. softmax of option scores), not scores"
        )
    bad = (gold < 0) | (gold >= max_options)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"gold[{i}] = {int(gold[i])} is out of range for {max_options} option slots")
    return probs, gold


def check_num_bins(num_bins: int) -> int:
    """Return ``num_bins`` if it is an integer ``>= 1``; raise naming it otherwise."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int):
        raise TypeError(f"num_bins must be an int, got {num_bins!r} ({type(num_bins).__name__})")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return num_bins
