"""The ``results.json`` schema (documented in docs/cli.md) and its validator.

One run's result is a JSON object::

    {"schema_version": 2, "method": str, "model": str, "tasks": str, "seed": int,
     ["data_fingerprint": str | null (the task folder's content fingerprint, data/fingerprint.py),]
     "per_task": {task: {"accuracy": float, "ece": float, "nll": float, "brier": float, "n": int
                         [, "adapt_time_s": float] [, "temperature": float (lora-ts)]}},
     "macro": {"accuracy": float, "ece": float, "nll": float, "brier": float, "n": int, "num_tasks": int
               [, "adapt_time_s_per_task": float]},
     "pooled": {"accuracy": float, "ece": float, "nll": float, "brier": float, "n": int,
                "ece_floor": float, "ece_bins": int [, "entropy": float, "aleatoric": float, "epistemic": float, "spread": float]},
     "config": {...the resolved RunConfig...}, "wall_time_s": float, "train_time_s": float,
     "eval_time_s": float, "peak_memory_mb": float, "steps": int,
     "reliability": {"num_bins": int, "count": [int], "confidence_sum": [float], "correct_sum": [float]}
     [, "cost": {"adapt_s_per_task": float, "predict_s_per_query": float, "eval_peak_memory_mb": float,
                 "trained_values": int, "adapted_values_per_task": float}]}

(``per_task[t]`` also carries ``predict_time_s`` and ``adapted_values`` when ``cost`` is there.)

``benchmark`` writes a JSON list of these.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCHEMA_VERSION", "METRICS", "validate_result", "ResultsError"]

SCHEMA_VERSION = 2
METRICS = ("accuracy", "ece", "nll", "brier")
_TOP = {"schema_version": int, "method": str, "model": str, "tasks": str, "seed": int, "per_task": dict, "macro": dict, "pooled": dict,
        "config": dict, "wall_time_s": (int, float), "train_time_s": (int, float), "eval_time_s": (int, float),
        "peak_memory_mb": (int, float), "steps": int, "reliability": dict}
_RANGES = {"accuracy": (0.0, 1.0), "ece": (0.0, 1.0), "nll": (0.0, math.inf), "brier": (0.0, 2.0)}


class ResultsError(ValueError):
    """``results.json`` does not follow the documented schema; the message names the field."""


def _metrics(where: str, values: Any, extra: tuple[str, ...]) -> None:
    if not isinstance(values, dict):
        raise ResultsError(f"{where} must be an object, got {type(values).__name__}")
    missing = [k for k in METRICS + ("n",) + extra if k not in values]
    if missing:
        raise ResultsError(f"{where} lacks {missing}")
    for k in METRICS:
        v, (lo, hi) = values[k], _RANGES[k]
        if not isinstance(v, (int, float)) or not (lo - 1e-9 <= v <= hi + 1e-9):
            raise ResultsError(f"{where}.{k} must be a number in [{lo}, {hi}], got {v!r}")
    for k in ("n",) + extra:
        if not isinstance(values[k], int) or values[k] < 1:
            raise ResultsError(f"{where}.{k} must be an integer >= 1, got {values[k]!r}")


def validate_result(result: Any) -> dict:
    """Return ``result`` if it follows the schema; raise :class:`ResultsError` naming the first problem."""
    if not isinstance(result, dict):
        raise ResultsError(f"a result must be a JSON object, got {type(result).__name__}")
    for key, kind in _TOP.items():
        if key not in result:
            raise ResultsError(f"result lacks the field {key!r}")
        if not isinstance(result[key], kind) or isinstance(result[key], bool):
            raise ResultsError(f"field {key!r} has type {type(result[key]).__name__}")
    fingerprint = result.get("data_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ResultsError(f"data_fingerprint must be a string or null, got {fingerprint!r}")
    if result["schema_version"] != SCHEMA_VERSION:
        raise ResultsError(f"schema_version {result['schema_version']} is not {SCHEMA_VERSION}")
    if not result["per_task"]:
        raise ResultsError("per_task is empty")
    for task, values in result["per_task"].items():
        _metrics(f"per_task[{task!r}]", values, ())
    _metrics("macro", result["macro"], ("num_tasks",))
    _metrics("pooled", result["pooled"], ("ece_bins",))
    floor = result["pooled"].get("ece_floor")
    if not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ResultsError(f"pooled.ece_floor must be a number in [0, 1], got {floor!r}")
    if result["pooled"]["n"] != sum(v["n"] for v in result["per_task"].values()):
        raise ResultsError(f"pooled.n={result['pooled']['n']} is not the sum of per_task n")
    if result["macro"]["num_tasks"] != len(result["per_task"]):
        raise ResultsError(f"macro.num_tasks={result['macro']['num_tasks']} but per_task has {len(result['per_task'])}")
    rel = result["reliability"]
    for k in ("num_bins", "count", "confidence_sum", "correct_sum"):
        if k not in rel:
            raise ResultsError(f"reliability lacks {k!r}")
    if not all(len(rel[k]) == rel["num_bins"] for k in ("count", "confidence_sum", "correct_sum")):
        raise ResultsError("reliability lists must have num_bins entries")
    return result
