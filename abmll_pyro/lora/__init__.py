"""Bayesian LoRA layers: explicit perturbations in, no sampling or KL inside."""

from .adapter import FACTOR_KINDS, BayesLoRA
from .layer import BayesLoRALayer, LowRankDelta
from .positivity import AbsStd, LogStd, SoftplusStd, StdMap

__all__ = ["BayesLoRA", "BayesLoRALayer", "LowRankDelta", "StdMap", "SoftplusStd", "AbsStd", "LogStd", "FACTOR_KINDS"]
