"""Structured LoRA: a global adapter plus a per-task adapter, deterministic (no variances, no KL).

ABMLL's global/task structure without its Bayesian parts (docs/method.md). Per adapted module,

    ΔW_i = (α/r)·(B_g A_g + B_i A_i),

with the global pair (A_g, B_g) shared by all tasks and the task pair (A_i, B_i) started at a
meta-learned initialization (A_0, B_0; B_0 = 0 at first). Per episode: K inner steps on the support
cross-entropy move only the task pair (global fixed); the query cross-entropy under the refined task
pair then trains the global pair exactly and the task initialization first-order (FOMAML
pass-through, d(A_i, B_i)/d(A_0, B_0) ≈ I). Test time: the same K steps on the support set.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch, TokenBatch
from ..infer.inner import inner_loop, pass_through
from ..lora.adapter import BayesLoRA
from ..lora.layer import LowRankDelta
from .base import Backward, LoRAFactors, Method
from .tokens import token_nll

__all__ = ["StructuredLoRA"]


class StructuredLoRA(Method):
    name = "structured-lora"
    trainable = True

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float):
        self.adapter, self.inner, self.outer_lr = adapter, inner, outer_lr
        self.shared = LoRAFactors(adapter, prefix="global/")
        self.task_init = LoRAFactors(adapter, prefix="task_init/")

    def parameters(self):
        return list(self.shared.parameters()) + list(self.task_init.parameters())

    def make_optimizer(self):
        return torch.optim.Adam(self.parameters(), lr=self.outer_lr)

    def _deltas(self, shared: Mapping[str, Tensor], task: Mapping[str, Tensor]) -> dict[str, LowRankDelta]:
        """The sum of two rank-r deltas as one rank-2r delta: [B_g, B_i] @ [A_g; A_i]."""
        g, t = self.adapter.mean_deltas(shared), self.adapter.mean_deltas(task)
        return {m: LowRankDelta(torch.cat([g[m].A, t[m].A], 0), torch.cat([g[m].B, t[m].B], 1), g[m].scaling) for m in g}

    def _nll(self, shared, task, batch: OptionBatch) -> Tensor:
        if isinstance(batch, TokenBatch):  # generative tasks: per-token NLL of the targets
            return token_nll(self.adapter, self._deltas(shared, task), batch)
        with self.adapter.use(self._deltas(shared, task)):
            scores = self.likelihood.scores(self.adapter.lm, batch)
        logp = torch.log_softmax(scores.float(), -1)
        return -logp.gather(1, batch.gold.to(logp.device)[:, None]).mean()

    def _refine(self, shared, start, support: OptionBatch) -> dict[str, Tensor]:
        fixed = {k: v.detach() for k, v in shared.items()}
        return inner_loop(lambda p: self._nll(fixed, p, support), start, self.inner.num_inner_steps,
                          self.inner.inner_lr, self.inner.optimizer, adam_eps=self.inner.adam_eps)

    def train_step(self, episodes: Sequence, backward: Backward) -> dict[str, float]:
        shared, start = self.shared.params(), self.task_init.params()
        total = 0.0
        for ep in episodes:
            refined = self._refine(shared, start, ep.support)
            loss = self._nll(shared, pass_through(refined, start), ep.query) / len(episodes)
            backward(loss)
            total += float(loss.detach())
        return {"loss": total, "nll": total}

    def adapt(self, episode) -> dict[str, Tensor]:
        refined = self._refine(self.shared.params(), self.task_init.params(), episode.support)
        return {k: v.detach() for k, v in refined.items()}

    @torch.no_grad()
    def predict(self, state, episode) -> Tensor:
        with self.adapter.use(self._deltas(self.shared.params(), state)):
            return torch.softmax(self.likelihood.scores(self.adapter.lm, episode.query), -1)

    def state_tensors(self):
        return {**self.shared.state_tensors(), **self.task_init.state_tensors()}

    def load_state_tensors(self, tensors):
        self.shared.load_state_tensors(tensors)
        self.task_init.load_state_tensors(tensors)
