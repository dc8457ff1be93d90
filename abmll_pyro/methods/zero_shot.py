"""Methods without training: the pretrained model as is, and in-context learning.

* :class:`Pretrained` — no adaptation: the query options are scored by the base LM (adapters off).
* :class:`InContext` — the k support examples are the prompt's demonstrations (MetaICL "direct"):
  the harness hands it episodes encoded with ``in_context=True``; the weights are never changed.
"""

from __future__ import annotations

from torch import Tensor

from ..lora.adapter import BayesLoRA
from .base import Method, option_probs

__all__ = ["Pretrained", "InContext"]


class Pretrained(Method):
    name = "pretrained"

    def __init__(self, adapter: BayesLoRA):
        self.adapter = adapter

    def adapt(self, episode) -> None:
        return None

    def predict(self, state, episode) -> Tensor:
        return option_probs(self.adapter, None, episode.query, self.likelihood)


class InContext(Pretrained):
    name = "icl"
    in_context = True
