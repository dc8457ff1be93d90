"""abmll_pyro: Amortized Bayesian Meta-Learning for LoRA (ABMLL) in Pyro."""

from .config import AdapterConfig, InnerLoopConfig, MetaConfig
from .data import Example, Task, TaskSet, encode_options, load_tasks, split_task
from .eval import compute_metrics
from .guides import ABMLLGuide, MeanFieldGuide, PointMassGuide, TaskGuide
from .infer import Episode, MetaSVI, StepResult, inner_loop, kl_scale, posterior_predictive
from .lora import BayesLoRA
from .models import (FixedPrior, HierarchicalModel, HierarchicalPrior, OptionLikelihood, StudentTPrior, TaskData,
                     TaskPrior, TokenLikelihood)

__version__ = "0.1.0"

__all__ = [
    "load_lm", "load_tasks", "TaskSet", "Task", "Example", "split_task", "encode_options", "compute_metrics",
    "AdapterConfig", "InnerLoopConfig", "MetaConfig", "BayesLoRA",
    "HierarchicalModel", "HierarchicalPrior", "FixedPrior", "StudentTPrior", "TaskPrior",
    "OptionLikelihood", "TokenLikelihood", "TaskData",
    "ABMLLGuide", "TaskGuide", "MeanFieldGuide", "PointMassGuide",
    "MetaSVI", "Episode", "StepResult", "inner_loop", "kl_scale", "posterior_predictive",
]


def __getattr__(name: str):
    """``load_lm`` on first use (it imports transformers, which ``import abmll_pyro`` does not need)."""
    if name == "load_lm":
        from .lms import load_lm

        return load_lm
    raise AttributeError(f"module 'abmll_pyro' has no attribute {name!r}")
