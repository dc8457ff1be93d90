"""Headroom of a task: zero-shot accuracy vs per-task Regular LoRA fitted on k shots.

For a task, a seeded split gives ``shots`` support and up to ``query_size`` query examples. Under a
score reduction r (``sum``/``mean``/``char``, the runs' ``score_reduction``; see
:class:`~abmll_pyro.models.likelihoods.OptionLikelihood`):

* zero-shot: ŷ = argmax_o score_r(o | x) of the base model;
* LoRA: plain factors (the adapter's own start: A Kaiming-uniform, B = 0, the same for every task) trained by ``steps`` full-batch Adam steps at ``lr`` on
  the support cross-entropy  −(1/k) Σ log softmax_y score_r(· | x; W0 + (α/r) B A), then ŷ as above.

gain = acc_lora − acc_zero on the same query examples; its 95% interval is the paired bootstrap: draw
query indices with replacement ``num_boot`` times, take the 2.5/97.5% quantiles of the mean of
``correct_lora − correct_zero`` over the draw. One JSON per task (so a long run resumes).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.data.tasks import Task, split_task
from abmll_pyro.infer.inner import inner_loop
from abmll_pyro.lora.adapter import BayesLoRA
from abmll_pyro.methods.base import LoRAFactors, option_logits, option_nll
from abmll_pyro.models.likelihoods import OptionLikelihood

__all__ = ["HeadroomConfig", "paired_bootstrap", "task_headroom", "run_headroom", "headroom_table", "headroom_table_wide",
           "headroom_summary", "headroom_tasks"]


@dataclass(frozen=True)
class HeadroomConfig:
    shots: int = 16
    query_size: int = 64
    steps: int = 30
    lr: float = 3e-3
    reductions: tuple[str, ...] = ("char", "sum")  # the runs' score_reduction default, and the sum
    max_length: int | None = 256
    num_boot: int = 2000
    seed: int = 0
    drop_long_examples: bool = False  # recorded here; the caller filters the tasks (train.setup.fit_tasks)


def paired_bootstrap(diff: Tensor, num_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of mean(diff) by resampling its entries (``diff``: ``[n]``, paired differences)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (num_boot, len(diff)), generator=g)
    means = diff.double()[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def _correct(scores: Tensor, batch: OptionBatch) -> Tensor:
    return (scores.argmax(-1).cpu() == batch.gold.cpu()).float()


def _task_seed(name: str, seed: int) -> int:
    return (int(hashlib.sha256(name.encode()).hexdigest(), 16) + seed) % 2**31


def task_headroom(adapter: BayesLoRA, tokenizer: Any, task: Task, config: HeadroomConfig) -> dict:
    """Zero-shot and LoRA accuracy, gain and its paired-bootstrap 95% CI, per reduction (module doc)."""
    seed = _task_seed(task.name, config.seed)
    split = split_task(task, config.shots, config.query_size, torch.Generator().manual_seed(seed),
                       allow_smaller_query=True)
    support = encode_options(tokenizer, split.support, max_length=config.max_length, name=f"{task.name} support")
    query = encode_options(tokenizer, split.query, max_length=config.max_length, name=f"{task.name} query")
    options = max(len(ex.options) for ex in task.examples)
    result = {"task": task.name, "shots": len(split.support), "query": len(split.query),
              "chance": sum(1 / len(ex.options) for ex in split.query) / len(split.query),
              "num_options": options, "config": asdict(config), "reductions": {}}
    for reduction in config.reductions:
        lik, started = OptionLikelihood(reduction), time.perf_counter()
        start = {k: v.detach().clone() for k, v in LoRAFactors(adapter).params().items()}  # B = 0: ΔW = 0
        with torch.no_grad():
            # The base model, scored through the start factors: ΔW = (α/r)·B·A is exactly 0 (B = 0) and
            # W + 0 = W, so the scores are the base model's bit for bit, but the pass runs with the
            # adapted blocks live, so a trunk cache fills the entries the LoRA query pass reads back.
            zero = _correct(option_logits(adapter, start, query, lik), query)

        def loss_fn(p: dict[str, Tensor]) -> Tensor:
            return option_nll(adapter, p, support, lik)

        fitted = inner_loop(loss_fn, start, config.steps, config.lr, "adam")
        with torch.no_grad():
            support_loss = float(loss_fn(fitted))
            lora = _correct(option_logits(adapter, fitted, query, lik), query)
        lo, hi = paired_bootstrap(lora - zero, config.num_boot, seed)
        result["reductions"][reduction] = {
            "zero_shot": float(zero.mean()), "lora": float(lora.mean()), "gain": float((lora - zero).mean()),
            "gain_ci95": [lo, hi], "support_loss_end": support_loss, "seconds": time.perf_counter() - started,
        }
    return result


def _settings(config: dict) -> dict:
    """A JSON's settings without its reductions; keys added since it was written take their defaults."""
    return {k: v for k, v in {**asdict(HeadroomConfig()), **config}.items() if k != "reductions"}


