"""ABMLL: the core's :class:`~abmll_pyro.infer.MetaSVI` behind the method interface.

Training is ``MetaSVI.loss_and_grads`` (inner loop on the support β-ELBO, outer β-ELBO on the query,
γ·log p(θ)); the harness owns clipping, accumulation and the optimizer step; test time is ``MetaSVI.adapt`` on the support set and the
posterior predictive on the query (``num_samples`` draws of φ, or the mean of q). With
``in_context=True`` (method ``abmll-icl``) the episodes' prompts carry the support examples while
adapting and predicting (docs/method.md; the paper's v3).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..infer.meta import Episode, MetaSVI
from ..infer.predictive import posterior_predictive, predictive_samples
from ..models.likelihoods import TaskData
from .base import Backward, Method

__all__ = ["ABMLL"]


class ABMLL(Method):
    name = "abmll"
    trainable = True

    def __init__(self, svi: MetaSVI, num_train_tasks: int, num_samples: int, predict_mode: str, in_context: bool = False):
        self.svi, self.num_train_tasks = svi, num_train_tasks
        self.num_samples, self.predict_mode = num_samples, predict_mode
        self.in_context = in_context
        self.name = "abmll-icl" if in_context else "abmll"

    def parameters(self):
        return self.svi.trainable_parameters()

    def make_optimizer(self):
        return self.svi.optimizer

    def train_step(self, episodes: Sequence, backward: Backward) -> dict[str, float]:
        core = [Episode(ep.name, TaskData(ep.support), TaskData(ep.query)) for ep in episodes]
        r = self.svi.loss_and_grads(core, num_tasks=self.num_train_tasks, backward=backward)
        # nll: per query example, as every method logs it; query_nll_sum: the loss's term (loss = it + β·task_kl − ...)
        parts = {"loss": r.loss, "nll": r.nll_per_example, "query_nll_sum": r.nll, "task_kl": r.task_kl,
                 "log_p_theta": r.log_p_theta}
        # the posterior's scale in metrics.jsonl: mean σ of θ's prior and of the tasks' q
        parts.update({k: v for k, v in (("sigma_theta", r.sigma_theta), ("sigma_q", r.sigma_q),
                                        ("subspace_kl", r.subspace_kl), ("subspace_scale", r.subspace_scale))
                      if v is not None})
        return parts

    def adapt(self, episode):
        return self.svi.adapt(TaskData(episode.support))

    def predict(self, state, episode) -> Tensor:
        return posterior_predictive(self.svi, state, TaskData(episode.query), self.num_samples, self.predict_mode)

    def predict_samples(self, state, episode) -> Tensor:
        """``[S, n, max_options]`` float64: each posterior sample's probabilities (their mean is
        :meth:`predict`'s output under the same seed); for the uncertainty split."""
        return predictive_samples(self.svi, state, TaskData(episode.query), self.num_samples, self.predict_mode)

    def state_tensors(self):
        out = {f"theta/{k}": v.detach() for k, v in self.svi.adapter.global_params().items()}
        guide = self.svi.guide.task_guide
        if hasattr(guide, "state_dict"):
            out.update({f"guide/{k}": v.detach() for k, v in guide.state_dict().items()})
        if self.svi.subspace is not None:
            out.update({f"subspace/{k}": v.detach() for k, v in self.svi.subspace.state_dict().items()})
        return out

    def load_state_tensors(self, tensors):
        with torch.no_grad():
            for k, p in self.svi.adapter.global_params().items():
                p.copy_(tensors[f"theta/{k}"])
        guide = self.svi.guide.task_guide
        if hasattr(guide, "load_state_dict"):
            guide.load_state_dict({k[len("guide/"):]: v for k, v in tensors.items() if k.startswith("guide/")})
        if self.svi.subspace is not None:
            self.svi.subspace.load_state_dict({k[len("subspace/"):]: v for k, v in tensors.items()
                                               if k.startswith("subspace/")})
