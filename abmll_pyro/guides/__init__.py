"""Guides: the θ point estimate and the task guides q(φ_i)."""

from .base import ABMLLGuide, TaskGuide
from .amortized import AmortizedGuide
from .mean_field import MeanFieldGuide, PointMassGuide
from .low_rank import LowRankPrecisionGuide, LowRankPrecisionNormal

__all__ = ["ABMLLGuide", "TaskGuide", "MeanFieldGuide", "PointMassGuide", "AmortizedGuide", "LowRankPrecisionGuide",
           "LowRankPrecisionNormal"]
