"""Evaluation on unseen tasks: adapt on each support set, score the query set, compute the metrics.

Every method sees the same splits: :func:`~abmll_pyro.train.episodes.test_splits` draws one
support/query split per test task from the run's seed alone (``shots`` support examples, then all
remaining examples up to ``eval_query_size`` as the query set).

Three views of one evaluation, all in results.json:

* ``per_task`` and ``macro`` — each task's metrics and their unweighted mean over tasks;
* ``pooled`` — the headline: accuracy, NLL, Brier and ECE over *all* query examples of the split
  together (ECE on few examples per task is dominated by its own small-sample bias), with
  ``ece_floor``, the ECE a perfectly calibrated predictor with the same confidences would score at
  that n (:func:`~abmll_pyro.eval.metrics.ece_floor`);
* ``predictions.jsonl`` beside results.json — one line per query example (task, example index in the
  task, gold, option probabilities), so any comparison can be recomputed without a model
  (``abmll compare``).

Uncertainty split (:mod:`abmll_pyro.eval.uncertainty`): every predictions line also carries
``entropy``, ``aleatoric`` and ``epistemic`` (nats; total = expected entropy over posterior samples +
mutual information), and ``per_task[t]`` and ``pooled`` carry their means (0 epistemic for methods
without posterior samples).

Adaptation time: the wall-clock seconds of ``method.adapt(episode)`` alone (the guide's start, e.g. the
amortized guide's LM pass over the support set, plus the K inner steps; not encoding, not prediction;
CUDA is synchronized around it). :func:`metrics_json` writes them per task (``per_task[t].adapt_time_s``)
and their mean over the test tasks (``macro.adapt_time_s_per_task``). Prediction time (the query set's
probabilities with every posterior sample, ``per_task[t].predict_time_s``), the numbers each task's
adapted state holds (``per_task[t].adapted_values``) and the evaluation's peak memory feed results.json's
``cost`` block (:mod:`abmll_pyro.train.cost`).
"""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.tasks import Task
from ..eval.metrics import compute_metrics, ece_floor, macro_average, pad_probs
from ..eval.uncertainty import example_fields, predict_with_uncertainty, uncertainty_means
from ..methods import Method
from .config import RunConfig
from .cost import PeakMemory, state_values
from .distributed import Ranks, seed_rng
from .episodes import EpisodeEncoder, test_splits

__all__ = ["evaluate_method", "pooled_reliability", "pooled_metrics", "pooled_json", "metrics_json", "TaskResults",
           "write_predictions", "predictions_path"]


class TaskResults(dict):
    """Task name → :class:`~abmll_pyro.eval.metrics.TaskMetrics`, with ``adapt_time_s`` (task name →
    seconds spent in ``method.adapt``), ``probs``/``gold`` (task name → the query's option
    probabilities ``[n, M]`` and gold ``[n]``) and ``example_index`` (task name → each query example's
    index in the task's example list)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapt_time_s: dict[str, float] = {}
        self.probs: dict[str, torch.Tensor] = {}
        self.gold: dict[str, torch.Tensor] = {}
        self.example_index: dict[str, list[int]] = {}
        self.uncertainty: dict = {}  # task name → UncertaintySplit of its query set
        self.diagnostics: dict[str, dict[str, float]] = {}  # task name → method.adapt_diagnostics(state)
        self.predict_time_s: dict[str, float] = {}  # task name → seconds predicting its query set
        self.adapted_values: dict[str, int] = {}  # task name → numbers in its adapted state
        self.peak_memory_mb: float = float("nan")  # this rank's peak while adapting and predicting

    def predictions(self) -> list[dict]:
        """One record per query example, in task order: ``task``, ``index``, ``gold``, ``probs``."""
        rows = []
        for name in self:
            split = self.uncertainty.get(name)
            extra = example_fields(split) if split is not None else [{}] * len(self.gold[name])
            for idx, gold, p, unc in zip(self.example_index[name], self.gold[name].tolist(), self.probs[name].tolist(),
                                         extra):
                rows.append({"task": name, "index": idx, "gold": gold, "probs": p, **unc})
        return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pooled_reliability(probs: torch.Tensor, gold: torch.Tensor, num_bins: int = 15) -> dict:
    """Per-bin sums (count, confidence, correct) of top-class confidence: they add across tasks and seeds."""
    conf, pred = probs.double().max(1)
    bins = torch.clamp(torch.ceil(conf * num_bins).long() - 1, 0, num_bins - 1)
    correct = (pred == gold).double()
    return {"num_bins": num_bins,
            "count": torch.bincount(bins, minlength=num_bins).tolist(),
            "confidence_sum": torch.bincount(bins, weights=conf, minlength=num_bins).tolist(),
            "correct_sum": torch.bincount(bins, weights=correct, minlength=num_bins).tolist()}


def pooled_metrics(probs: torch.Tensor, gold: torch.Tensor, num_bins: int = 15, seed: int = 0) -> dict:
    """Accuracy, NLL, Brier and ECE over all examples together, with the ECE's noise floor."""
    m = compute_metrics(probs, gold, num_bins)
    return {"accuracy": m.accuracy, "nll": m.nll, "brier": m.brier, "ece": m.ece,
            "ece_floor": ece_floor(probs, num_bins, seed=seed), "ece_bins": num_bins, "n": m.n}


def _query_indices(task: Task, split) -> list[int]:
    position = {id(ex): i for i, ex in enumerate(task.examples)}
    return [position[id(ex)] for ex in split.query]


