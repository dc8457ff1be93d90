"""LoRA with Monte Carlo dropout (``mc-dropout-lora``): Gal & Ghahramani (2016), "Dropout as a Bayesian
approximation", on the adapted path as PEFT's ``lora_dropout`` places it (and bayesian-peft's MC-dropout
baseline uses it).

Per adapted module the input of the LoRA path only is dropped, elementwise with probability p
(``mc_dropout_rate``), kept elements scaled by 1/(1 − p); the frozen path never is:

    y = W0 x + (α/r) · B A (m ⊙ x) / (1 − p),     m ~ Bernoulli(1 − p) per element, fresh every pass.

Training: Regular LoRA's pooled cross-entropy with dropout on (a training of its own: ``lora``'s
checkpoint was trained without it). Test time: the same K inner steps on the support set, dropout on.
Prediction keeps dropout on and averages S = ``num_samples`` passes, each with fresh masks:

    p(y | x) ≈ (1/S) Σ_s softmax(score(x; W0, A, B, m_s)),

and the S passes' probabilities are the samples of the uncertainty split (epistemic = their mutual
information). Masks come from torch's generator, which the harness seeds per task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch, TokenBatch
from ..infer.inner import inner_loop
from ..lora.adapter import BayesLoRA
from ..lora.layer import LowRankDelta
from .lora import RegularLoRA
from .tokens import token_nll

__all__ = ["MCDropoutLoRA", "DropoutState"]


@dataclass(frozen=True)
class DropoutState:
    """A task's fine-tuned LoRA factors, to be used with dropout on (not a plain LoRA's state)."""

    params: dict[str, Tensor]


class MCDropoutLoRA(RegularLoRA):
    name = "mc-dropout-lora"

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float, rate: float, num_samples: int):
        if not 0 < rate < 1:
            raise ValueError(f"mc_dropout_rate must be in (0, 1), got {rate!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        super().__init__(adapter, inner, outer_lr)
        self.rate, self.num_samples = rate, num_samples

    def deltas(self, params: dict[str, Tensor]) -> dict[str, LowRankDelta]:
        """The LoRA ``params`` with dropout p on every adapted path."""
        return {m: replace(d, dropout=self.rate) for m, d in self.adapter.mean_deltas(params).items()}

    def scores(self, params: dict[str, Tensor], batch: OptionBatch) -> Tensor:
        """``[n, max_options]`` option scores of one dropout pass (fresh masks)."""
        with self.adapter.use(self.deltas(params)):
            return self.likelihood.scores(self.adapter.lm, batch)

    def loss(self, params: dict[str, Tensor], batch: OptionBatch) -> Tensor:
        """Mean cross-entropy of one dropout pass (per-token NLL for a :class:`TokenBatch`)."""
        if isinstance(batch, TokenBatch):
            return token_nll(self.adapter, self.deltas(params), batch)
        logp = torch.log_softmax(self.scores(params, batch).float(), -1)
        return -logp.gather(1, batch.gold.to(logp.device)[:, None]).mean()

    def adapt(self, episode) -> DropoutState:
        inner = self.inner
        refined = inner_loop(lambda p: self.loss(p, episode.support), self.lora.params(), inner.num_inner_steps,
                             inner.inner_lr, inner.optimizer, adam_eps=inner.adam_eps)
        return DropoutState({k: v.detach() for k, v in refined.items()})

    @torch.no_grad()
    def predict_samples(self, state: DropoutState, episode) -> Tensor:
        """``[S, n, max_options]`` float64: each dropout pass's option probabilities."""
        return torch.stack([torch.softmax(self.scores(state.params, episode.query).double(), -1)
                            for _ in range(self.num_samples)])

    def predict(self, state: DropoutState, episode) -> Tensor:
        return self.predict_samples(state, episode).mean(0).float()
