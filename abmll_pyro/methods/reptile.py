"""Reptile on the LoRA factors (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning
Algorithms", Algorithm 2, batched version).

For a batch of tasks τ_1..τ_b: φ_i = U^K_τi(θ) (K steps of the inner optimizer on the task's
cross-entropy over all its training examples, support ∪ query), then

    θ ← θ + ε · (1/b) Σ_i (φ_i − θ).

The update is applied through the optimizer as the "gradient" g = θ − mean_i φ_i with plain SGD at
learning rate ε (``reptile_step_size``), so it checkpoints and accumulates like every other method.
Test time: K steps from θ on the support set (the same budget as every adapting method).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch
from ..infer.inner import inner_loop
from ..lora.adapter import BayesLoRA
from .base import Backward, LoRAFactors, Method, option_nll, option_probs
from .lora import finetune

__all__ = ["Reptile"]


class Reptile(Method):
    name = "reptile"
    trainable = True

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, step_size: float):
        self.adapter, self.inner, self.step_size = adapter, inner, step_size
        self.lora = LoRAFactors(adapter)

    def parameters(self):
        return list(self.lora.parameters())

    def make_optimizer(self):
        return torch.optim.SGD(self.parameters(), lr=self.step_size)

    def _task_loss(self, support: OptionBatch, query: OptionBatch, seen: list[float]):
        """The task's cross-entropy over support ∪ query; records each value in ``seen`` (for logging,
        so no extra forward pass is spent on it)."""
        n = len(support) + len(query)

        def loss_fn(p: dict[str, Tensor]) -> Tensor:
            loss = (option_nll(self.adapter, p, support, self.likelihood) * len(support)
                    + option_nll(self.adapter, p, query, self.likelihood) * len(query)) / n
            seen.append(float(loss.detach()))
            return loss

        return loss_fn

    def train_step(self, episodes: Sequence, backward: Backward) -> dict[str, float]:
        theta = self.lora.params()
        b = len(episodes)
        shift = {k: torch.zeros_like(v) for k, v in theta.items()}
        first_loss = last_loss = 0.0
        for ep in episodes:
            seen: list[float] = []
            phi = inner_loop(self._task_loss(ep.support, ep.query, seen), theta, self.inner.num_inner_steps,
                             self.inner.inner_lr, self.inner.optimizer, adam_eps=self.inner.adam_eps)
            with torch.no_grad():
                for k in shift:
                    shift[k] += (phi[k].detach() - theta[k].detach()) / b
            if seen:  # the loss at θ (first inner step) and before the last inner step
                first_loss, last_loss = first_loss + seen[0] / b, last_loss + seen[-1] / b
        # d/dθ of Σ_k <θ_k, −shift_k> is −shift: one SGD step at lr ε gives θ + ε·shift
        surrogate = sum((theta[k] * (-shift[k])).sum() for k in theta)
        backward(surrogate)
        return {"loss": first_loss, "nll": first_loss, "nll_last_inner": last_loss,
                "meta_shift_norm": float(torch.sqrt(sum((s * s).sum() for s in shift.values())))}

    def adapt(self, episode) -> dict[str, Tensor]:
        return finetune(self.adapter, self.lora.params(), episode.support, self.inner, self.likelihood)

    def predict(self, state, episode) -> Tensor:
        return option_probs(self.adapter, state, episode.query, self.likelihood)

    def state_tensors(self):
        return self.lora.state_tensors()

    def load_state_tensors(self, tensors):
        self.lora.load_state_tensors(tensors)