def evaluate_method(method: Method, tasks: Sequence[Task], encoder: EpisodeEncoder, config: RunConfig,
                    progress: bool = True, autocast=None, ranks: Ranks | None = None) -> tuple[TaskResults, dict]:
    """``(per_task results, pooled reliability sums)`` of ``method`` on ``tasks``' query sets.

    With ``ranks`` (a multi-process run) each rank adapts to its share of the tasks (task i on rank
    i mod W) and the results are gathered on every rank in task order; task i's randomness
    (posterior draws) is seeded from ``(seed, i)`` alone, so the metrics equal a one-process run's."""
    ranks = ranks or Ranks()
    mine = []  # (task index, name, uncertainty split, gold, adapt seconds, example indices, diagnostics) of this rank's tasks
    splits = test_splits(tasks, config.shots, config.eval_query_size, config.seed)
    memory = None
    for i in tqdm(ranks.shard(len(splits)), desc=f"evaluate {method.name}", disable=not progress, leave=False):
        task, split = tasks[i], splits[i]
        seed_rng(config.seed, "evaluate", i)  # posterior draws independent of training and of other tasks
        episode = encoder(split)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            device = episode.query.gold.device
            if memory is None:
                memory = PeakMemory(device)
                memory.start()
            _sync(device)
            start = time.perf_counter()
            state = method.adapt(episode)
            _sync(device)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                uncertainty = predict_with_uncertainty(method, state, episode)
            _sync(device)
            predict_seconds = time.perf_counter() - start - seconds
        uncertainty = replace(uncertainty, **{f.name: getattr(uncertainty, f.name).cpu() for f in fields(uncertainty)})
        report = getattr(method, "adapt_diagnostics", None)  # optional: duck-typed methods may lack it
        diagnostics = {k: float(v) for k, v in report(state).items()} if report is not None else {}
        mine.append((i, split.name, uncertainty, episode.query.gold.cpu(), seconds, _query_indices(task, split),
                     diagnostics, predict_seconds, state_values(state)))
    per_task = TaskResults()
    gathered = sorted((r for part in ranks.all_gather(mine) for r in part), key=lambda r: r[0])  # task order
    per_task.peak_memory_mb = memory.peak_mb() if memory is not None else float("nan")
    for _, name, uncertainty, gold, seconds, index, diagnostics, predict_seconds, values in gathered:
        per_task.predict_time_s[name], per_task.adapted_values[name] = predict_seconds, values
        probs = uncertainty.probs.float()  # = method.predict(state, episode) (the mean over its samples)
        per_task[name] = compute_metrics(probs, gold, config.ece_bins)
        per_task.adapt_time_s[name], per_task.uncertainty[name] = seconds, uncertainty
        if diagnostics:
            per_task.diagnostics[name] = diagnostics
        per_task.probs[name], per_task.gold[name], per_task.example_index[name] = probs, gold, index
    all_probs, all_gold = pad_probs(list(per_task.probs.values())), torch.cat(list(per_task.gold.values()))
    return per_task, pooled_reliability(all_probs, all_gold, config.ece_bins)


def metrics_json(per_task: dict) -> tuple[dict, dict]:
    """``(per_task, macro)`` as results.json holds them; with adaptation times when ``per_task`` is a
    :class:`TaskResults` from :func:`evaluate_method` (``adapt_time_s`` per task, their mean in macro)."""
    tasks = {name: {"accuracy": m.accuracy, "ece": m.ece, "nll": m.nll, "brier": m.brier, "n": m.n}
             for name, m in per_task.items()}
    macro = macro_average(per_task)
    macro = {k: macro[k] for k in ("accuracy", "ece", "nll", "brier", "n", "num_tasks")}
    means = uncertainty_means(getattr(per_task, "uncertainty", {}))["per_task"]
    for name, values in means.items():
        tasks[name].update(values)
    times = getattr(per_task, "adapt_time_s", None)
    if times and set(times) == set(tasks):
        for name, seconds in times.items():
            tasks[name]["adapt_time_s"] = seconds
        macro["adapt_time_s_per_task"] = sum(times.values()) / len(times)
    for name, seconds in getattr(per_task, "predict_time_s", {}).items():
        tasks[name].update(predict_time_s=seconds, adapted_values=per_task.adapted_values[name])
    for name, values in getattr(per_task, "diagnostics", {}).items():
        tasks[name].update(values)
    return tasks, macro


def pooled_json(per_task: TaskResults, num_bins: int, seed: int) -> dict:
    """results.json's ``pooled`` block from :func:`evaluate_method`'s results."""
    probs = pad_probs([per_task.probs[t] for t in per_task])
    gold = torch.cat([per_task.gold[t] for t in per_task])
    pooled = pooled_metrics(probs, gold, num_bins, seed)
    if per_task.uncertainty:
        unc = uncertainty_means(per_task.uncertainty)["pooled"]
        pooled.update({k: v for k, v in unc.items() if k != "n"})
    return pooled


def predictions_path(results_path: str | Path) -> Path:
    """Where the predictions of a results file go: ``predictions.jsonl`` beside ``results.json``, else
    ``<stem>.predictions.jsonl``."""
    results_path = Path(results_path)
    name = "predictions.jsonl" if results_path.name == "results.json" else f"{results_path.stem}.predictions.jsonl"
    return results_path.with_name(name)


def write_predictions(path: str | Path, method: str, seed: int, rows: Sequence[dict]) -> None:
    """Write ``rows`` (from :meth:`TaskResults.predictions`) as JSONL, each with ``method`` and ``seed``."""
    from .checkpoint import atomic_write_text

    text = "".join(json.dumps({"method": method, "seed": seed, **r}) + "\n" for r in rows)
    atomic_write_text(Path(path), text)
