"""Inference: the KL-scale handler, the inner loop, meta-SVI and the posterior predictive."""

from .handlers import KLScaleMessenger, kl_scale
from .inner import NonFiniteLossError, inner_loop, pass_through
from .meta import Episode, MetaSVI, StepResult
from .objective import global_loss, log_hyperprior, task_kl, task_loss
from .predictive import UncertaintySplit, posterior_predictive, predictive_samples, uncertainty_split

__all__ = [
    "KLScaleMessenger", "kl_scale", "NonFiniteLossError", "inner_loop", "pass_through",
    "Episode", "MetaSVI", "StepResult", "global_loss", "log_hyperprior", "task_kl", "task_loss",
    "posterior_predictive", "predictive_samples", "uncertainty_split", "UncertaintySplit",
]
