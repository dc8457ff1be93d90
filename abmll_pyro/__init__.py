"""abmll_pyro: Amortized Bayesian Meta-Learning for LoRA (ABMLL) in Pyro."""

from .config import AdapterConfig, InnerLoopConfig, MetaConfig
from .guides import ABMLLGuide, MeanFieldGuide, PointMassGuide, TaskGuide
from .infer import Episode, MetaSVI, StepResult, inner_loop, kl_scale, posterior_predictive
from .lora import BayesLoRA
from .models import (FixedPrior, HierarchicalModel, HierarchicalPrior, OptionLikelihood, StudentTPrior, TaskData,
                     TaskPrior, TokenLikelihood)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "InnerLoopConfig", "MetaConfig", "BayesLoRA",
    "HierarchicalModel", "HierarchicalPrior", "FixedPrior", "StudentTPrior", "TaskPrior",
    "OptionLikelihood", "TokenLikelihood", "TaskData",
    "ABMLLGuide", "TaskGuide", "MeanFieldGuide", "PointMassGuide",
    "MetaSVI", "Episode", "StepResult", "inner_loop", "kl_scale", "posterior_predictive",
]
