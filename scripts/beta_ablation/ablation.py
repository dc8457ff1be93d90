"""β ablation: ABMLL at kl_beta = 10^x on one preset, the pooled metrics and the posterior's width per β.

The driver (``run.py``) parses the preset and calls :func:`beta_ablation`, which writes
``beta_ablation.json`` and the plots ``beta_<metric>.png`` under its output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from scripts._common import plot, trained

__all__ = ["beta_ablation", "BETA_METRICS"]


def _last_metrics(run_dir: Path) -> dict:
    """The last line of a run's ``metrics.jsonl`` ({} if it has none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


BETA_METRICS = ("accuracy", "nll", "brier", "ece", "ece_floor", "epistemic", "spread")


def beta_ablation(base: RunConfig, out: Path, log10_betas: Sequence[float] = (0, -4, -8, -12, -16),
                  seeds: Sequence[int] = (0,), progress: bool = True, kl_gamma: float | None = None) -> dict:
    """ABMLL at kl_beta = 10^x, with kl_gamma = kl_beta (``kl_gamma=None``) or fixed: per β and seed the
    pooled accuracy, NLL, Brier, ECE (and its floor), the mean epistemic uncertainty and sample spread
    of the posterior predictive, and the mean σ of θ and of the tasks' q at the last training step;
    means over seeds are plotted against log10 β. Runs already finished under ``out/runs`` are reused."""
    rows = []
    gamma_tag = "" if kl_gamma is None else f"-gamma{kl_gamma:g}"
    for x in log10_betas:
        for seed in seeds:
            config = base.updated(method="abmll", kl_beta=10.0 ** x, kl_gamma=kl_gamma, seed=seed)
            run_dir = out / "runs" / f"beta{x:g}{gamma_tag}-seed{seed}"
            r = trained(config, run_dir, progress)
            pooled = r.get("pooled", {})
            last = _last_metrics(run_dir)
            rows.append({"log10_kl_beta": x, "seed": seed, **{k: pooled.get(k) for k in BETA_METRICS},
                         "n": pooled.get("n"), "sigma_theta": last.get("sigma_theta"), "sigma_q": last.get("sigma_q"),
                         "task_kl": last.get("task_kl")})
    summary = {}
    gamma_label = "kl_gamma = kl_beta" if kl_gamma is None else f"kl_gamma = {kl_gamma:g}"
    for key in ("accuracy", "nll", "ece", "epistemic", "sigma_q"):
        vals = [[r[key] for r in rows if r["log10_kl_beta"] == x and r[key] is not None] for x in log10_betas]
        summary[key] = [sum(v) / len(v) if v else None for v in vals]
        if all(m is not None for m in summary[key]):
            plot(list(log10_betas), {"ABMLL": summary[key]}, f"log10 kl_beta ({gamma_label})", f"pooled {key}"
                  if key in ("accuracy", "nll", "ece") else f"mean {key}", out / f"beta_{key}.png")
    result = {"log10_kl_beta": list(log10_betas), "kl_gamma": kl_gamma, "runs": rows, "mean": summary}
    atomic_write_text(out / "beta_ablation.json", json.dumps(result, indent=1) + "\n")
    return result
