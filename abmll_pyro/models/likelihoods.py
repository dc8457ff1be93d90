"""Likelihoods p(D_i | φ_i): how one task's data is observed under the LM with W0 + ΔW_i.

Interface (:class:`Likelihood`): ``__call__(lm, task, index)`` emits task ``index``'s observation
site inside a data plate (with subsampling and N/n scaling from ``pyro.plate``). The adapters are
already set by the model when it is called.

* :class:`OptionLikelihood` — multiple choice, MetaICL "direct": the gold option is a Categorical
  draw over option scores (each option's log-likelihood under the LM); also records the option
  probabilities as a deterministic site for the posterior predictive.
* :class:`TokenLikelihood` — generative data: each target token is a Categorical over the vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from .. import sites
from ..data.scoring import OptionBatch, TokenBatch, check_reduction, option_scores, token_log_probs

__all__ = ["TaskData", "Likelihood", "OptionLikelihood", "TokenLikelihood"]


@dataclass(frozen=True)
class TaskData:
    """One task's encoded examples as the model sees them.

    ``subsample_size``: examples per evaluation (the data plate subsamples and scales by N/n);
    ``observed``: False to leave the labels out (prediction), so the likelihood samples them.
    """

    batch: OptionBatch | TokenBatch
    subsample_size: int | None = None
    observed: bool = True

    def __post_init__(self) -> None:
        if len(self.batch) == 0:
            raise ValueError("a task's data must hold at least one example")
        if self.subsample_size is not None and self.subsample_size < 1:
            raise ValueError(f"subsample_size must be >= 1 or None, got {self.subsample_size!r}")


class Likelihood:
    """Base class; see the module docstring."""

    def __call__(self, lm: nn.Module, task: TaskData, index: int) -> None:
        raise NotImplementedError


@contextmanager
def data_plate(task: TaskData, index: int) -> Iterator[OptionBatch | TokenBatch]:
    """Task ``index``'s data plate: yields the (sub)batch observed inside it. With ``subsample_size``
    the plate draws that many examples and scales their log-likelihood by N/n."""
    data = task.batch
    with pyro.plate(sites.data(index), len(data), subsample_size=task.subsample_size) as idx:
        yield data if task.subsample_size is None else data.select(idx.cpu())


def _chunks(n: int, size: int | None) -> list[Tensor]:
    idx = torch.arange(n)
    return [idx] if size is None or size >= n else list(idx.split(size))


class OptionLikelihood(Likelihood):
    """gold_j ~ Categorical(softmax(score_j1, ..., score_jK)), score = option log-likelihood.

    ``reduction``: how token log-probs become an option's score — ``"char"`` per character of the
    option's text (the default, as the run config's ``score_reduction`` and the CLI: lm-eval's
    ``acc_norm``), ``"sum"`` or ``"mean"`` per token (MetaICL); see
    :data:`~abmll_pyro.data.scoring.SCORE_REDUCTIONS`. ``char`` reads each option's length from the
    batch's ``option_chars``, which :func:`~abmll_pyro.data.encoding.encode_options` fills; a batch built
    from token ids (:meth:`~abmll_pyro.data.scoring.OptionBatch.from_token_ids`) has no text, so give it
    ``option_chars=`` or choose ``"sum"`` (a batch without them is a ``ValueError`` saying so).
    ``chunk_size``: at most this many examples per LM call (memory), results concatenated.
    """

    def __init__(self, reduction: str = "char", chunk_size: int | None = None):
        check_reduction(reduction)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
        self.reduction, self.chunk_size = reduction, chunk_size

    def scores(self, lm: nn.Module, batch: OptionBatch) -> Tensor:
        """``[n, max_options]`` float32 option scores (-inf in padded slots)."""
        parts = [option_scores(lm, batch.select(c) if len(c) < len(batch) else batch, self.reduction)
                 for c in _chunks(len(batch), self.chunk_size)]
        if len(parts) == 1:
            return parts[0]
        width = max(p.shape[-1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=float("-inf")) for p in parts]
        return torch.cat(parts)

    def __call__(self, lm: nn.Module, task: TaskData, index: int) -> None:
        if not isinstance(task.batch, OptionBatch):
            raise TypeError(f"OptionLikelihood needs an OptionBatch, got {type(task.batch).__name__}")
        with data_plate(task, index) as batch:
            scores = self.scores(lm, batch)
            pyro.deterministic(sites.probs(index), torch.softmax(scores, -1), event_dim=1)
            gold = batch.gold.to(scores.device) if task.observed else None
            pyro.sample(sites.obs(index), dist.Categorical(logits=scores), obs=gold)


class TokenLikelihood(Likelihood):
    """token_t ~ Categorical(softmax(logits_t)) for every target token (mask from the batch)."""

    def __call__(self, lm: nn.Module, task: TaskData, index: int) -> None:
        if not isinstance(task.batch, TokenBatch):
            raise TypeError(f"TokenLikelihood needs a TokenBatch, got {type(task.batch).__name__}")
        with data_plate(task, index) as batch:
            logits, targets, mask = token_log_probs(lm, batch)
            obs = targets if task.observed else None
            pyro.sample(sites.obs(index), dist.Categorical(logits=logits).mask(mask).to_event(1), obs=obs)
