"""Every method on the same splits, shots, budgets and seeds; a table and reliability diagrams.

``run_benchmark`` runs each (method, seed) into ``<out>/runs/<method>-seed<k>/`` (a finished run, one
with ``results.json``, is reused, so an interrupted benchmark continues where it stopped), then writes
``<out>/results.json`` (the list of run results), ``<out>/table.md`` (mean ± std over seeds of the
macro metrics) and ``<out>/reliability-<method>.png`` (test examples of all seeds pooled).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from ..eval.metrics import ReliabilityDiagram
from ..methods import TRAINABLE
from .checkpoint import atomic_write_text
from .config import RunConfig
from .results import validate_result
from .run import CONFIG, RESULTS, evaluate_run, train_run

__all__ = ["run_benchmark", "format_table", "pooled_diagram"]


def _run_one(config: RunConfig, run_dir: Path, progress: bool) -> dict:
    done = run_dir / RESULTS
    if done.exists():
        return validate_result(json.loads(done.read_text()))
    if config.method in TRAINABLE:
        resume = (run_dir / CONFIG).exists() and (run_dir / "checkpoints" / "latest.json").exists()
        return train_run(config, run_dir, resume=resume, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
    result = evaluate_run(config, None, progress=progress, out=done)
    (run_dir / "log.txt").write_text(f"{config.method}: no training; evaluated in {result['wall_time_s']:.1f} s\n")
    return result


def pooled_diagram(results: Sequence[dict]) -> ReliabilityDiagram:
    """One reliability diagram from the per-bin sums of several runs."""
    rel = [r["reliability"] for r in results]
    bins = rel[0]["num_bins"]
    count = torch.tensor([sum(r["count"][b] for r in rel) for b in range(bins)], dtype=torch.long)
    conf = torch.tensor([sum(r["confidence_sum"][b] for r in rel) for b in range(bins)], dtype=torch.float64)
    corr = torch.tensor([sum(r["correct_sum"][b] for r in rel) for b in range(bins)], dtype=torch.float64)
    denom = count.to(torch.float64)
    nan = torch.full_like(denom, math.nan)
    full = count > 0
    return ReliabilityDiagram(edges=torch.arange(bins + 1, dtype=torch.float64) / bins,
                              confidence=torch.where(full, conf / denom.clamp(min=1), nan),
                              accuracy=torch.where(full, corr / denom.clamp(min=1), nan), count=count)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def format_table(results: Sequence[dict]) -> str:
    """Markdown: one row per method (in run order), macro metrics as mean ± sample std over seeds."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | accuracy ↑ | ECE ↓ | NLL ↓ | Brier ↓ | seeds | time/run (s) |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        cells = [_mean_std([r["macro"][k] for r in rs]) for k in ("accuracy", "ece", "nll", "brier")]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(rs)} | {statistics.mean(r['wall_time_s'] for r in rs):.0f} |")
    first = results[0]
    lines.append("")
    lines.append(f"Macro averages over {first['macro']['num_tasks']} unseen tasks ({first['macro']['n']} query examples "
                 f"per seed); ECE with 10 equal-width bins of top-class confidence, per task then averaged; "
                 f"± is the sample std over seeds. Model {first['model']}, tasks {first['tasks']}.")
    return "\n".join(lines) + "\n"


def run_benchmark(base: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
                  progress: bool = True) -> tuple[list[dict], str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for seed in seeds:
        for method in methods:
            config = base.updated(method=method, seed=seed)
            results.append(_run_one(config, out / "runs" / f"{method}-seed{seed}", progress))
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1) + "\n")
    table = format_table(results)
    atomic_write_text(out / "table.md", table)
    try:
        from ..eval.plots import plot_reliability

        for method in dict.fromkeys(r["method"] for r in results):
            plot_reliability({method: pooled_diagram([r for r in results if r["method"] == method])},
                             out / f"reliability-{method}.png")
    except ImportError as err:  # matplotlib is optional: the table still stands
        import warnings

        warnings.warn(f"reliability diagrams skipped: {err}")
    atomic_write_text(out / "benchmark.json", json.dumps({"methods": list(methods), "seeds": list(seeds),
                                                          "wall_time_s": time.perf_counter() - t0,
                                                          "config": base.to_dict()}, indent=1) + "\n")
    return results, table
