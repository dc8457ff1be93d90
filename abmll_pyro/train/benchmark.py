"""Every method on the same splits, shots, budgets and seeds; tables, paired comparisons and plots.

``run_benchmark`` runs each (method, seed) into ``<out>/runs/<method>-seed<k>/`` (a finished run, one
with ``results.json``, is reused, so an interrupted benchmark continues where it stopped), then writes

* ``<out>/results.json`` — the list of run results;
* ``<out>/table.md`` — each method's pooled accuracy, NLL, Brier and ECE over all query examples of all
  seeds, ± the bootstrap standard error, with the ECE floor (:func:`~abmll_pyro.eval.compare.summarize`);
* ``<out>/comparison.md`` / ``comparison.json`` — paired differences against the reference method
  (``abmll`` when it ran) with 95% bootstrap CIs (:func:`~abmll_pyro.eval.compare.paired_comparison`);
* ``<out>/reliability-<method>.png`` — reliability diagrams (test examples of all seeds pooled);
* ``<out>/cost.md`` — each method's test-time cost: adaptation seconds per task, prediction
  milliseconds per query, peak memory, trained and per-task adapted values (:mod:`~abmll_pyro.train.cost`).

On CPU the runs share one on-disk cache of the frozen trunk's hidden states (``<out>/trunk-cache`` by
default, deleted once every run has finished; :mod:`~abmll_pyro.data.trunk`): every method of every seed sees
the same examples, so the blocks below the adapted ones run once per example for the whole benchmark.
Entries are computed one row at a time, so no run's results depend on which run filled the cache or on
``jobs``.

A method whose training is exactly another's (:data:`~abmll_pyro.methods.SAME_TRAINING`: ``lora-ts``
trains as ``lora``) is evaluated from that method's checkpoint instead of being trained again.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.trunk import TRUNK_DIR_ENV, shared_trunk_dir
from ..eval.compare import format_comparison, format_summary, load_predictions, paired_comparison, summarize
from ..eval.metrics import ReliabilityDiagram
from ..methods import SAME_TRAINING, TRAINABLE
from .checkpoint import atomic_write_text
from .config import RunConfig
from .cost import cost_table
from .distributed import is_main_process, main_writes, wait_for_everyone, world_size
from .outputs import TEMPORARIES, check_output_dir, mark_output, marker_kind
from .results import validate_result
from .run import CONFIG, RESULTS, evaluate_run, train_run, wants_cpu

__all__ = ["AUTO_TRUNK", "run_benchmark", "format_table", "pooled_diagram", "write_comparison"]


AUTO_TRUNK = "auto"  # run_benchmark's default trunk folder: <out>/trunk-cache, deleted at the end


def _folder_size(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*.pt") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files)


def _run_one(config: RunConfig, run_dir: Path, progress: bool, trained_by: Path | None = None) -> dict:
    done = run_dir / RESULTS
    if done.exists():
        return validate_result(json.loads(done.read_text()))
    if trained_by is not None:  # the same training ran already: evaluate its checkpoint with this method
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():  # one writer under torchrun / accelerate launch
            atomic_write_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
        result = evaluate_run(config, trained_by, progress=progress, out=done, split=config.eval_split)
        if is_main_process():
            (run_dir / "log.txt").write_text(f"{config.method}: trained as {trained_by} (same training); "
                                             f"evaluated in {result['wall_time_s']:.1f} s\n")
        return result
    if config.method in TRAINABLE:
        resume = (run_dir / CONFIG).exists() and (run_dir / "checkpoints" / "latest.json").exists()
        return train_run(config, run_dir, resume=resume, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        atomic_write_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
    result = evaluate_run(config, None, progress=progress, out=done, split=config.eval_split)
    if is_main_process():
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


def data_line(results: Sequence[dict]) -> str:
    """One line naming the task data every run saw: the source and its content fingerprint (two results
    with the same fingerprint saw the same task files and split), or a warning when the runs disagree."""
    prints = sorted({str(r.get("data_fingerprint")) for r in results})
    source = results[0]["tasks"]
    if len(prints) == 1:
        return f"Data: {source}, content fingerprint {prints[0]} (every run)."
    return f"Data: {source}; WARNING: the runs saw different task data (fingerprints {', '.join(prints)})."


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
    bins = first["pooled"]["ece_bins"] if "pooled" in first else first["reliability"]["num_bins"]
    lines.append(f"Macro averages over {first['macro']['num_tasks']} unseen tasks ({first['macro']['n']} query examples "
                 f"per seed); ECE with {bins} equal-width bins of top-class confidence, per task then averaged "
                 f"(biased upward at small n per task: prefer table.md's pooled ECE); ± is the sample std over "
                 f"seeds. Model {first['model']}, tasks {first['tasks']}.")
    return "\n".join(lines) + "\n"


COMPARE_FILES = ("table.md", "comparison.md", "comparison.json", "target.md", "target.json", TEMPORARIES)


def _legacy_benchmark(folder: Path) -> bool:
    """A benchmark folder written before the output marker: its ``runs/`` holds only ``<method>-seed<N>`` runs."""
    runs = folder / "runs"
    return runs.is_dir() and all(re.fullmatch(r"[\w.-]+-seed\d+", p.name) for p in runs.iterdir())


def _mark(out: Path, kind: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) is None or kind == "benchmark":
        mark_output(out, kind)


def claim_benchmark_dir(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty or a benchmark folder (``overwrite``: any but ``/``); mark it."""
    check_output_dir(out, "benchmark", ("*",), overwrite, legacy=_legacy_benchmark)
    main_writes(_mark, out, "benchmark")


