"""One likelihood for option and token data: dispatch on the batch type (first match wins).

A run whose tasks are multiple choice encodes :class:`OptionBatch` es, a run whose tasks carry
generative targets encodes :class:`TokenBatch` es; the model sees one likelihood either way:

    OptionBatch  -> the option likelihood (gold option ~ Categorical over option scores)
    TokenBatch   -> :class:`TokenLikelihood` (each target token ~ Categorical over the vocabulary)

Anything else is an error naming the batch types supported.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..data.scoring import OptionBatch, TokenBatch
from .likelihoods import Likelihood, OptionLikelihood, TaskData, TokenLikelihood

__all__ = ["ByBatchLikelihood", "with_tokens"]


class ByBatchLikelihood(Likelihood):
    """``option`` for :class:`OptionBatch`, ``token`` for :class:`TokenBatch`; ``scores`` is the option
    likelihood's (mean-mode option prediction)."""

    def __init__(self, option: Likelihood | None = None, token: Likelihood | None = None):
        self.option = option or OptionLikelihood()
        self.token = token or TokenLikelihood()
        self.routes: list[tuple[type, Likelihood]] = [(OptionBatch, self.option), (TokenBatch, self.token)]

    def scores(self, lm: nn.Module, batch: OptionBatch) -> Tensor:
        return self.option.scores(lm, batch)

    def __call__(self, lm: nn.Module, task: TaskData, index: int) -> None:
        for kind, likelihood in self.routes:
            if isinstance(task.batch, kind):
                return likelihood(lm, task, index)
        raise TypeError(f"no likelihood for a {type(task.batch).__name__}; supported: "
                        f"{[k.__name__ for k, _ in self.routes]}")


def with_tokens(likelihood: Likelihood) -> Likelihood:
    """``likelihood`` extended to token batches (unchanged if it already dispatches)."""
    if isinstance(likelihood, ByBatchLikelihood):
        return likelihood
    return ByBatchLikelihood(option=likelihood)
