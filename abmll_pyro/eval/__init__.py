"""Evaluation: per-task metrics (accuracy, ECE, NLL, Brier), reliability data and plots."""

from abmll_pyro.eval.metrics import (
    ReliabilityDiagram,
    TaskMetrics,
    accuracy,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    macro_average,
    negative_log_likelihood,
    reliability_diagram,
)
from abmll_pyro.eval.plots import plot_metric_curve, plot_reliability, plot_reliability_overlay

__all__ = [
    "ReliabilityDiagram",
    "TaskMetrics",
    "accuracy",
    "brier_score",
    "compute_metrics",
    "expected_calibration_error",
    "macro_average",
    "negative_log_likelihood",
    "plot_metric_curve",
    "plot_reliability",
    "plot_reliability_overlay",
    "reliability_diagram",
]
