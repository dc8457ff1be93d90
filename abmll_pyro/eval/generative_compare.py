"""Paired comparisons of methods on generative test tasks, with two-level bootstrap intervals.

Input: generative results.json files (``"kind": "generative"``), whose ``per_task[t]["examples"]`` hold
each query example's predictive log-probability of its target, its token count and the exact match of
the majority answer. Methods are paired on the same (seed, task, example index): the same support/query
split. Pooled metrics over the examples:

    token_nll   = −Σ_j log p(y_j | x_j) / Σ_j |y_j|        (per target token)
    exact_match = mean_j 1[majority_j = y_j]

The difference ``reference − other`` gets a 95% percentile interval from the same two-level bootstrap
as the multiple-choice comparison (:mod:`abmll_pyro.eval.compare`: resample tasks, then examples within
each task and seed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from .compare import _ci, _resamples

__all__ = ["load_generative", "generative_comparison", "format_generative"]

METRICS = ("token_nll", "exact_match")


def load_generative(paths: Iterable[str | Path]) -> dict[str, dict[tuple[int, str, int], tuple[float, int, float]]]:
    """method → {(seed, task, index): (log_prob, num_tokens, exact_match)} from generative results files."""
    out: dict[str, dict] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        if result.get("kind") != "generative":
            raise ValueError(f"{path} is not a generative results file (no \"kind\": \"generative\")")
        rows = out.setdefault(result["method"], {})
        for task, values in result["per_task"].items():
            for i, ex in enumerate(values["examples"]):
                rows[(int(result["seed"]), task, i)] = (ex["log_prob"], ex["num_tokens"], float(ex["exact_match"]))
    return out


def _pooled(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[R, 2]`` pooled (token_nll, exact_match) under ``[R, n]`` example multiplicities."""
    nll = -(weights * values[:, 0]).sum(1) / (weights * values[:, 1]).sum(1)
    em = (weights * values[:, 2]).sum(1) / weights.sum(1)
    return np.stack([nll, em], 1)


def generative_comparison(runs: Mapping[str, dict], reference: str, num_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per other method: each metric's pooled values, the difference reference − other and its CI."""
    if reference not in runs:
        raise ValueError(f"reference method {reference!r} not among {sorted(runs)}")
    rows = []
    for other in sorted(m for m in runs if m != reference):
        keys = sorted(set(runs[reference]) & set(runs[other]))
        if not keys:
            raise ValueError(f"{reference} and {other} share no (seed, task, example): different splits?")
        a = np.array([runs[reference][k] for k in keys], dtype=np.float64)
        b = np.array([runs[other][k] for k in keys], dtype=np.float64)
        weights = _resamples(keys, num_resamples, seed)
        ones = np.ones((1, len(keys)))
        point = _pooled(a, ones)[0] - _pooled(b, ones)[0]
        diffs = _pooled(a, weights) - _pooled(b, weights)
        row = {"reference": reference, "other": other, "n": len(keys), "num_tasks": len({k[1] for k in keys})}
        for j, name in enumerate(METRICS):
            row[name] = {"reference": float(_pooled(a, ones)[0, j]), "other": float(_pooled(b, ones)[0, j]),
                         "diff": float(point[j]), "ci95": _ci(diffs[:, j])}
        rows.append(row)
    return rows


def format_generative(rows: list[dict]) -> str:
    lines = ["| reference − other | n (tasks) | token NLL: ref, other, diff [95% CI] | exact match: ref, other, diff [95% CI] |",
             "|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]['reference']:.3f}, {r[m]['other']:.3f}, {r[m]['diff']:+.3f} "
                 f"[{r[m]['ci95'][0]:+.3f}, {r[m]['ci95'][1]:+.3f}]" for m in METRICS]
        lines.append(f"| {r['reference']} − {r['other']} | {r['n']} ({r['num_tasks']}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)
