"""Evaluation on unseen tasks: adapt on each support set, score the query set, compute the metrics.

Every method sees the same splits: :func:`~abmll_pyro.train.episodes.test_splits` draws one
support/query split per test task from the run's seed alone.

Adaptation time: the wall-clock seconds of ``method.adapt(episode)`` alone (the guide's start, e.g. the
amortized guide's LM pass over the support set, plus the K inner steps; not encoding, not prediction;
CUDA is synchronized around it). :func:`metrics_json` writes them per task (``per_task[t].adapt_time_s``)
and their mean over the test tasks (``macro.adapt_time_s_per_task``).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.tasks import Task
from ..eval.metrics import compute_metrics, macro_average
from ..methods import Method
from .config import RunConfig
from .episodes import EpisodeEncoder, test_splits

__all__ = ["evaluate_method", "pooled_reliability", "metrics_json", "TaskResults"]


class TaskResults(dict):
    """Task name → :class:`~abmll_pyro.eval.metrics.TaskMetrics`, with ``adapt_time_s``: task name →
    seconds spent in ``method.adapt`` (a dict, so existing callers read it as before)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapt_time_s: dict[str, float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pooled_reliability(probs: torch.Tensor, gold: torch.Tensor, num_bins: int = 10) -> dict:
    """Per-bin sums (count, confidence, correct) of top-class confidence: they add across tasks and seeds."""
    conf, pred = probs.double().max(1)
    bins = torch.clamp(torch.ceil(conf * num_bins).long() - 1, 0, num_bins - 1)
    correct = (pred == gold).double()
    return {"num_bins": num_bins,
            "count": torch.bincount(bins, minlength=num_bins).tolist(),
            "confidence_sum": torch.bincount(bins, weights=conf, minlength=num_bins).tolist(),
            "correct_sum": torch.bincount(bins, weights=correct, minlength=num_bins).tolist()}


def evaluate_method(method: Method, tasks: Sequence[Task], encoder: EpisodeEncoder, config: RunConfig,
                    progress: bool = True, autocast=None) -> tuple[dict, dict]:
    """``(per_task metrics, pooled reliability sums)`` of ``method`` on ``tasks``' query sets."""
    torch.manual_seed(config.seed)  # posterior draws independent of how much training consumed
    per_task, all_probs, all_gold = TaskResults(), [], []
    splits = test_splits(tasks, config.shots, config.eval_query_size, config.seed)
    for split in tqdm(splits, desc=f"evaluate {method.name}", disable=not progress, leave=False):
        episode = encoder(split)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            device = episode.query.gold.device
            _sync(device)
            start = time.perf_counter()
            state = method.adapt(episode)
            _sync(device)
            per_task.adapt_time_s[split.name] = time.perf_counter() - start
            with torch.no_grad():
                probs = method.predict(state, episode).float().cpu()
        gold = episode.query.gold.cpu()
        per_task[split.name] = compute_metrics(probs, gold)
        all_probs.append(probs)
        all_gold.append(gold)
    width = max(p.shape[1] for p in all_probs)  # tasks differ in option count: pad with probability 0
    pooled = pooled_reliability(torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in all_probs]),
                                torch.cat(all_gold))
    return per_task, pooled


def metrics_json(per_task: dict) -> tuple[dict, dict]:
    """``(per_task, macro)`` as results.json holds them; with adaptation times when ``per_task`` is a
    :class:`TaskResults` from :func:`evaluate_method` (``adapt_time_s`` per task, their mean in macro)."""
    tasks = {name: {"accuracy": m.accuracy, "ece": m.ece, "nll": m.nll, "brier": m.brier, "n": m.n}
             for name, m in per_task.items()}
    macro = macro_average(per_task)
    macro = {k: macro[k] for k in ("accuracy", "ece", "nll", "brier", "n", "num_tasks")}
    times = getattr(per_task, "adapt_time_s", None)
    if times and set(times) == set(tasks):
        for name, seconds in times.items():
            tasks[name]["adapt_time_s"] = seconds
        macro["adapt_time_s_per_task"] = sum(times.values()) / len(times)
    return tasks, macro
