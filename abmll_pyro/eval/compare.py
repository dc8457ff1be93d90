"""Paired comparisons of methods on identical query examples, with bootstrap confidence intervals.

Input: the ``predictions.jsonl`` files that every run writes (one line per query example: ``method``,
``seed``, ``task``, ``index``, ``gold``, ``probs``). Two methods are compared on the examples both
predicted — the same (seed, task, example index), so the same support/query split — and the
difference ``reference − other`` of each pooled metric is reported with a 95% percentile interval
from a two-level bootstrap (Davison & Hinkley 1997, §3.8):

1. resample the test **tasks** with replacement (tasks are the unit of generalization);
2. within each drawn task, resample its **examples** with replacement, separately per seed;
3. recompute both methods' pooled accuracy, NLL, Brier and ECE on that resample — paired, because
   both methods are evaluated on the same drawn examples — and take the difference.

Seeds are combined: a task's examples of every seed travel together in step 1. The same bootstrap
gives each method's own standard error (:func:`summarize`). ECE is top-label, ``num_bins`` equal-width
bins, recomputed on each resample; its noise floor (:func:`~abmll_pyro.eval.metrics.ece_floor`) is
reported beside it.

That bootstrap treats each method's trained weights as fixed: it answers "would these two trained
predictors differ on other tasks and examples?", not "would another training run differ?". Where the
predictions hold two or more seeds (each seed its own training run and support/query split), every
row also carries ``across_seeds``: the difference of each seed's pooled metrics, their mean and a 95%
Student-t interval over seeds (mean ± t(k−1) · sd / √k), which includes the spread between training
runs. With 3 seeds it is wide (t = 4.30); a difference resolved by the bootstrap but not across seeds
may be one training run's luck.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .metrics import ece_floor
from .predictions_io import PREDICTION_SUFFIXES, open_predictions

__all__ = ["Predictions", "load_predictions", "find_prediction_files", "paired_comparison", "summarize",
           "format_comparison", "format_summary", "PredictionsError", "t975"]

METRICS = ("accuracy", "nll", "brier", "ece")
BETTER = {"accuracy": "higher", "nll": "lower", "brier": "lower", "ece": "lower"}


class PredictionsError(ValueError):
    """A predictions file or directory that cannot be compared; the message names it."""


@dataclass
class Predictions:
    """One method's predictions: ``keys`` (seed, task, index) → row, ``gold`` ``[n]``, ``probs`` ``[n, M]``."""

    method: str
    keys: list[tuple[int, str, int]]
    gold: np.ndarray
    probs: np.ndarray

    def index(self) -> dict[tuple[int, str, int], int]:
        return {k: i for i, k in enumerate(self.keys)}


def find_prediction_files(paths: Iterable[str | Path]) -> list[Path]:
    """``predictions.jsonl`` files (or their compact ``.jsonl.xz`` / ``.jsonl.gz`` forms) under each path:
    a run directory, a benchmark directory (its ``runs/*/``), or the file itself."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        in_run = [path / f"predictions{s}" for s in PREDICTION_SUFFIXES if (path / f"predictions{s}").is_file()]
        in_runs = sorted(f for s in PREDICTION_SUFFIXES for f in path.glob(f"runs/*/predictions{s}")) if path.is_dir() else []
        if path.is_file():
            found.append(path)
        elif in_run:
            found.append(in_run[0])
        elif in_runs:
            found.extend(in_runs)
        elif path.is_dir():
            raise PredictionsError(f"{path} holds no predictions.jsonl (neither a run nor a benchmark directory)")
        else:
            raise PredictionsError(f"{path} does not exist")
    return found


def _check_record(where: str, gold: int, probs: list[float]) -> None:
    """One prediction record's probabilities and gold index, every fault naming ``file:line``."""
    if not probs:
        raise PredictionsError(f"{where}: 'probs' is empty")
    bad = [p for p in probs if not (math.isfinite(p) and 0.0 <= p <= 1.0 + 1e-4)]
    if bad:
        raise PredictionsError(f"{where}: probability {bad[0]!r} is not a number in [0, 1]")
    if not 0 <= gold < len(probs):
        raise PredictionsError(f"{where}: gold {gold} is out of range for {len(probs)} options (0..{len(probs) - 1})")


