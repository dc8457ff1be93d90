"""The regimes where calibration is at stake: every per-task method across shots and inner-step budgets.

Two curves of evaluation regimes (k support examples, K inner steps), one trained state per method:

* **shots curve** — k ∈ {1, 2, 4, 8, 16} at K = the config's ``num_inner_steps``;
* **budget curve** — K ∈ {5, 20, 50} at k = 16 (the many-step regime in which the Bayesian-LoRA papers
  measured MLE LoRA's overconfidence).

A regime on both curves (k = 16 at the config's K) is evaluated once. Each distinct training runs once
into ``out/runs/<method>`` (:data:`~abmll_pyro.methods.SAME_TRAINING`: ``lora-ts``, ``laplace-lora``,
``blob``, ``ensemble-lora`` evaluate ``lora``'s checkpoint), or is taken from ``runs[method]``; methods
without training (``bayes-lora``) are built. Within a regime every method sees the same support and
query examples (:func:`~abmll_pyro.train.episodes.test_splits`, from the seed alone; the query set of
k shots is the permutation's next ``eval_query_size`` examples, so it shifts slightly between regimes).

Writes, under ``out``:

* ``<regime>/<method>/results.json`` + ``predictions.jsonl`` (a finished one is reused: a second call resumes);
* ``<regime>/table.md``, ``comparison.md`` / ``.json`` (pooled metrics ± bootstrap SE; ``reference`` −
  each method with 95% two-level bootstrap intervals, :func:`~abmll_pyro.train.benchmark.write_comparison`),
  ``cost.md`` and ``regime.md`` (quality, epistemic share and cost in one table);
* ``regimes.json`` (the summary), ``tables.md`` (every ``regime.md``), and the plots
  ``{nll,ece}_vs_shots.png``, ``{nll,ece}_vs_budget.png`` (error bars: ±1.96 bootstrap SE).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from abmll_pyro.data.trunk import shared_trunk_dir
from abmll_pyro.methods import SAME_TRAINING, TRAINABLE
from abmll_pyro.train.benchmark import write_comparison
from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.cost import cost_table
from abmll_pyro.train.faults import absolute_sources
from abmll_pyro.train.run import RESULTS, evaluate_run, load_run_config, train_run, wants_cpu

__all__ = ["Regime", "format_verdicts", "SHOTS", "BUDGETS", "BUDGET_SHOTS", "regimes", "run_regimes", "verdict", "format_regime"]

SHOTS = (1, 2, 4, 8, 16)
BUDGETS = (5, 20, 50)
BUDGET_SHOTS = 16
#: settings a reused run must share with the study's config (the rest are evaluation settings)
METRICS = ("accuracy", "nll", "brier", "ece")
LABELS = {"accuracy": "accuracy", "nll": "NLL", "brier": "Brier", "ece": "ECE"}
_SAME = ("model", "tasks", "rank", "lora_alpha", "last_layers", "seed", "kl_beta", "prior", "guide")


@dataclass(frozen=True)
class Regime:
    shots: int
    num_inner_steps: int

    @property
    def name(self) -> str:
        return f"k{self.shots}-K{self.num_inner_steps}"


def regimes(shots: Sequence[int], budgets: Sequence[int], num_inner_steps: int,
            budget_shots: int = BUDGET_SHOTS) -> list[Regime]:
    """The shots curve at ``num_inner_steps``, then the budget curve at ``budget_shots``, each regime once."""
    out = [Regime(k, num_inner_steps) for k in shots] + [Regime(budget_shots, K) for K in budgets]
    return list(dict.fromkeys(out))


def verdict(row: dict, metric: str) -> str:
    """``"beats"``, ``"loses"`` or ``"level"`` for the reference in a paired-comparison row: an interval
    excluding 0 resolves it (accuracy: higher is better; NLL, Brier, ECE: lower)."""
    d = row[metric]
    if not d["excludes_zero"]:
        return "level"
    better = d["diff"] > 0 if metric == "accuracy" else d["diff"] < 0
    return "beats" if better else "loses"


def _check_reused(config: RunConfig, run_dir: Path) -> None:
    saved, config = absolute_sources(load_run_config(run_dir)), absolute_sources(config)
    diff = {k: (getattr(saved, k), getattr(config, k)) for k in _SAME if getattr(saved, k) != getattr(config, k)}
    if diff:
        raise ValueError(f"run {run_dir} was trained with other settings than the study's: "
                         + ", ".join(f"{k}={a!r} (study: {b!r})" for k, (a, b) in diff.items()))


def _trained(base: RunConfig, methods: Sequence[str], out: Path, runs: Mapping[str, Path],
             progress: bool) -> dict[str, Path | None]:
    """Each method's run directory (None: untrained), training each distinct training once."""
    found: dict[str, Path | None] = {}
    for name in methods:
        source = SAME_TRAINING.get(name, name)
        run = runs.get(name) or runs.get(source)
        if run is not None:
            _check_reused(base, Path(run))
        elif name in TRAINABLE:
            run = out / "runs" / source
            if not (run / RESULTS).exists():
                resume = (run / "checkpoints" / "latest.json").exists()
                train_run(base.updated(method=source), run, resume=resume, progress=progress)
        found[name] = None if run is None else Path(run)
    return found


