"""Does the uncertainty track the data? Shots curves and selective prediction (issue 13, item 5).

For each method (trained once from the base config, or built untrained), on every test task:

* **shots curve** — one fixed query set per task (``eval_query_size`` examples drawn by a seed of the
  run's seed and the task name) and nested support sets of k = 0, 1, 2, 4, 8, 16 examples from the
  rest; per k, the pooled means of total / aleatoric / epistemic uncertainty and accuracy, NLL. k = 0
  is the prior predictive (no adaptation: q = θ's copy) for methods with a task posterior (ABMLL,
  bayes-lora); other methods start at k = 1. Supports larger than a task's pool are capped (the
  cap is recorded per k as ``num_tasks_capped``).
* **selective prediction** — at the largest k, the accuracy of the x% most certain query examples,
  ranked by total entropy and by epistemic uncertainty, for x = 10%, 20%, ..., 100%.

Writes ``uncertainty.json`` and the plots ``epistemic_vs_shots.png``, ``selective_total.png`` and
``selective_epistemic.png`` under ``out``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Sequence

import torch

from ..data.tasks import TaskSplit
from ..eval.metrics import compute_metrics, pad_probs
from ..eval.uncertainty import predict_with_uncertainty
from ..methods import SAME_TRAINING, TRAINABLE
from ..models.likelihoods import TaskData
from .checkpoint import atomic_write_text
from .config import RunConfig
from .episodes import EpisodeEncoder
from .run import RESULTS, build, load_trained, make_accelerator, train_run

__all__ = ["uncertainty_curves", "selective_accuracy", "SHOTS", "COVERAGES"]

SHOTS = (0, 1, 2, 4, 8, 16)
COVERAGES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def selective_accuracy(uncertainty: torch.Tensor, correct: torch.Tensor,
                       coverages: Sequence[float] = COVERAGES) -> list[float]:
    """Accuracy of the ``ceil(c·n)`` least uncertain examples for each coverage c (stable order on ties)."""
    order = torch.argsort(uncertainty.double(), stable=True)
    ranked = correct.double()[order]
    return [float(ranked[: max(1, math.ceil(c * len(ranked)))].mean()) for c in coverages]


def _built(config: RunConfig, out: Path, progress: bool):
    """``(built, taskset, accelerator)``: trained into ``out/runs/<method>`` once (reused after)."""
    accelerator = make_accelerator(config)
    if config.method in TRAINABLE or config.method in SAME_TRAINING:
        trained_as = SAME_TRAINING.get(config.method, config.method)
        run_dir = out / "runs" / trained_as
        if not (run_dir / RESULTS).exists():
            train_run(config.updated(method=trained_as), run_dir, progress=progress)
        return (*load_trained(config, run_dir, accelerator), accelerator)
    return (*build(config, accelerator.device), accelerator)


def _prior_state(method, encoded):
    """k = 0: q = θ's copy, no inner step (None for methods without a task posterior)."""
    svi = getattr(method, "svi", None)
    return None if svi is None else svi.adapt(TaskData(encoded.support), num_inner_steps=0)


def uncertainty_curves(base: RunConfig, out: Path, methods: Sequence[str], shots: Sequence[int] = SHOTS,
                       progress: bool = True) -> dict:
    out = Path(out)
    result: dict = {"shots": list(shots), "coverage": list(COVERAGES), "methods": {}}
    for name in methods:
        config = base.updated(method=name)
        built, taskset, accelerator = _built(config, out, progress)
        method = built.method
        encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context),
                                 config.template, method.in_context, accelerator.device)
        curve, last = [], None
        for k in shots:
            splits, golds, capped = [], [], 0
            torch.manual_seed(config.seed)
            for task in taskset.test:
                examples = list(task.examples)
                random.Random(f"{config.seed}-{task.name}").shuffle(examples)
                query, pool = examples[: config.eval_query_size], examples[config.eval_query_size:]
                capped += int(k > len(pool))
                support = pool[: max(k, 1)]  # k = 0 encodes one example it never uses
                encoded = encoder(TaskSplit(task.name, tuple(support), tuple(query)))
                with accelerator.autocast():
                    state = _prior_state(method, encoded) if k == 0 else method.adapt(encoded)
                    if state is None:
                        break
                    splits.append(predict_with_uncertainty(method, state, encoded))
                golds.append(encoded.query.gold.cpu())
            if len(splits) != len(taskset.test):
                continue  # k = 0 for a method without a task posterior
            probs = pad_probs([s.probs.float() for s in splits])
            gold = torch.cat(golds)
            m = compute_metrics(probs, gold)
            row = {"shots": k, "accuracy": m.accuracy, "nll": m.nll, "ece": m.ece, "n": m.n, "num_tasks_capped": capped}
            for field in ("entropy", "aleatoric", "epistemic"):
                row[field] = float(torch.cat([getattr(s, field) for s in splits]).mean())
            curve.append(row)
            last = (splits, probs, gold)
        entry: dict = {"curve": curve}
        if last is not None:
            splits, probs, gold = last
            correct = (probs.argmax(-1) == gold)
            entry["selective"] = {
                "shots": curve[-1]["shots"],
                "by_total": selective_accuracy(torch.cat([s.entropy for s in splits]), correct),
                "by_epistemic": selective_accuracy(torch.cat([s.epistemic for s in splits]), correct),
            }
        result["methods"][name] = entry
    atomic_write_text(out / "uncertainty.json", json.dumps(result, indent=1) + "\n")
    _plots(result, out)
    return result


def _plots(result: dict, out: Path) -> None:
    try:
        from ..eval.plots import plot_metric_curve
    except ImportError as err:  # matplotlib missing: numbers only
        import warnings

        warnings.warn(f"plots skipped: {err}")
        return
    curves = {n: e["curve"] for n, e in result["methods"].items() if e["curve"]}
    # one x axis: the shots every method has (methods without k = 0 start at k = 1)
    xs = sorted(set.intersection(*[{r["shots"] for r in c} for c in curves.values()])) if curves else []
    if xs:
        ys = {n: [next(r["epistemic"] for r in c if r["shots"] == x) for x in xs] for n, c in curves.items()}
        plot_metric_curve(xs, ys, "support examples (shots)", "mean epistemic uncertainty (nats)",
                          out / "epistemic_vs_shots.png")
    for key, label in (("by_total", "total"), ("by_epistemic", "epistemic")):
        ys = {n: e["selective"][key] for n, e in result["methods"].items() if "selective" in e}
        if ys:
            plot_metric_curve([100 * c for c in result["coverage"]], ys, f"coverage (% most certain by {label})",
                              "accuracy", out / f"selective_{label}.png")
