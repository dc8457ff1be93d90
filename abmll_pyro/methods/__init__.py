"""ABMLL and its baselines behind one interface (:class:`Method`), built by name at the CLI boundary.

``METHODS`` maps each name to a builder ``(adapter, config, num_train_tasks) -> Method``; an unknown
name is an error listing the supported ones.
"""

from __future__ import annotations

from typing import Callable

from ..infer.meta import MetaSVI
from ..lora.adapter import BayesLoRA
from ..models.likelihoods import OptionLikelihood
from ..models.subspace import TaskSubspace
from .abmll import ABMLL
from .base import LoRAFactors, Method, option_logits, option_nll, option_probs
from .bayes_lora import PerTaskBayesLoRA
from .blob import BLoB
from .ensemble_lora import EnsembleLoRA
from .laplace_lora import LaplaceLoRA
from .lora import RegularLoRA
from .mc_dropout_lora import MCDropoutLoRA
from .parts import make_guide, make_prior
from .reptile import Reptile
from .structured import StructuredLoRA
from .temperature import TemperatureScaledLoRA
from .zero_shot import InContext, Pretrained

__all__ = ["Method", "METHODS", "TRAINABLE", "SAME_TRAINING", "build_method", "ABMLL", "RegularLoRA",
           "TemperatureScaledLoRA", "StructuredLoRA", "Reptile", "PerTaskBayesLoRA", "Pretrained", "InContext",
           "LaplaceLoRA", "BLoB", "EnsembleLoRA", "MCDropoutLoRA",
           "LoRAFactors", "option_logits", "option_nll", "option_probs", "make_prior", "make_guide"]


def _svi(adapter: BayesLoRA, config, num_train_tasks: int, subspace: bool = False) -> MetaSVI:
    dim = getattr(config, "subspace_dim", 0)
    return MetaSVI(adapter, config.meta_config(), prior=make_prior(config.prior, adapter),
                   task_guide=make_guide(config.guide, adapter), likelihood=OptionLikelihood(config.score_reduction),
                   num_tasks=max(num_train_tasks, 1),
                   subspace=TaskSubspace(adapter, dim, config.subspace_scale, config.subspace_init)
                   if subspace and dim else None)


def _abmll(in_context: bool) -> Callable:
    def build(adapter: BayesLoRA, config, num_train_tasks: int) -> Method:
        svi = _svi(adapter, config, num_train_tasks, subspace=True)
        return ABMLL(svi, max(num_train_tasks, 1), config.num_samples, config.predict_mode, in_context=in_context)

    return build


def _bayes_lora(adapter: BayesLoRA, config, num_train_tasks: int) -> Method:
    svi = _svi(adapter, config, num_train_tasks)
    return PerTaskBayesLoRA(svi, max(num_train_tasks, 1), config.num_samples, config.predict_mode)


METHODS: dict[str, Callable[[BayesLoRA, object, int], Method]] = {
    "pretrained": lambda adapter, config, n: Pretrained(adapter),
    "icl": lambda adapter, config, n: InContext(adapter),
    "lora": lambda adapter, config, n: RegularLoRA(adapter, config.inner_config(), config.outer_lr),
    "lora-ts": lambda adapter, config, n: TemperatureScaledLoRA(adapter, config.inner_config(), config.outer_lr,
                                                               config.ts_prior_std),
    "structured-lora": lambda adapter, config, n: StructuredLoRA(adapter, config.inner_config(), config.outer_lr),
    "reptile": lambda adapter, config, n: Reptile(adapter, config.inner_config(), config.reptile_step_size),
    "abmll": _abmll(in_context=False),
    "abmll-icl": _abmll(in_context=True),
    "bayes-lora": _bayes_lora,
    # the Bayesian-LoRA peers: per-task methods from Regular LoRA's start (mc-dropout-lora trains its own)
    "laplace-lora": lambda adapter, config, n: LaplaceLoRA(adapter, config.inner_config(), config.outer_lr,
                                                           config.laplace_logit_samples),
    "blob": lambda adapter, config, n: BLoB(adapter, config.inner_config(), config.outer_lr, config.blob_prior_std,
                                            config.blob_init_eps, config.num_samples),
    "ensemble-lora": lambda adapter, config, n: EnsembleLoRA(adapter, config.inner_config(), config.outer_lr,
                                                             config.ensemble_size),
    "mc-dropout-lora": lambda adapter, config, n: MCDropoutLoRA(adapter, config.inner_config(), config.outer_lr,
                                                                config.mc_dropout_rate, config.num_samples),
}
TRAINABLE = ("lora", "lora-ts", "structured-lora", "reptile", "abmll", "abmll-icl", "laplace-lora", "blob",
             "ensemble-lora", "mc-dropout-lora")
#: methods whose training is another method's, exactly (same parameters, loss and draws): a benchmark
#: evaluates them from that method's checkpoint instead of training twice
SAME_TRAINING = {"lora-ts": "lora", "laplace-lora": "lora", "blob": "lora", "ensemble-lora": "lora"}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return name


def build_method(name: str, adapter: BayesLoRA, config, num_train_tasks: int) -> Method:
    """The method ``name``, scoring options with the config's ``score_reduction``."""
    method = METHODS[check_method(name)](adapter, config, num_train_tasks)
    method.likelihood = OptionLikelihood(config.score_reduction)
    return method