def claim_comparison_dir(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty, or holds only an earlier comparison's files (or is a benchmark folder)."""
    check_output_dir(out, ("compare", "benchmark"), COMPARE_FILES, overwrite,
                     legacy=lambda f: (f / "comparison.json").is_file())
    _mark(out, "compare")


def write_comparison(out: Path, paths: Sequence[Path], reference: str, num_bins: int, seed: int = 0,
                     num_resamples: int = 1000, names: Sequence[str] | None = None,
                     tasks: Sequence[str] | None = None) -> tuple[str, str]:
    """Write ``table.md`` (pooled metrics ± bootstrap SE) and ``comparison.md``/``.json`` (paired
    differences against ``reference``) for the predictions under ``paths``; return both texts."""
    preds = load_predictions(paths, names, tasks)
    summary = summarize(preds, num_bins, num_resamples, seed)
    rows = paired_comparison(preds, reference, num_bins, num_resamples, seed) if reference in preds else []
    Path(out).mkdir(parents=True, exist_ok=True)
    table, comparison = format_summary(summary, num_bins), format_comparison(rows)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "comparison.md", comparison)
    atomic_write_text(out / "comparison.json", json.dumps({"reference": reference, "ece_bins": num_bins,
                                                           "summary": summary, "paired": rows}, indent=1) + "\n")
    return table, comparison


@dataclass(frozen=True)
class _Job:
    config: RunConfig
    run_dir: Path
    trained_by: Path | None  # the run whose checkpoint this one evaluates (it must finish first)


def _jobs(base: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: Path) -> list[_Job]:
    """Every (method, seed) run in the sequential order: seeds outer, methods inner."""
    jobs = []
    for seed in seeds:
        for method in methods:
            source = SAME_TRAINING.get(method)
            trained_by = out / "runs" / f"{source}-seed{seed}" if source in methods else None
            if trained_by is not None and methods.index(source) > methods.index(method):
                trained_by = None  # its twin runs later: train here instead
            jobs.append(_Job(base.updated(method=method, seed=seed), out / "runs" / f"{method}-seed{seed}", trained_by))
    return jobs


def _trains(job: _Job) -> bool:
    from ..methods import TRAINABLE

    return job.config.method in TRAINABLE and job.trained_by is None


def _run_job(job: _Job) -> dict:
    """One run in a worker process (``--jobs``; the run sets the thread count from its config)."""
    return _run_one(job.config, job.run_dir, progress=False, trained_by=job.trained_by)


