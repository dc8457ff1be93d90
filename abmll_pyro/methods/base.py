"""The one interface every method (ABMLL and each baseline) implements, and what they share.

A :class:`Method` has three verbs (learn2learn's vocabulary):

* ``train_step(episodes) -> dict`` — one meta-training micro-step on a batch of training episodes:
  compute the method's own loss, back-propagate through ``backward`` (the accelerator's), and return
  the logged loss components (floats). The harness owns the optimizer step, accumulation and clipping.
  The harness calls it with one episode at a time and a ``backward`` that weighs the episode in
  the global batch (see :meth:`Method.episode_weight` and :mod:`abmll_pyro.train.distributed`).
* ``adapt(episode) -> state`` — a test task's adapted state, from its support set only.
* ``predict(state, episode) -> probs`` — ``[n, max_options]`` option probabilities of the query set.

``trainable`` methods also expose ``parameters()`` (what the optimizer updates) and
``state_tensors()`` / ``load_state_tensors()`` (what a checkpoint stores as safetensors).
``in_context`` methods get episodes whose prompts carry the support set (see
:mod:`abmll_pyro.train.episodes`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..data.scoring import OptionBatch, TokenBatch
from ..lora.adapter import BayesLoRA
from ..models.likelihoods import OptionLikelihood

__all__ = ["Method", "LoRAFactors", "option_logits", "option_nll", "option_probs"]

Params = Mapping[str, Tensor]
Backward = Callable[[Tensor], None]


_SUM = OptionLikelihood("sum")


class Method:
    """Base class; see the module docstring for the contract."""

    name: str = "method"
    trainable: bool = False
    in_context: bool = False
    #: how option scores are reduced (the run's ``score_reduction``); builders set it for every method
    likelihood: OptionLikelihood = _SUM

    def parameters(self) -> list[nn.Parameter]:
        return []

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        return None

    def train_step(self, episodes: Sequence[Any], backward: Backward) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} has no training")

    def episode_weight(self, split: Any) -> float:
        """Episode ``split``'s weight ω in a batch's loss; the harness scales the episode's
        ``train_step`` loss by ω / Σ ω over the global batch (default 1: every task weighs the same)."""
        return 1.0

    def adapt(self, episode: Any) -> Any:
        raise NotImplementedError

    def predict(self, state: Any, episode: Any) -> Tensor:
        raise NotImplementedError

    def adapt_diagnostics(self, state: Any) -> dict[str, float]:
        """Scalars describing one task's adaptation (``state`` from :meth:`adapt`), written to
        results.json's ``per_task[t]`` beside the metrics, e.g. ``lora-ts``'s fitted ``temperature``.
        Default: none."""
        return {}

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        if tensors:
            raise ValueError(f"{self.name} has no trainable state, got tensors {sorted(tensors)[:5]}")


def option_logits(adapter: BayesLoRA, params: Params | None, batch: OptionBatch,
                  likelihood: OptionLikelihood | None = None) -> Tensor:
    """Option scores ``[n, max_options]`` (the softmax's logits) under the mean-mode LoRA ``params``
    (None: the base model), reduced by ``likelihood`` (default: summed token log-probs)."""
    deltas = adapter.mean_deltas(params) if params is not None else {m: None for m in adapter.module_names}
    with adapter.use(deltas):
        return (likelihood or _SUM).scores(adapter.lm, batch)


def option_probs(adapter: BayesLoRA, params: Params | None, batch: OptionBatch,
                 likelihood: OptionLikelihood | None = None) -> Tensor:
    """Softmax over option scores under the mean-mode LoRA ``params`` (None: the base model)."""
    return torch.softmax(option_logits(adapter, params, batch, likelihood), -1)


def option_nll(adapter: BayesLoRA, params: Params, batch: OptionBatch,
               likelihood: OptionLikelihood | None = None) -> Tensor:
    """Mean −log p(gold | x) of a plain (deterministic) LoRA: the cross-entropy over options (for a
    :class:`TokenBatch`, the per-token NLL of its targets: :func:`~abmll_pyro.methods.tokens.token_nll`)."""
    if isinstance(batch, TokenBatch):
        from .tokens import token_nll

        return token_nll(adapter, adapter.mean_deltas(params), batch)
    logp = torch.log_softmax(option_logits(adapter, params, batch, likelihood).float(), -1)
    gold = batch.gold.to(logp.device)
    return -logp.gather(1, gold[:, None]).mean()


class LoRAFactors(nn.Module):
    """A plain LoRA (A: ``[r, in]``, B: ``[out, r]`` per module, ΔW = (α/r)·B A), keyed like BayesLoRA's
    mean pair so :meth:`BayesLoRA.mean_deltas` runs its forward. Starts at the adapter's own
    initialization (A Kaiming-uniform, B = 0)."""

    def __init__(self, adapter: BayesLoRA, prefix: str = ""):
        super().__init__()
        self.factors = nn.ParameterDict()
        self.prefix = prefix
        for key, value in adapter.global_params().items():
            if key.endswith(":mu_A") or key.endswith(":mu_B"):
                self.factors[key] = nn.Parameter(value.detach().clone())

    def params(self) -> dict[str, Tensor]:
        return dict(self.factors.items())

    def state_tensors(self) -> dict[str, Tensor]:
        return {self.prefix + k: v.detach() for k, v in self.factors.items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.factors.items():
                p.copy_(tensors[self.prefix + k])