def _write(path: Path, result: dict) -> dict:
    text = json.dumps(result, indent=1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return json.loads(text)  # as a resumed run reads it back


def run_headroom(adapter: BayesLoRA, tokenizer: Any, tasks: Iterable[tuple[str, Task]], out: Path,
                 config: HeadroomConfig, log=print, skipped: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    """Every ``(split, task)``: its JSON ``<out>/<task>.json`` if already there (resume), else measured.

    A JSON that lacks some of ``config.reductions`` gets only those measured and merged in (exact: the
    split, the zero-shot pass and the LoRA fit of one reduction do not depend on any other reduction);
    its other settings must equal ``config``'s, else ``ValueError``. ``skipped``: task name ->
    (split, reason) for tasks that cannot be measured at these settings (e.g. too few examples fit
    ``max_length``); each gets a JSON with ``"skipped": reason`` and no reductions, shown by the table.
    """
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, (split_name, reason) in (skipped or {}).items():
        path = out / f"{name}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        results.append(_write(path, {"split": split_name, "task": name, "skipped": reason,
                                     "config": asdict(config), "reductions": {}}))
        log(f"{name}: skipped ({reason})")
    for split_name, task in tasks:
        path = out / f"{task.name}.json"
        old = json.loads(path.read_text()) if path.exists() else None
        missing = tuple(r for r in config.reductions if old is None or r not in old["reductions"])
        if old is not None and old["config"] and _settings(old["config"]) != _settings(asdict(config)):
            raise ValueError(f"{path} was measured with other settings: {_settings(old['config'])}, "
                             f"not {_settings(asdict(config))}")
        if not missing or (old is not None and old.get("skipped")):
            results.append(old)
            continue
        new = {"split": split_name, **task_headroom(adapter, tokenizer, task, replace(config, reductions=missing))}
        if old is not None:
            if old["split"] != split_name:
                raise ValueError(f"{path} was measured as a {old['split']} task, not {split_name}")
            new["reductions"] = {**old["reductions"], **new["reductions"]}
            new["config"]["reductions"] = list(new["reductions"])
        result = _write(path, new)
        log(f"{task.name}: " + ", ".join(
            f"{r} zero {v['zero_shot']:.3f} lora {v['lora']:.3f} gain {v['gain']:+.3f} "
            f"(support loss {v['support_loss_end']:.1e}, {v['seconds']:.0f} s)"
            for r, v in result["reductions"].items() if r in missing))
        results.append(result)
    return results


_SPLIT_ORDER = {"test": 0, "dev": 1, "train": 2}


def _by_split(r: dict) -> tuple[int, str]:
    return _SPLIT_ORDER.get(r["split"], 3), r["task"]


def _cells(v: dict, min_gain: float) -> list[str]:
    """Zero-shot, LoRA and "gain [95% CI]" of one reduction's result (``*``: gain ≥ ``min_gain``)."""
    lo, hi = v["gain_ci95"]
    mark = " *" if v["gain"] >= min_gain else ""
    return [f"{v['zero_shot']:.3f}", f"{v['lora']:.3f}", f"{v['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"]


def headroom_table(results: list[dict], reduction: str, min_gain: float = 0.05) -> str:
    """A markdown table (one row per task, then the means) for one reduction; ``*`` marks learnable
    headroom: gain ≥ ``min_gain``."""
    rows = ["| split | task | options | n query | zero-shot | LoRA | gain [95% CI] |",
            "|---|---|---|---|---|---|---|"]
    kept = [r for r in results if reduction in r["reductions"]]
    shown = kept + [r for r in results if r.get("skipped")]
    for r in sorted(shown, key=_by_split):
        if r.get("skipped"):
            rows.append(f"| {r['split']} | {r['task']} | | 0 | skipped: {r['skipped']} | | |")
            continue
        rows.append(f"| {r['split']} | {r['task']} | {r['num_options']} | {r['query']} | "
                    + " | ".join(_cells(r["reductions"][reduction], min_gain)) + " |")
    if kept:
        mean = lambda key: sum(r["reductions"][reduction][key] for r in kept) / len(kept)
        wins = sum(r["reductions"][reduction]["gain"] >= min_gain for r in kept)
        sure = sum(r["reductions"][reduction]["gain_ci95"][0] > 0 for r in kept)
        rows.append(f"| | **mean of {len(kept)}** | | | {mean('zero_shot'):.3f} | {mean('lora'):.3f} | "
                    f"{mean('gain'):+.3f} ({wins}/{len(kept)} with gain ≥ {min_gain:.2f}; "
                    f"{sure}/{len(kept)} with CI lower bound > 0) |")
    return "\n".join(rows)


