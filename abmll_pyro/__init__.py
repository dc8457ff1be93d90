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
    "load_lm", "load_run", "load_tasks", "TaskSet", "Task", "Example", "split_task", "encode_options", "compute_metrics",
    "AdapterConfig", "InnerLoopConfig", "MetaConfig", "BayesLoRA",
    "HierarchicalModel", "HierarchicalPrior", "FixedPrior", "StudentTPrior", "TaskPrior",
    "OptionLikelihood", "TokenLikelihood", "TaskData",
    "ABMLLGuide", "TaskGuide", "MeanFieldGuide", "PointMassGuide",
    "MetaSVI", "Episode", "StepResult", "inner_loop", "kl_scale", "posterior_predictive",
]


def load_run(run_dir, support=None, seed=None, trust_plugins: bool = False):
    """A trained run directory, ready to predict: its config, the built method with the trained state, and,
    with ``support`` (a JSON-lines file of examples), the task's adapted state (``.state``; ``.built.method.predict`` takes it). A plug-in
    file the run's config names is refused unless ``trust_plugins`` (its code would run)."""
    from pathlib import Path

    from .train.generate_run import load_adapted

    return load_adapted(Path(run_dir), None if support is None else Path(support), seed, trust_plugins)


def __getattr__(name: str):
    """``load_lm`` on first use (it imports transformers, which ``import abmll_pyro`` does not need)."""
    if name == "load_lm":
        from .lms import load_lm

        return load_lm
    raise AttributeError(f"module 'abmll_pyro' has no attribute {name!r}")