def _run_parallel(jobs: Sequence[_Job], workers: int, progress: bool) -> list[dict]:
    """Run ``jobs`` in up to ``workers`` processes at once, the runs that train first, a run that
    evaluates another's checkpoint only after that run finished; results in ``jobs``' order. A failed run does not stop the others
    (their finished work is kept); the first failure is raised once every run that could go on is done."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: dict[int, dict] = {}
    failed: dict[Path, BaseException] = {}
    # runs that train start first (they are the long ones; the evaluate-only runs fill in around them),
    # otherwise in the sequential order; results come back in ``jobs``' order whatever the start order
    waiting = sorted(range(len(jobs)), key=lambda i: (not _trains(jobs[i]), i))
    done_dirs: set[Path] = set()
    running = {}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no torch state shared
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        try:
            while waiting or running:
                for i in list(waiting):
                    dep = jobs[i].trained_by
                    if dep is not None and dep in failed:
                        failed[jobs[i].run_dir] = RuntimeError(f"not run: {dep.name} failed")
                        waiting.remove(i)
                    elif (dep is None or dep in done_dirs) and len(running) < workers:
                        # submitted only into a free worker, never queued in the pool: a run whose
                        # dependency just finished (lora-ts) starts before the runs listed after it
                        running[pool.submit(_run_job, jobs[i])] = i
                        waiting.remove(i)
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    try:
                        results[i] = future.result()
                        done_dirs.add(jobs[i].run_dir)
                        note = f"{results[i]['wall_time_s']:.0f} s"
                    except Exception as err:  # noqa: BLE001 - reported below, after the other runs
                        failed[jobs[i].run_dir] = err
                        note = f"FAILED: {err.__class__.__name__}: {err}"
                    if progress:
                        print(f"benchmark: {jobs[i].run_dir.name} {note} ({len(results)}/{len(jobs)} done)",
                              file=sys.stderr, flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if failed:
        if len(failed) > 1:
            print(f"benchmark: {len(failed)} runs failed or were not run: " + ", ".join(d.name for d in failed),
                  file=sys.stderr, flush=True)
        raise failed[next(j.run_dir for j in jobs if j.run_dir in failed)]
    return [results[i] for i in range(len(jobs))]


def run_benchmark(base: RunConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
                  progress: bool = True, reference: str = "abmll", jobs: int = 1,
                  trunk_dir: str | Path | None = AUTO_TRUNK) -> tuple[list[dict], str]:
    """Run every (method, seed); return the results and the printed text (table and comparison).

    ``jobs`` > 1 runs that many (method, seed) runs at once, each in its own process with the config's
    ``num_threads`` (a run that evaluates another's checkpoint, ``lora-ts``, waits for it). Every run
    seeds itself, so the results are those of ``jobs`` = 1; only the wall time changes.
    ``trunk_dir``: the folder the runs share the frozen trunk in; :data:`AUTO_TRUNK` (default):
    ``$ABMLL_TRUNK_DIR`` if set, else on CPU ``<out>/trunk-cache``, deleted after the last run finished
    (kept when a run failed, for the rerun), and on a GPU none; a path: kept; None: no shared folder
    (each run's own memory cache)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and world_size() > 1:
        raise ValueError(f"--jobs {jobs} runs separate processes itself: it cannot be combined with torchrun or "
                         f"accelerate launch (WORLD_SIZE={world_size()})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planned = _jobs(base, methods, seeds, out)
    owned = trunk_dir == AUTO_TRUNK and not os.environ.get(TRUNK_DIR_ENV)
    if trunk_dir == AUTO_TRUNK:  # on a GPU a batch-of-one trunk pass costs more than the batched one saves
        trunk_dir = os.environ.get(TRUNK_DIR_ENV) or (out / "trunk-cache" if wants_cpu(base) else None)
    with shared_trunk_dir(trunk_dir if base.trunk_cache else None) as folder:
        if jobs > 1:
            results = _run_parallel(planned, jobs, progress)
        else:
            results = [_run_one(j.config, j.run_dir, progress, j.trained_by) for j in planned]
    if folder is not None and folder.exists():
        wait_for_everyone()  # every rank done with the folder before it goes
        if is_main_process():
            count, size = _folder_size(folder)
            if owned:
                shutil.rmtree(folder, ignore_errors=True)
            if progress:
                print(f"benchmark: shared trunk cache {count} entries, {size / 2**20:.0f} MiB in {folder}"
                      f"{' (deleted)' if owned else ''}", file=sys.stderr, flush=True)
    if not is_main_process():  # one writer: the main process writes the summary files and plots
        return results, format_table(results)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1) + "\n")
    run_dirs = [out / "runs" / f"{r['method']}-seed{r['seed']}" for r in results]
    ref = reference if reference in methods else methods[0]
    table, comparison = write_comparison(out, run_dirs, ref, base.ece_bins)
    atomic_write_text(out / "macro_table.md", format_table(results))
    costs = cost_table(results)
    atomic_write_text(out / "cost.md", costs)
    table = data_line(results) + "\n\n" + table + "\n" + comparison + "\n" + costs
    try:
        from ..eval.plots import plot_reliability, plot_reliability_overlay

        floors = {row["method"]: row["ece_floor"]
                  for row in json.loads((out / "comparison.json").read_text())["summary"]}
        diagrams = {m: pooled_diagram([r for r in results if r["method"] == m])
                    for m in dict.fromkeys(r["method"] for r in results)}
        for method, diagram in diagrams.items():
            plot_reliability({method: diagram}, out / f"reliability-{method}.png", {method: floors.get(method)})
        plot_reliability_overlay(diagrams, out / "reliability-all.png", {m: floors.get(m) for m in diagrams})
    except ImportError as err:  # matplotlib is optional: the table still stands
        import warnings

        warnings.warn(f"reliability diagrams skipped: {err}")
    atomic_write_text(out / "benchmark.json", json.dumps({"methods": list(methods), "seeds": list(seeds),
                                                          "wall_time_s": time.perf_counter() - t0,
                                                          "runs_wall_time_s": sum(r["wall_time_s"] for r in results),
                                                          "jobs": jobs,
                                                          "config": base.to_dict()}, indent=1) + "\n")
    return results, table