def headroom_table_wide(results: list[dict], reductions: Iterable[str], min_gain: float = 0.05) -> str:
    """One markdown row per task with zero-shot, LoRA and gain [95% CI] for each reduction side by side
    (``*``: gain ≥ ``min_gain``; "—": not measured under that reduction); skipped tasks show why."""
    reductions = list(reductions)
    head = "| split | task | options | n query | " + " | ".join(
        f"{r}: zero-shot | {r}: LoRA | {r}: gain [95% CI]" for r in reductions) + " |"
    rows = [head, "|" + "---|" * (4 + 3 * len(reductions))]
    for r in sorted(results, key=_by_split):
        if r.get("skipped"):
            rows.append(f"| {r['split']} | {r['task']} | | 0 | skipped: {r['skipped']} |" + " |" * (3 * len(reductions) - 1))
            continue
        cells = []
        for red in reductions:
            v = r["reductions"].get(red)
            cells += ["—", "—", "—"] if v is None else _cells(v, min_gain)
        rows.append(f"| {r['split']} | {r['task']} | {r['num_options']} | {r['query']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def headroom_summary(results: list[dict], reductions: Iterable[str], min_gain: float = 0.05) -> str:
    """One markdown row per (reduction, split): tasks measured and skipped, mean zero-shot, LoRA and gain,
    how many tasks gain ≥ ``min_gain``, have a CI lower bound above 0 or lose ≥ ``min_gain``, the median
    final support loss and the core-minutes spent (the results' ``seconds``)."""
    rows = ["| reduction | split | tasks measured | skipped | mean zero-shot | mean LoRA | mean gain | "
            f"gain ≥ {min_gain:.2f} | CI > 0 | loses ≥ {min_gain:.2f} | support loss median | core-minutes |",
            "|" + "---|" * 12]
    for red in reductions:
        for split in sorted({r["split"] for r in results}, key=lambda s: _SPLIT_ORDER.get(s, 3)):
            values = [r["reductions"][red] for r in results if r["split"] == split and red in r.get("reductions", {})]
            if not values:
                continue
            skipped = sum(1 for r in results if r["split"] == split and r.get("skipped"))
            gains = [v["gain"] for v in values]
            mean = lambda key: statistics.fmean(v[key] for v in values)
            rows.append(f"| `{red}` | {split} | {len(values)} | {skipped} | {mean('zero_shot'):.3f} | {mean('lora'):.3f} | "
                        f"{statistics.fmean(gains):+.3f} | {sum(g >= min_gain for g in gains)} | "
                        f"{sum(v['gain_ci95'][0] > 0 for v in values)} | {sum(g <= -min_gain for g in gains)} | "
                        f"{statistics.median(v['support_loss_end'] for v in values):.3f} | "
                        f"{sum(v['seconds'] for v in values) / 60:.0f} |")
    return "\n".join(rows)


def headroom_tasks(results: list[dict], reduction: str, split: str, expected: Iterable[str],
                   min_gain: float = 0.05) -> list[str]:
    """Names of the ``split`` tasks with learnable headroom (gain ≥ ``min_gain``) under ``reduction``,
    sorted. ``expected``: every task name of that split; ``ValueError`` if any lacks a measurement
    (a subset chosen from part of a split would silently shrink). A task recorded as skipped counts
    as measured, without headroom."""
    done = {r["task"]: r["reductions"][reduction] for r in results
            if r["split"] == split and reduction in r["reductions"]}
    done.update({r["task"]: {"gain": float("-inf")} for r in results if r["split"] == split and r.get("skipped")})
    missing = sorted(set(expected) - set(done))
    if missing:
        raise ValueError(f"{len(missing)} {split} task(s) not measured under {reduction!r}: {missing}")
    return sorted(name for name in expected if done[name]["gain"] >= min_gain)
