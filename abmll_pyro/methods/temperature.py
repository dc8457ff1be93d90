"""Regular LoRA with temperature scaling (``lora-ts``): the calibration baseline a user reaches for first.

Training is Regular LoRA's (one LoRA on the training tasks pooled). At test time the factors are
fine-tuned on the task's support set exactly as Regular LoRA does (same K, same learning rate), and the
query's option logits are divided by a temperature T fitted on the same support set (Guo et al. 2017):

    p(y | x) = softmax(score(x; W0 + ΔW_S) / T),   T = argmin_T Σ_{(x,y) ∈ S} −log softmax_y(score_oof(x) / T).

The support examples are the only labelled data, and logits of examples the adapter was fine-tuned on
are over-confident, so T is fitted on **out-of-fold** scores (two-fold cross-fitting): the support set
is split into two halves (even and odd positions); for each half, a copy of the trained factors is
fine-tuned on the other half with the same inner-loop budget and scores the held-out half. T minimizes
the NLL of those held-out scores over a log-spaced grid (:data:`TEMPERATURES`, 0.05 to 20; a grid keeps
the fit deterministic and bounded with 4–16 examples); results.json's ``per_task[t].temperature``
records it. The adaptation therefore costs three inner loops instead of one (two on half the support);
``adapt_time_s`` in results.json shows it. With fewer than 2 support examples T = 1.

Sixteen out-of-fold scores do not pin T down: unregularized (``prior_std=None``), the fitted T ran to
the grid's ends (0.05 or 20) on 5 of 26 test (seed, task) pairs of cpu-long and raised the pooled NLL
above plain LoRA's on every seed (docs/RESULTS.md). So T is a MAP estimate by default: log T has a
Normal(0, ``prior_std``²) prior (``ts_prior_std`` in the run config, 0.25 by default: the best pooled
NLL of null, 1, 0.5 and 0.25 on cpu-long's dev tasks), i.e. T minimizes

    mean_S NLL_oof(T) + (log T)² / (2 · prior_std² · |S|),

which shrinks T towards 1 when the support says little and lets it move when the evidence is strong.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..data.scoring import OptionBatch
from .base import option_logits
from .lora import RegularLoRA, finetune

__all__ = ["TemperatureScaledLoRA", "fit_temperature", "TEMPERATURES"]

#: candidate temperatures, log-spaced
TEMPERATURES = torch.logspace(torch.log10(torch.tensor(0.05)), torch.log10(torch.tensor(20.0)), 121, dtype=torch.float64)


def fit_temperature(logits: Tensor, gold: Tensor, grid: Tensor = TEMPERATURES, prior_std: float | None = None) -> float:
    """The grid temperature minimizing the mean NLL of ``gold`` under ``softmax(logits / T)``, plus
    ``(log T)² / (2 prior_std² n)`` when ``prior_std`` is given (a Normal(0, prior_std²) prior on log T).

    ``logits``: ``[n, M]`` (−inf in padded slots); ``gold``: ``[n]``. Ties go to the T closest to 1."""
    if prior_std is not None and not (math.isfinite(prior_std) and prior_std > 0):
        raise ValueError(f"prior_std must be finite and > 0 (or None), got {prior_std!r}")
    logits = logits.double()
    logits = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -torch.inf))
    scaled = logits.unsqueeze(0) / grid.view(-1, 1, 1)  # [G, n, M]
    nll = -torch.log_softmax(scaled, -1).gather(2, gold.view(1, -1, 1).expand(len(grid), -1, 1)).squeeze(2).mean(1)
    if prior_std is not None:
        nll = nll + grid.log() ** 2 / (2 * prior_std**2 * len(gold))
    best = nll.min()
    near = torch.isclose(nll, best, rtol=0.0, atol=1e-12)
    candidates = grid[near]
    return float(candidates[(candidates.log()).abs().argmin()])


class TemperatureScaledLoRA(RegularLoRA):
    name = "lora-ts"

    def __init__(self, adapter, inner, outer_lr: float, prior_std: float | None = None):
        super().__init__(adapter, inner, outer_lr)
        self.prior_std = prior_std

    def _out_of_fold_logits(self, support: OptionBatch) -> tuple[Tensor, Tensor]:
        idx = torch.arange(len(support))
        folds = [idx[0::2], idx[1::2]]
        logits, gold = [], []
        for held, fit in (folds, folds[::-1]):
            params = finetune(self.adapter, self.lora.params(), support.select(fit), self.inner, self.likelihood)
            with torch.no_grad():
                held_batch = support.select(held)
                scores = option_logits(self.adapter, params, held_batch, self.likelihood).float().cpu()
            logits.append(scores)
            gold.append(held_batch.gold.cpu())
        width = max(s.shape[1] for s in logits)
        logits = [torch.nn.functional.pad(s, (0, width - s.shape[1]), value=float("-inf")) for s in logits]
        return torch.cat(logits), torch.cat(gold)

    def adapt(self, episode) -> tuple[dict[str, Tensor], float]:
        temperature = 1.0
        if len(episode.support) >= 2:
            temperature = fit_temperature(*self._out_of_fold_logits(episode.support), prior_std=self.prior_std)
        return super().adapt(episode), temperature

    def adapt_diagnostics(self, state) -> dict[str, float]:
        return {"temperature": state[1]}

    def predict(self, state, episode) -> Tensor:
        params, temperature = state
        return torch.softmax(option_logits(self.adapter, params, episode.query, self.likelihood) / temperature, -1)
