"""Regular LoRA: one LoRA trained on the training tasks pooled, then fine-tuned per test task.

Training minimizes the pooled cross-entropy over options,

    L(A, B) = −(1/|D|) Σ_{(x, y) ∈ D} log softmax_y(score(x; W0 + (α/r) B A)),

on each step's episodes' support ∪ query examples pooled (the task identity is ignored: no meta-
learning). At test time the trained factors are copied and fine-tuned on the task's support set with
the same inner-loop budget as every adapting method (``num_inner_steps`` at ``inner_lr``, the core's
pure :func:`~abmll_pyro.infer.inner_loop`), then the query is scored with the fine-tuned factors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch
from ..infer.inner import inner_loop
from ..lora.adapter import BayesLoRA
from ..models.likelihoods import OptionLikelihood
from .base import Backward, LoRAFactors, Method, option_nll, option_probs

__all__ = ["RegularLoRA", "finetune"]


def finetune(adapter: BayesLoRA, start: dict[str, Tensor], support: OptionBatch, inner: InnerLoopConfig,
             likelihood: OptionLikelihood | None = None) -> dict[str, Tensor]:
    """``inner.num_inner_steps`` steps of the inner optimizer on the support cross-entropy (detached)."""
    refined = inner_loop(lambda p: option_nll(adapter, p, support, likelihood), start, inner.num_inner_steps,
                         inner.inner_lr, inner.optimizer, adam_eps=inner.adam_eps)
    return {k: v.detach() for k, v in refined.items()}


class RegularLoRA(Method):
    name = "lora"
    trainable = True

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float):
        self.adapter, self.inner, self.outer_lr = adapter, inner, outer_lr
        self.lora = LoRAFactors(adapter)

    def parameters(self):
        return list(self.lora.parameters())

    def make_optimizer(self):
        return torch.optim.Adam(self.parameters(), lr=self.outer_lr)

    def train_step(self, episodes: Sequence, backward: Backward) -> dict[str, float]:
        # pool: every example of every episode weighs the same (one cross-entropy per example)
        sizes = [len(ep.support) + len(ep.query) for ep in episodes]
        total, nll = sum(sizes), 0.0
        for ep in episodes:
            for batch in (ep.support, ep.query):
                loss = self.loss(self.lora.params(), batch) * (len(batch) / total)
                backward(loss)
                nll += float(loss.detach())
        return {"loss": nll, "nll": nll}

    def loss(self, params: dict[str, Tensor], batch: OptionBatch) -> Tensor:
        """The mean cross-entropy of ``batch`` under the LoRA ``params`` (what training minimizes)."""
        return option_nll(self.adapter, params, batch, self.likelihood)

    def episode_weight(self, split) -> float:
        """Its example count: one-episode steps weighted by it pool the batch's examples as above."""
        return float(len(split.support) + len(split.query))

    def adapt(self, episode) -> dict[str, Tensor]:
        return finetune(self.adapter, self.lora.params(), episode.support, self.inner, self.likelihood)

    def predict(self, state, episode) -> Tensor:
        return option_probs(self.adapter, state, episode.query, self.likelihood)

    def state_tensors(self):
        return self.lora.state_tensors()

    def load_state_tensors(self, tensors):
        self.lora.load_state_tensors(tensors)
