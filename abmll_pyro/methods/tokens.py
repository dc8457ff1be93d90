"""Token-level (generative) losses for the deterministic-LoRA baselines.

The per-token negative log-likelihood of a batch's target tokens under W0 + ΔW,

    NLL = −(1/T) Σ_j Σ_{t ∈ target_j} log p(y_jt | x_j, y_j<t; W0 + ΔW),     T = Σ_j |target_j|,

is the token-level counterpart of the option cross-entropy (:func:`~abmll_pyro.methods.base.option_nll`
dispatches to it for a :class:`TokenBatch`), so Regular LoRA and Reptile train and fine-tune on
generative tasks unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..data.scoring import TokenBatch, token_log_probs
from ..lora.adapter import BayesLoRA

__all__ = ["token_nll", "target_log_probs"]


def target_log_probs(adapter: BayesLoRA, deltas: Mapping, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """``(log p(target_j | x_j) [n] float32, target token count [n])`` under ``deltas``."""
    with adapter.use(deltas):
        logits, targets, mask = token_log_probs(adapter.lm, batch)
    picked = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n, L-1]
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(-1), mask.sum(-1).float()


def token_nll(adapter: BayesLoRA, deltas: Mapping, batch: TokenBatch) -> Tensor:
    """Mean per-token negative log-likelihood of ``batch``'s targets (a scalar, differentiable)."""
    total, count = target_log_probs(adapter, deltas, batch)
    return -total.sum() / count.sum().clamp_min(1.0)
