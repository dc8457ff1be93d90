"""Cost beside quality (as BayesAdapt reports it): what each method spends at test time.

results.json's ``cost`` block (:func:`cost_block`), from one evaluation:

* ``adapt_s_per_task`` — mean wall seconds of ``method.adapt`` per test task (``macro.adapt_time_s_per_task``);
* ``predict_s_per_query`` — wall seconds of the query set's prediction (every posterior sample, the
  uncertainty split included), summed over tasks, per query example;
* ``eval_peak_memory_mb`` — peak memory while adapting and predicting: ``torch.cuda.max_memory_allocated``
  on a GPU (reset when the evaluation starts), else the process's peak resident set (VmHWM, reset when
  the evaluation starts where Linux allows it, so it holds the model, not training's transients);
* ``trained_values`` — the method's meta-trained (checkpointed) values;
* ``adapted_values_per_task`` — the numbers a task's adapted state holds (:func:`state_values`: the
  fine-tuned factors, plus an ensemble's members, BLoB's scales, the Laplace fit's matrices, ...).

:func:`cost_table` writes one markdown row per method (means over seeds) for ``abmll benchmark``.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["state_values", "PeakMemory", "cost_block", "cost_table", "rss_mb", "reset_peak_rss"]


def rss_mb(field: str = "VmRSS") -> float:
    """The current (``VmRSS``) or peak (``VmHWM``) resident set of this process (Linux /proc), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0: ``5`` to /proc/self/clear_refs), so the
    peak measured later excludes transients of loading the model; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def state_values(state: Any) -> int:
    """The number of tensor elements in an adapted state (tensors in mappings, sequences, dataclasses)."""
    if isinstance(state, Tensor):
        return state.numel()
    if isinstance(state, Mapping):
        return sum(state_values(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_values(v) for v in state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return sum(state_values(getattr(state, f.name)) for f in dataclasses.fields(state))
    return 0


class PeakMemory:
    """Peak memory from :meth:`start` on (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return rss_mb("VmHWM")


def cost_block(adapt_s: Sequence[float], predict_s: Sequence[float], num_queries: int, peak_mb: float,
               trained_values: int, adapted_values: Sequence[int]) -> dict[str, float]:
    return {"adapt_s_per_task": sum(adapt_s) / max(len(adapt_s), 1),
            "predict_s_per_query": sum(predict_s) / max(num_queries, 1),
            "eval_peak_memory_mb": peak_mb, "trained_values": int(trained_values),
            "adapted_values_per_task": sum(adapted_values) / max(len(adapted_values), 1)}


def cost_table(results: Sequence[dict]) -> str:
    """Markdown: one row per method (in run order), each figure the mean over its seeds."""
    lines = ["| method | adapt s/task | predict ms/query | eval peak MiB | trained values | adapted values/task |",
             "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in results):
        costs = [r["cost"] for r in results if r["method"] == m and "cost" in r]
        if not costs:
            continue
        mean = {k: statistics.mean(c[k] for c in costs) for k in costs[0]}
        lines.append(f"| {m} | {mean['adapt_s_per_task']:.3f} | {1e3 * mean['predict_s_per_query']:.2f} | "
                     f"{mean['eval_peak_memory_mb']:.0f} | {mean['trained_values']:,.0f} | "
                     f"{mean['adapted_values_per_task']:,.0f} |")
    lines += ["", "Wall seconds on this machine (other load counts); peak memory: GPU allocated, else the process's "
              "peak resident set during evaluation (the model included)."]
    return "\n".join(lines) + "\n"
