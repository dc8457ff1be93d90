"""ABMLL and its baselines behind one interface (:class:`Method`), built by name at the CLI boundary.

``METHODS`` maps each name to a builder ``(adapter, config, num_train_tasks) -> Method``; an unknown
name is an error listing the supported ones.
"""

from __future__ import annotations

from typing import Callable

from ..infer.meta import MetaSVI
from ..lora.adapter import BayesLoRA
from .abmll import ABMLL
from .base import LoRAFactors, Method, option_nll, option_probs
from .lora import RegularLoRA
from .parts import make_guide, make_prior
from .reptile import Reptile
from .structured import StructuredLoRA
from .zero_shot import InContext, Pretrained

__all__ = ["Method", "METHODS", "TRAINABLE", "build_method", "ABMLL", "RegularLoRA", "StructuredLoRA", "Reptile",
           "Pretrained", "InContext", "LoRAFactors", "option_nll", "option_probs", "make_prior", "make_guide"]


def _abmll(in_context: bool) -> Callable:
    def build(adapter: BayesLoRA, config, num_train_tasks: int) -> Method:
        svi = MetaSVI(adapter, config.meta_config(), prior=make_prior(config.prior, adapter),
                      task_guide=make_guide(config.guide, adapter),
                      num_tasks=max(num_train_tasks, 1))
        return ABMLL(svi, max(num_train_tasks, 1), config.num_samples, config.predict_mode, in_context=in_context)

    return build


METHODS: dict[str, Callable[[BayesLoRA, object, int], Method]] = {
    "pretrained": lambda adapter, config, n: Pretrained(adapter),
    "icl": lambda adapter, config, n: InContext(adapter),
    "lora": lambda adapter, config, n: RegularLoRA(adapter, config.inner_config(), config.outer_lr),
    "structured-lora": lambda adapter, config, n: StructuredLoRA(adapter, config.inner_config(), config.outer_lr),
    "reptile": lambda adapter, config, n: Reptile(adapter, config.inner_config(), config.reptile_step_size),
    "abmll": _abmll(in_context=False),
    "abmll-icl": _abmll(in_context=True),
}
TRAINABLE = ("lora", "structured-lora", "reptile", "abmll", "abmll-icl")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return name


def build_method(name: str, adapter: BayesLoRA, config, num_train_tasks: int) -> Method:
    return METHODS[check_method(name)](adapter, config, num_train_tasks)
