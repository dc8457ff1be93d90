"""Does the uncertainty track the data? Shots curves and selective prediction (issue 13, item 5).

For each method (trained once from the base config, or built untrained), on every task of the config's
``eval_split`` (test; dev for choosing settings):

* **shots curve** — one fixed query set per task (``eval_query_size`` examples drawn by a seed of the
  run's seed and the task name) and nested support sets of k = 0, 1, 2, 4, 8, 16 examples from the
  rest; per k, the pooled means of total / aleatoric / epistemic uncertainty and accuracy, NLL. k = 0
  is the prior predictive (no adaptation: q = θ's copy) for methods with a task posterior (ABMLL,
  bayes-lora); other methods start at k = 1. Supports larger than a task's pool are capped (the
  cap is recorded per k as ``num_tasks_capped``).
* **selective prediction** — at the largest k, the accuracy of the x% most certain query examples,
  ranked by total entropy and by epistemic uncertainty, for x = 10%, 20%, ..., 100%.
* **out of family** (``ood_tasks``: another suite, e.g. ``bigbench`` for a run trained on
  ``debian-cls``) — at the largest k, the same measurements on that suite's test tasks, beside the
  run's own test tasks (in family), with a 95% bootstrap interval (tasks, then examples) of the
  difference of the mean epistemic (and total) uncertainty, out − in, and the epistemic share (mean
  mutual information / mean predictive entropy) on each side. ``ood_overrides`` change the
  config for loading that suite only (e.g. ``max_examples``).

A method is trained once into ``out/runs/<method>``, or taken from ``runs[method]`` (an existing run
directory of the same settings, e.g. a benchmark's ``runs/abmll-seed0``): nothing is retrained then.

Writes ``predictions/<method>-k<k>.predictions.jsonl`` (every query example's probabilities, keyed by seed,
task and its index in the fixed query set: ``abmll compare`` and :mod:`scripts.uncertainty.shrinkage`
pair them across k and methods), ``uncertainty.json`` and the plots ``epistemic_vs_shots.png``, ``selective_total.png``,
``selective_epistemic.png`` (and ``out_of_family.png``) under ``out``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Mapping, Sequence

import torch

from abmll_pyro.data.tasks import TaskSplit
from abmll_pyro.train.setup import load_taskset
from abmll_pyro.eval.metrics import compute_metrics, ece_floor, pad_probs
from abmll_pyro.eval.uncertainty import predict_with_uncertainty
from abmll_pyro.methods import SAME_TRAINING, TRAINABLE
from abmll_pyro.models.likelihoods import TaskData
from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder
from abmll_pyro.train.evaluate import write_predictions
from abmll_pyro.train.run import RESULTS, build, load_trained, make_accelerator, train_run

__all__ = ["uncertainty_curves", "selective_accuracy", "difference_interval", "SHOTS", "COVERAGES"]

SHOTS = (0, 1, 2, 4, 8, 16)
COVERAGES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def selective_accuracy(uncertainty: torch.Tensor, correct: torch.Tensor,
                       coverages: Sequence[float] = COVERAGES) -> list[float]:
    """Accuracy of the ``ceil(c·n)`` least uncertain examples for each coverage c (stable order on ties)."""
    order = torch.argsort(uncertainty.double(), stable=True)
    ranked = correct.double()[order]
    return [float(ranked[: max(1, math.ceil(c * len(ranked)))].mean()) for c in coverages]


def difference_interval(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], resamples: int = 1000,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(mean(b) − mean(a), lo, hi)``: pooled means of two unpaired groups of per-task value tensors,
    with a 95% percentile interval from a two-level bootstrap (tasks, then examples within each task),
    each group resampled on its own."""
    g = torch.Generator().manual_seed(seed)

    def draw(group: Sequence[torch.Tensor]) -> float:
        picks = torch.randint(len(group), (len(group),), generator=g)
        vals = [group[int(i)][torch.randint(len(group[int(i)]), (len(group[int(i)]),), generator=g)] for i in picks]
        return float(torch.cat(vals).double().mean())

    point = float(torch.cat(list(b)).double().mean() - torch.cat(list(a)).double().mean())
    diffs = sorted(draw(b) - draw(a) for _ in range(resamples))
    return point, diffs[int(0.025 * resamples)], diffs[min(resamples - 1, int(0.975 * resamples))]