def load_predictions(paths: Iterable[str | Path], names: Sequence[str] | None = None,
                     tasks: Iterable[str] | None = None) -> dict[str, Predictions]:
    """Method name → its predictions, gathered from every file under ``paths``.

    ``names`` (one per path): label everything under each path with that name instead of the method
    recorded in the file (two runs of one method, e.g. two β, compared with each other). ``tasks``:
    keep only these tasks (e.g. the test tasks with headroom), every name of which must occur."""
    paths = list(paths)
    if names is not None and len(names) != len(paths):
        raise PredictionsError(f"--names gives {len(names)} names for {len(paths)} paths: give one per path")
    labelled = [(f, None if names is None else names[i]) for i, p in enumerate(paths) for f in find_prediction_files([p])]
    keep = None if tasks is None else set(tasks)
    rows: dict[str, dict[tuple[int, str, int], tuple[int, list[float]]]] = {}
    origin: dict[tuple[str, int, str, int], str] = {}  # (method, seed, task, index) -> the file:line that gave it
    seen_tasks: set[str] = set()
    for file, label in labelled:
        with open_predictions(file) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = (int(rec["seed"]), str(rec["task"]), int(rec["index"]))
                    seen_tasks.add(key[1])
                    if keep is not None and key[1] not in keep:
                        continue
                    method = label or str(rec["method"])
                    gold, probs = int(rec["gold"]), [float(p) for p in rec["probs"]]
                except (ValueError, KeyError, TypeError) as err:
                    raise PredictionsError(f"{file}:{lineno}: not a prediction record ({err})") from None
                _check_record(f"{file}:{lineno}", gold, probs)
                where = origin.setdefault((method, *key), f"{file}:{lineno}")
                if where != f"{file}:{lineno}":
                    raise PredictionsError(
                        f"{where.rsplit(':', 1)[0]} and {file} both hold method {method!r} seed {key[0]} task "
                        f"{key[1]!r} example {key[2]} (two runs of one method?); label each path with --names")
                rows.setdefault(method, {})[key] = (gold, probs)
    if keep is not None and keep - seen_tasks:
        raise PredictionsError(f"task(s) {sorted(keep - seen_tasks)} occur in no predictions file under {[str(p) for p in paths]}")
    out = {}
    for method, recs in rows.items():
        keys = sorted(recs)
        width = max(len(recs[k][1]) for k in keys)
        probs = np.zeros((len(keys), width))
        for i, k in enumerate(keys):
            probs[i, : len(recs[k][1])] = recs[k][1]
        out[method] = Predictions(method, keys, np.array([recs[k][0] for k in keys]), probs)
    if not out:
        raise PredictionsError(f"no predictions found in {[str(p) for p in paths]}")
    return out


def _per_example(probs: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example terms whose means are the pooled metrics (ECE from conf/correct by bin)."""
    conf, pred = probs.max(1), probs.argmax(1)
    p_gold = np.clip(probs[np.arange(len(gold)), gold], np.finfo(np.float32).tiny, None)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(gold)), gold] = 1.0
    return {"correct": (pred == gold).astype(float), "nll": -np.log(p_gold),
            "brier": ((probs - onehot) ** 2).sum(1), "conf": conf}


def _bins(conf: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin b holds (b/B, (b+1)/B]; the first also 0 (as :func:`~abmll_pyro.eval.metrics.reliability_diagram`)."""
    return np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)


def _metrics(terms: dict[str, np.ndarray], bins: np.ndarray, weights: np.ndarray, num_bins: int) -> np.ndarray:
    """``[R, 4]`` pooled accuracy, NLL, Brier, ECE of each resample, given as example multiplicities
    ``weights`` ``[R, n]`` (a resample's metric is the weighted pooled metric)."""
    total = weights.sum(1)
    acc, nll, brier = ((weights @ terms[k]) / total for k in ("correct", "nll", "brier"))
    onehot = np.zeros((len(bins), num_bins))
    onehot[np.arange(len(bins)), bins] = 1.0
    per_bin = (weights * (terms["correct"] - terms["conf"])) @ onehot  # [R, B]
    ece = np.abs(per_bin).sum(1) / total
    return np.stack([acc, nll, brier, ece], 1)


