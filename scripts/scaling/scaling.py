"""Scaling: peak memory of ABMLL meta-training against the number of training tasks, each count probed in
its own process (:func:`scripts.cost.probe.run_probe`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from scripts.cost.probe import run_probe

__all__ = ["scaling_memory"]


def scaling_memory(base: RunConfig, out: Path, task_counts: Sequence[int] = (10, 100), steps: int = 2) -> dict:
    """Peak memory of ABMLL meta-training with 10 vs 100 training tasks (``base.tasks`` must hold enough)."""
    rows = [run_probe(base.updated(method="abmll", steps=steps, max_train_tasks=n)) for n in task_counts]
    for n, row in zip(task_counts, rows):
        if row["num_train_tasks"] != n:
            raise ValueError(f"the task source has {row['num_train_tasks']} training tasks, fewer than {n}")
    result = {"task_counts": list(task_counts), "runs": rows,
              "memory_ratio": rows[-1]["peak_memory_mb"] / rows[0]["peak_memory_mb"]}
    atomic_write_text(out / "scaling.json", json.dumps(result, indent=1) + "\n")
    return result