def _built(config: RunConfig, out: Path, progress: bool, run_dir: Path | None = None):
    """``(built, taskset, accelerator)``: from ``run_dir`` if given, else trained into
    ``out/runs/<method>`` once (reused after); untrained methods are built."""
    accelerator = make_accelerator(config)
    if config.method in TRAINABLE or config.method in SAME_TRAINING:
        if run_dir is None:
            trained_as = SAME_TRAINING.get(config.method, config.method)
            run_dir = out / "runs" / trained_as
            if not (run_dir / RESULTS).exists():
                train_run(config.updated(method=trained_as), run_dir, progress=progress)
        return (*load_trained(config, Path(run_dir), accelerator), accelerator)
    return (*build(config, accelerator.device), accelerator)


def _prior_state(method, encoded):
    """k = 0: q = θ's copy, no inner step (None for methods without a task posterior)."""
    svi = getattr(method, "svi", None)
    return None if svi is None else svi.adapt(TaskData(encoded.support), num_inner_steps=0)


def _at_shots(config: RunConfig, method, encoder, accelerator, tasks, k: int, reserve: int):
    """Per task ``(split, gold, task name)`` at ``k`` shots, and the number of tasks whose pool had fewer than ``k``
    examples; ``None`` when k = 0 and the method has no prior. The query set is fixed for every k: the
    first ``eval_query_size`` shuffled examples, fewer where that would leave under ``reserve`` (the
    largest k) for the support pool."""
    out, capped = [], 0
    torch.manual_seed(config.seed)
    for task in tasks:
        examples = list(task.examples)
        random.Random(f"{config.seed}-{task.name}").shuffle(examples)
        size = max(1, min(config.eval_query_size, len(examples) - max(reserve, 1)))
        query, pool = examples[:size], examples[size:]
        capped += int(k > len(pool))
        support = pool[: max(k, 1)]  # k = 0 encodes one example it never uses
        encoded = encoder(TaskSplit(task.name, tuple(support), tuple(query)))
        with accelerator.autocast():
            state = _prior_state(method, encoded) if k == 0 else method.adapt(encoded)
            if state is None:
                return None, capped
            out.append((predict_with_uncertainty(method, state, encoded), encoded.query.gold.cpu(), task.name))
    return out, capped