def format_verdicts(result: dict) -> str:
    """Markdown: per regime, for each compared method, the metrics on which the reference beats it,
    loses to it, or is level with it (:func:`verdict`)."""
    lines = []
    for regime in result["regimes"].values():
        ref, parts = regime["reference"], []
        for method, row in regime["paired"].items():
            by = {v: [LABELS[m] for m in METRICS if row[m]["verdict"] == v] for v in ("beats", "loses", "level")}
            said = "level on all four" if len(by["level"]) == len(METRICS) else "; ".join(
                f"{v} on {', '.join(ms)}" for v, ms in by.items() if ms)
            parts.append(f"{method} ({said})")
        lines.append(f"- k = {regime['shots']}, K = {regime['num_inner_steps']}: {ref} against " + ", ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def _epistemic_share(result: dict) -> float:
    pooled = result["pooled"]
    return pooled["epistemic"] / pooled["entropy"] if pooled.get("entropy") else 0.0


def format_regime(regime: Regime, summary: Sequence[dict], results: Mapping[str, dict]) -> str:
    """Markdown: one row per method, pooled quality ± bootstrap SE, epistemic share and cost."""
    lines = [f"**k = {regime.shots} shots, K = {regime.num_inner_steps} inner steps**", "",
             "| method | accuracy ↑ | NLL ↓ | Brier ↓ | ECE ↓ (floor) | epistemic share | adapt s/task | "
             "predict ms/query | peak MiB | extra values/task |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        r = results[row["method"]]
        cost = r.get("cost", {})
        cells = [f"{row[m]['value']:.3f} ± {row[m]['se']:.3f}" for m in ("accuracy", "nll", "brier")]
        cells.append(f"{row['ece']['value']:.3f} ± {row['ece']['se']:.3f} ({row['ece_floor']:.3f})")
        cells.append(f"{_epistemic_share(r):.2g}")
        cells += [f"{cost.get('adapt_s_per_task', float('nan')):.2f}",
                  f"{1e3 * cost.get('predict_s_per_query', float('nan')):.1f}",
                  f"{cost.get('eval_peak_memory_mb', float('nan')):.0f}",
                  f"{cost.get('adapted_values_per_task', float('nan')):,.0f}"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _evaluate_regime(base: RunConfig, regime: Regime, methods: Sequence[str], trained: Mapping[str, Path | None],
                     out: Path, reference: str, progress: bool) -> dict:
    folder = out / regime.name
    results = {}
    for name in methods:
        path = folder / name / RESULTS
        if path.exists():
            results[name] = json.loads(path.read_text())  # finished by an earlier call
            continue
        config = base.updated(method=name, shots=regime.shots, num_inner_steps=regime.num_inner_steps)
        results[name] = evaluate_run(config, trained[name], progress=progress, out=path)
        if progress:
            p = results[name]["pooled"]
            print(f"regimes: {regime.name} {name}: accuracy {p['accuracy']:.3f} nll {p['nll']:.3f} "
                  f"ece {p['ece']:.3f} ({results[name]['wall_time_s']:.0f} s)", flush=True)
    ref = reference if reference in methods else methods[0]
    write_comparison(folder, [folder / m for m in methods], ref, base.ece_bins, seed=base.seed)
    compared = json.loads((folder / "comparison.json").read_text())
    summary = compared["summary"]
    atomic_write_text(folder / "cost.md", cost_table([results[m] for m in methods]))
    atomic_write_text(folder / "regime.md", format_regime(regime, summary, results))
    paired = {r["method"]: {m: {"diff": r[m]["diff"], "ci95": r[m]["ci95"], "verdict": verdict(r, m)}
                            for m in ("accuracy", "nll", "brier", "ece")} for r in compared["paired"]}
    return {"shots": regime.shots, "num_inner_steps": regime.num_inner_steps, "reference": ref,
            "methods": {row["method"]: {**{m: row[m] for m in ("accuracy", "nll", "brier", "ece")},
                                        "ece_floor": row["ece_floor"], "n": row["n"],
                                        "epistemic_share": _epistemic_share(results[row["method"]]),
                                        "cost": results[row["method"]].get("cost", {}),
                                        "wall_time_s": results[row["method"]]["wall_time_s"]} for row in summary},
            "paired": paired}


def run_regimes(base: RunConfig, out: str | Path, methods: Sequence[str], shots: Sequence[int] = SHOTS,
                budgets: Sequence[int] = BUDGETS, runs: Mapping[str, Path] | None = None, progress: bool = True,
                reference: str = "abmll", budget_shots: int = BUDGET_SHOTS) -> dict:
    """Train (or reuse), evaluate every method at every regime, compare, tabulate and plot; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {k: Path(v) for k, v in (runs or {}).items()}
    unknown = sorted(set(runs) - set(methods) - {SAME_TRAINING.get(m, m) for m in methods})
    if unknown:
        raise ValueError(f"runs names methods {unknown} not among methods {list(methods)} (or their trainings)")
    plan = regimes(shots, budgets, base.num_inner_steps, budget_shots)
    trunk = out / "trunk-cache" if base.trunk_cache and wants_cpu(base) else None
    result = {"methods": list(methods), "shots": list(shots), "budgets": list(budgets),
              "num_inner_steps": base.num_inner_steps, "budget_shots": budget_shots, "regimes": {},
              "config": base.to_dict()}
    with shared_trunk_dir(trunk):  # every evaluation sees the same examples: the frozen blocks run once each
        trained = _trained(base, methods, out, runs, progress)
        result["runs"] = {m: None if p is None else str(p) for m, p in trained.items()}
        for regime in plan:
            result["regimes"][regime.name] = _evaluate_regime(base, regime, methods, trained, out, reference, progress)
            atomic_write_text(out / "regimes.json", json.dumps(result, indent=1) + "\n")  # after each regime
    if trunk is not None:
        shutil.rmtree(trunk, ignore_errors=True)
    atomic_write_text(out / "tables.md", "\n".join((out / r.name / "regime.md").read_text() for r in plan))
    atomic_write_text(out / "verdicts.md", format_verdicts(result))
    _plots(result, out)
    return result


def _curve(result: dict, regimes_: Sequence[tuple[float, str]], metric: str):
    names = result["methods"]
    ys = {m: [result["regimes"][r]["methods"][m][metric]["value"] for _, r in regimes_] for m in names}
    errs = {m: [1.96 * result["regimes"][r]["methods"][m][metric]["se"] for _, r in regimes_] for m in names}
    return [x for x, _ in regimes_], ys, errs


def _plots(result: dict, out: Path) -> None:
    try:
        from abmll_pyro.eval.plots import plot_metric_curve
    except ImportError as err:  # matplotlib missing: numbers only
        import warnings

        warnings.warn(f"plots skipped: {err}")
        return
    K, k16 = result["num_inner_steps"], result["budget_shots"]
    curves = {"shots": ([(k, Regime(k, K).name) for k in result["shots"]], f"support examples k (K = {K})"),
              "budget": ([(b, Regime(k16, b).name) for b in result["budgets"]], f"inner steps K (k = {k16})")}
    for key, (points, xlabel) in curves.items():
        if len(points) < 1:
            continue
        for metric, label in (("nll", "NLL (nats)"), ("ece", "ECE (fraction, 15 bins)")):
            xs, ys, errs = _curve(result, points, metric)
            plot_metric_curve(xs, ys, xlabel, label, out / f"{metric}_vs_{key}.png", yerr=errs)