def _resamples(keys: Sequence[tuple[int, str, int]], num_resamples: int, seed: int) -> np.ndarray:
    """``[R, n]`` multiplicities of each example in R two-level bootstrap resamples: draw the tasks
    with replacement, then, within each drawn task and seed, its examples with replacement."""
    rng = np.random.default_rng(seed)
    groups: dict[str, dict[int, list[int]]] = {}
    for i, (s, task, _) in enumerate(keys):
        groups.setdefault(task, {}).setdefault(s, []).append(i)
    members = [[np.asarray(m) for m in groups[t].values()] for t in sorted(groups)]
    weights = np.zeros((num_resamples, len(keys)))
    for r in range(num_resamples):
        for t in rng.integers(0, len(members), len(members)):
            for m in members[t]:
                np.add.at(weights[r], m[rng.integers(0, len(m), len(m))], 1.0)
    return weights


# two-sided 95% quantiles of Student's t with 1..30 degrees of freedom (beyond: the normal's 1.96 plus
# the first two Cornish-Fisher terms, within 1e-3 of the exact value from 30 on)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def _across_seeds(common: Sequence[tuple[int, str, int]], ta: dict, tb: dict, ba: np.ndarray, bb: np.ndarray,
                  num_bins: int) -> dict | None:
    """Per-seed differences of the pooled metrics and a Student-t interval over seeds (module docstring)."""
    seeds = sorted({k[0] for k in common})
    if len(seeds) < 2:
        return None
    of_seed = np.array([k[0] for k in common])
    per_seed = []
    for s in seeds:
        w = (of_seed == s).astype(float)[None]
        per_seed.append(_metrics(ta, ba, w, num_bins)[0] - _metrics(tb, bb, w, num_bins)[0])
    diffs = np.stack(per_seed)  # [k, 4]
    k = len(seeds)
    mean, half = diffs.mean(0), t975(k - 1) * diffs.std(0, ddof=1) / np.sqrt(k)
    out: dict = {"seeds": seeds}
    for j, metric in enumerate(METRICS):
        lo, hi = float(mean[j] - half[j]), float(mean[j] + half[j])
        out[metric] = {"per_seed": [float(d) for d in diffs[:, j]], "mean": float(mean[j]), "ci95": [lo, hi],
                       "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def _ci(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def paired_comparison(preds: dict[str, Predictions], reference: str, num_bins: int = 15,
                      num_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """``reference − other`` for every other method, on their common examples, with 95% bootstrap CIs."""
    if reference not in preds:
        raise PredictionsError(f"reference method {reference!r} has no predictions; found {sorted(preds)}")
    ref = preds[reference]
    ref_index = ref.index()
    out = []
    for name, other in preds.items():
        if name == reference:
            continue
        common = [k for k in other.keys if k in ref_index]
        if not common:
            raise PredictionsError(f"{reference} and {name} share no (seed, task, example): different splits")
        oi = other.index()
        a = np.array([ref_index[k] for k in common])
        b = np.array([oi[k] for k in common])
        if not np.array_equal(ref.gold[a], other.gold[b]):
            raise PredictionsError(f"{reference} and {name} disagree on gold labels: not the same examples")
        width = max(ref.probs.shape[1], other.probs.shape[1])
        pa = np.pad(ref.probs[a], ((0, 0), (0, width - ref.probs.shape[1])))
        pb = np.pad(other.probs[b], ((0, 0), (0, width - other.probs.shape[1])))
        ta, tb = _per_example(pa, ref.gold[a]), _per_example(pb, other.gold[b])
        ba, bb = _bins(ta["conf"], num_bins), _bins(tb["conf"], num_bins)
        full = np.ones((1, len(common)))
        point = _metrics(ta, ba, full, num_bins)[0] - _metrics(tb, bb, full, num_bins)[0]
        idx = _resamples(common, num_resamples, seed)
        diffs = _metrics(ta, ba, idx, num_bins) - _metrics(tb, bb, idx, num_bins)
        row = {"reference": reference, "method": name, "n": len(common),
               "num_tasks": len({k[1] for k in common}), "seeds": sorted({k[0] for k in common})}
        for j, metric in enumerate(METRICS):
            lo, hi = _ci(diffs[:, j])
            row[metric] = {"diff": float(point[j]), "ci95": [lo, hi], "se": float(diffs[:, j].std(ddof=1)),
                           "excludes_zero": bool(lo > 0 or hi < 0)}
        row["across_seeds"] = _across_seeds(common, ta, tb, ba, bb, num_bins)
        out.append(row)
    return out


def summarize(preds: dict[str, Predictions], num_bins: int = 15, num_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Each method's pooled metrics with their bootstrap standard error and the ECE floor."""
    out = []
    for name, p in preds.items():
        terms = _per_example(p.probs, p.gold)
        bins = _bins(terms["conf"], num_bins)
        point = _metrics(terms, bins, np.ones((1, len(p.keys))), num_bins)[0]
        boot = _metrics(terms, bins, _resamples(p.keys, num_resamples, seed), num_bins)
        row = {"method": name, "n": len(p.keys), "num_tasks": len({k[1] for k in p.keys}),
               "seeds": sorted({k[0] for k in p.keys}),
               "ece_floor": ece_floor(torch.from_numpy(p.probs), num_bins, seed=seed)}
        for j, metric in enumerate(METRICS):
            row[metric] = {"value": float(point[j]), "se": float(boot[:, j].std(ddof=1))}
        out.append(row)
    return out


def _cell(d: dict) -> str:
    lo, hi = d["ci95"]
    mark = " *" if d["excludes_zero"] else ""
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def format_comparison(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`paired_comparison` rows."""
    if not rows:
        return "(nothing to compare: one method only)\n"
    ref = rows[0]["reference"]
    lines = [f"| {ref} − method | n | tasks | Δ accuracy ↑ | Δ NLL ↓ | Δ Brier ↓ | Δ ECE ↓ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['n']} | {r['num_tasks']} | " + " | ".join(_cell(r[m]) for m in METRICS) + " |")
    lines.append("")
    lines.append(f"Paired differences ({ref} minus each method) of pooled metrics on identical query examples, "
                 "95% percentile intervals from a two-level bootstrap (tasks, then examples within task and "
                 "seed; seeds combined); * marks an interval excluding 0. Δ accuracy > 0 and Δ NLL/Brier/ECE < 0 "
                 f"favour {ref}.")
    seeded = [r for r in rows if r.get("across_seeds")]
    if seeded:
        lines += ["", f"Across seeds (each seed its own training run and split): {ref} − method per seed → mean "
                      "[95% Student-t interval over seeds]", "",
                  f"| {ref} − method | seeds | Δ accuracy ↑ | Δ NLL ↓ | Δ Brier ↓ | Δ ECE ↓ |", "|---|---|---|---|---|---|"]
        for r in seeded:
            a = r["across_seeds"]
            lines.append(f"| {r['method']} | {len(a['seeds'])} | " + " | ".join(_seed_cell(a[m]) for m in METRICS) + " |")
        lines += ["", "The bootstrap above holds each trained model fixed; this interval also contains the spread "
                      "between training runs (wide with few seeds)."]
    return "\n".join(lines) + "\n"


def _seed_cell(d: dict) -> str:
    lo, hi = d["ci95"]
    mark = " *" if d["excludes_zero"] else ""
    per = " / ".join(f"{v:+.3f}" for v in d["per_seed"])
    return f"{per} → {d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def format_summary(rows: Sequence[dict], num_bins: int = 15) -> str:
    """Markdown table of :func:`summarize` rows (value ± bootstrap standard error)."""
    lines = ["| method | accuracy ↑ | NLL ↓ | Brier ↓ | ECE ↓ | ECE floor | n | tasks | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[m]['value']:.3f} ± {r[m]['se']:.3f}" for m in METRICS)
        lines.append(f"| {r['method']} | {cells} | {r['ece_floor']:.3f} | {r['n']} | {r['num_tasks']} | {len(r['seeds'])} |")
    lines.append("")
    lines.append(f"Pooled over all query examples of all test tasks and seeds; ± is the bootstrap standard error "
                 f"(tasks, then examples). ECE: top-label, {num_bins} equal-width bins, as a fraction; the ECE floor "
                 "is the expected ECE of a perfectly calibrated predictor with the same confidences and n.")
    return "\n".join(lines) + "\n"