def _previous(path: Path, result: dict) -> dict:
    """The per-method entries of an earlier ``uncertainty.json`` written with the same shots and
    out-of-family suite ({} otherwise), so an interrupted call resumes at the first unfinished method."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return {}
    same = old.get("shots") == result["shots"] and old.get("ood_tasks") == result.get("ood_tasks")
    return dict(old.get("methods", {})) if same else {}


def _pooled(per_task) -> tuple[list, torch.Tensor, torch.Tensor]:
    """``(splits, probs [n, K_max], gold [n])`` pooled over the tasks."""
    splits = [s for s, _, _ in per_task]
    return splits, pad_probs([s.probs.float() for s in splits]), torch.cat([g for _, g, _ in per_task])


def _prediction_rows(per_task) -> list[dict]:
    """One record per query example (task, index in the task's fixed query set, gold, probabilities): the
    same keys at every k and for every method, so ``abmll compare`` pairs them."""
    rows = []
    for split, gold, task in per_task:
        for i, (g, p) in enumerate(zip(gold.tolist(), split.probs.double().tolist())):
            rows.append({"task": task, "index": i, "gold": int(g), "probs": p})
    return rows


def _row(per_task, k: int, capped: int) -> dict:
    splits, probs, gold = _pooled(per_task)
    m = compute_metrics(probs, gold)
    row = {"shots": k, "accuracy": m.accuracy, "nll": m.nll, "ece": m.ece, "ece_floor": ece_floor(probs), "n": m.n,
           "num_tasks": len(per_task), "num_tasks_capped": capped}
    for field in ("entropy", "aleatoric", "epistemic", "spread"):
        row[field] = float(torch.cat([getattr(s, field) for s in splits]).mean())
    return row


def uncertainty_curves(base: RunConfig, out: Path, methods: Sequence[str], shots: Sequence[int] = SHOTS,
                       progress: bool = True, runs: Mapping[str, Path] | None = None,
                       ood_tasks: str | None = None, ood_overrides: Mapping[str, object] | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = dict(runs or {})
    unknown = sorted(set(runs) - set(methods))
    if unknown:
        raise ValueError(f"runs names methods {unknown} not in methods {list(methods)}")
    (out / "predictions").mkdir(exist_ok=True)
    result: dict = {"shots": list(shots), "coverage": list(COVERAGES), "methods": {}}
    if ood_tasks:
        result["ood_tasks"] = ood_tasks
    previous = _previous(out / "uncertainty.json", result)
    for name in methods:
        if name in previous and (not ood_tasks or "out_of_family" in previous[name]):
            result["methods"][name] = previous[name]  # finished by an earlier call with the same settings
            continue
        config = base.updated(method=name)
        built, taskset, accelerator = _built(config, out, progress, runs.get(name))
        config = built.config or config
        method = built.method
        encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context),
                                 config.template, method.in_context, accelerator.device)
        curve, last = [], None
        for k in shots:
            per_task, capped = _at_shots(config, method, encoder, accelerator, taskset[config.eval_split], k, max(shots))
            if per_task is None:
                continue  # k = 0 for a method without a task posterior
            curve.append(_row(per_task, k, capped))
            write_predictions(out / "predictions" / f"{name}-k{k}.predictions.jsonl", name, config.seed,
                              _prediction_rows(per_task))
            last = per_task
            if progress:
                print(f"{name} shots={k}: " + json.dumps({f: round(curve[-1][f], 6) for f in ("accuracy", "nll", "epistemic")}))
        entry: dict = {"curve": curve}
        if runs.get(name) is not None:
            entry["run"] = str(runs[name])
        atomic_write_text(out / "uncertainty.partial.json", json.dumps({**result, "methods": {
            **result["methods"], name: entry}}, indent=1) + "\n")  # the curve, should what follows fail
        if last is not None:
            splits, probs, gold = _pooled(last)
            correct = probs.argmax(-1) == gold
            entry["selective"] = {
                "shots": curve[-1]["shots"],
                "by_total": selective_accuracy(torch.cat([s.entropy for s in splits]), correct),
                "by_epistemic": selective_accuracy(torch.cat([s.epistemic for s in splits]), correct),
            }
            if ood_tasks:
                k = curve[-1]["shots"]
                other = load_taskset(config.updated(tasks=ood_tasks, **dict(ood_overrides or {})), built.tokenizer).test
                ood, capped = _at_shots(config, method, encoder, accelerator, other, k, k)
                entry["out_of_family"] = {"in": curve[-1], "out": _row(ood, k, capped)}
                entry["out_of_family"]["epistemic_share"] = {  # mean mutual information / mean predictive entropy
                    side: row["epistemic"] / row["entropy"] if row.get("entropy") else None
                    for side, row in (("in", curve[-1]), ("out", entry["out_of_family"]["out"]))}
                for field in ("epistemic", "entropy"):
                    d, lo, hi = difference_interval([getattr(s, field) for s in splits],
                                                    [getattr(s, field) for s, _, _ in ood], seed=config.seed)
                    entry["out_of_family"][f"{field}_out_minus_in"] = {"diff": d, "lo": lo, "hi": hi}
        result["methods"][name] = entry
        atomic_write_text(out / "uncertainty.json", json.dumps(result, indent=1) + "\n")  # after each method
    _plots(result, out)
    return result


def _plots(result: dict, out: Path) -> None:
    try:
        from abmll_pyro.eval.plots import plot_metric_curve
    except ImportError as err:  # matplotlib missing: numbers only
        import warnings

        warnings.warn(f"plots skipped: {err}")
        return
    curves = {n: e["curve"] for n, e in result["methods"].items() if e["curve"]}
    # one x axis: the shots every method has (methods without k = 0 start at k = 1)
    xs = sorted(set.intersection(*[{r["shots"] for r in c} for c in curves.values()])) if curves else []
    if xs:
        ys = {n: [next(r["epistemic"] for r in c if r["shots"] == x) for x in xs] for n, c in curves.items()}
        # symlog: epistemic is exactly 0 for deterministic methods and ~1e-7 nats at small σ
        plot_metric_curve(xs, ys, "support examples (shots)", "mean epistemic uncertainty (nats)",
                          out / "epistemic_vs_shots.png", categorical=True,
                          yscale="symlog" if any(max(v) > 0 for v in ys.values()) else "linear")
    for key, label in (("by_total", "total"), ("by_epistemic", "epistemic")):
        ys = {n: e["selective"][key] for n, e in result["methods"].items() if "selective" in e}
        if ys:
            plot_metric_curve([100 * c for c in result["coverage"]], ys, f"coverage (% most certain by {label})",
                              "accuracy", out / f"selective_{label}.png")
    ood = {n: e["out_of_family"] for n, e in result["methods"].items() if "out_of_family" in e}
    if ood:
        ys = {n: [o["in"]["entropy"], o["out"]["entropy"]] for n, o in ood.items()}
        plot_metric_curve(["own test tasks", f"{result.get('ood_tasks')} test tasks"], ys, "tasks",
                          "mean total uncertainty (nats)", out / "out_of_family.png", categorical=True)
