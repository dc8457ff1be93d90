"""Which subspace scale do a task's examples ask for jointly, and which one does each example ask for alone?

The empirical-Bayes M-step fits the task subspace's prior scale s to the tasks' *joint* marginal
likelihood: p(D_i | θ, s) = E_{z ~ N(0, s²)}[Π_j p(y_j | x_j, z)], all of a task's examples under one
z. The prior predictive's NLL at k = 0 scores each query example on its own:
−log E_z[p(y_j | x_j, z)], one expectation per example. The two prefer different s when the model's
per-example probabilities are over-confident: spreading z softens every single prediction (the
per-example score improves), while a spread that is not the same for all of a task's examples costs
the joint likelihood. A scale that helps only the per-example score is tempering, not task spread.

For a trained ABMLL run with a task subspace (its config and newest checkpoint), every task of a
split, its 16 support and 32 query examples (seeded like ``scale_probe.py``), ΔW at q's prior mean
(θ's μ) and the subspace's prior scale multiplied by each factor c: R prior draws z = c·s·ε (the same
ε for every factor), then, pooled over tasks,

* ``nll_per_example``: −(1/n) Σ_j log (1/R) Σ_r p(y_j | z_r) over the query examples (the k = 0
  predictive, as scored in evaluation but with ΔW at its mean);
* ``joint_nll_per_example``: −(1/N) Σ_i log (1/R) Σ_r Π_{j ∈ D_i} p(y_j | z_r) over all 48 examples
  of each task (the estimated negative log marginal likelihood per example, what empirical Bayes
  maximizes; importance sampling from the prior, so each task's effective sample size is reported);
* ``min_ess``: the smallest effective sample size (of R) of the joint estimate's weights over tasks;
* ``posterior_z2_ratio``: the mean over tasks and coordinates of E[z²]/(c·s)² under the posterior given
  the support set, estimated by reweighting the prior draws by their support likelihood
  (``min_support_ess``: those weights' smallest effective sample size); ``q_z2_ratio``: the same
  under q(z) after the run's inner loop on the support at that scale. The empirical-Bayes M-step
  moves s² toward E_q[z²], so a ratio above 1 widens s and below 1 shrinks it: where the posterior's
  ratio is above 1 and q's below, the inner loop's q, not the data, is what shrinks s.

    python scripts/subspace_truth/marginal_probe.py --run runs/sub/devE/runs/abmll --factors 0.3 1 3 10 --draws 48

Nothing is trained. Prints one line per factor and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: its abmll_pyro

import torch

from abmll_pyro.data.tasks import split_task
from abmll_pyro.infer.predictive import mean_probs
from abmll_pyro.models.likelihoods import TaskData
from abmll_pyro.models.subspace import LOC
from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.episodes import EpisodeEncoder
from scripts.subspace_truth.trained import load_subspace_run, run_probe_main


def _gold_log_probs(svi, params, data: TaskData) -> torch.Tensor:
    p = mean_probs(svi, params, data)
    return p.gather(1, data.batch.gold[:, None].to(p.device)).squeeze(1).double().clamp_min(1e-300).log()


def summarize(support_lp: torch.Tensor, query_lp: torch.Tensor) -> dict:
    """From ``[R, n_support]`` and ``[R, n_query]`` log-probabilities of one task's gold labels under R
    prior draws: the summed per-example log predictive of the queries, the log marginal likelihood
    of all examples, and the effective sample size of its weights."""
    r = query_lp.shape[0]
    per_example = float((torch.logsumexp(query_lp, 0) - math.log(r)).sum())
    joint = torch.cat([support_lp, query_lp], 1).sum(1)
    log_ml = float(torch.logsumexp(joint, 0) - math.log(r))
    w = torch.softmax(joint, 0)
    return {"log_pred_sum": per_example, "n_query": query_lp.shape[1], "log_ml": log_ml,
            "n_all": support_lp.shape[1] + query_lp.shape[1], "ess": float(1.0 / (w ** 2).sum())}


def probe(run: Path, factors: list[float], draws: int, split_name: str, shots: int, queries: int, seed: int,
          max_tasks: int | None, inner_steps: int | None = None, subspace_inner_lr: float | None = None,
          curvature_scale: float = 1.0) -> list[dict]:
    config, built, taskset = load_subspace_run(run)
    svi = built.method.svi
    subspace = svi.subspace
    if inner_steps is not None:  # q's inner loop otherwise than the run's (for q_z2_ratio only)
        svi.config = replace(svi.config, inner=replace(svi.config.inner, num_inner_steps=inner_steps))
    if subspace_inner_lr is not None:
        svi.config = replace(svi.config, subspace_inner_lr=subspace_inner_lr)
    with torch.no_grad():  # the trained curvature buffer H of q's Newton step, rescaled (1: as trained)
        for name in subspace.log_scale:
            subspace.curvature[name].mul_(curvature_scale)
    tasks = {"train": taskset.train, "dev": taskset.dev, "test": taskset.test}[split_name][:max_tasks]
    encoder = EpisodeEncoder(built.tokenizer, built.config.prompt_length(False), config.template)
    g = torch.Generator().manual_seed(seed)
    per_factor: dict[float, list[dict]] = {c: [] for c in factors}
    theta = {k: v.detach() for k, v in svi.theta().items()}
    trained = {k: v.detach().clone() for k, v in subspace.log_scale.items()}
    for task in tasks:
        episode = encoder(split_task(task, shots, queries, g, allow_smaller_query=True))
        support, query = TaskData(episode.support), TaskData(episode.query)
        with torch.no_grad():
            start = {k: v.detach() for k, v in svi.init_task_params(theta, support).items()}
        eps = torch.randn(draws, len(subspace.modules), subspace.dim, generator=torch.Generator().manual_seed(seed + 1),
                          dtype=torch.float64)
        for c in factors:
            s_lp, q_lp = [], []
            with torch.no_grad():
                for r in range(draws):
                    params = dict(start)
                    for i, m in enumerate(subspace.modules):
                        scale = subspace.scale(m).detach()
                        params[subspace.key(m, LOC)] = c * scale * eps[r, i].to(scale.dtype)
                    s_lp.append(_gold_log_probs(svi, params, support))
                    q_lp.append(_gold_log_probs(svi, params, query))
            row = {"task": task.name, **summarize(torch.stack(s_lp), torch.stack(q_lp))}
            # the M-step's direction at this scale: E[z²]/s² under the support posterior, from the prior
            # draws reweighted by the support likelihood, and under q after the inner loop
            w = torch.softmax(torch.stack(s_lp).sum(1), 0)
            row["posterior_z2_ratio"] = float((w * eps.pow(2).mean((1, 2))).sum())
            row["support_ess"] = float(1.0 / (w ** 2).sum())
            with torch.no_grad():
                for k, v in subspace.log_scale.items():
                    v.copy_(trained[k] + math.log(c))
            try:
                adapted = svi.adapt(support)
            finally:
                with torch.no_grad():
                    for k, v in subspace.log_scale.items():
                        v.copy_(trained[k])
            ratios = []
            for m in subspace.modules:
                q = subspace.posterior(adapted, m)
                second = q.mean.double() ** 2 + q.covariance_matrix.double().diagonal()
                ratios.append(second / (c * subspace.scale(m).detach().double()) ** 2)
            row["q_z2_ratio"] = float(torch.cat(ratios).mean())
            per_factor[c].append(row)
    rows = []
    for c in factors:
        t = per_factor[c]
        row = {"factor": c, "nll_per_example": -sum(x["log_pred_sum"] for x in t) / sum(x["n_query"] for x in t),
               "joint_nll_per_example": -sum(x["log_ml"] for x in t) / sum(x["n_all"] for x in t),
               "min_ess": min(x["ess"] for x in t), "tasks": len(t), "draws": draws,
               "mean_scale": subspace.mean_scale() * c,
               "posterior_z2_ratio": sum(x["posterior_z2_ratio"] for x in t) / len(t),
               "q_z2_ratio": sum(x["q_z2_ratio"] for x in t) / len(t),
               "min_support_ess": min(x["support_ess"] for x in t), "per_task": t}
        rows.append(row)
        print(f"s x {c:g} (mean s {row['mean_scale']:.4g}): per-example NLL {row['nll_per_example']:.4f}, "
              f"joint NLL per example {row['joint_nll_per_example']:.4f}, min ESS {row['min_ess']:.1f}/{draws}; "
              f"E[z²]/s² posterior {row['posterior_z2_ratio']:.3f} (support ESS >= {row['min_support_ess']:.1f}), "
              f"q {row['q_z2_ratio']:.3f} ({len(t)} {split_name} tasks)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--factors", nargs="+", type=float, default=[0.3, 1.0, 3.0, 10.0])
    ap.add_argument("--draws", type=int, default=48)
    ap.add_argument("--split", choices=["train", "dev", "test"], default="dev")
    ap.add_argument("--max-tasks", type=int, default=None)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inner-steps", type=int, default=None, help="q's inner steps (default: the run's)")
    ap.add_argument("--subspace-inner-lr", type=float, default=None,
                    help="the damping of q(z)'s Newton step (default: the run's; 1 is a full step)")
    ap.add_argument("--curvature-scale", type=float, default=1.0,
                    help="multiply the run's curvature buffer H (q's Newton step) by this (default 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if (any(f <= 0 for f in args.factors) or args.draws < 2 or args.shots < 1 or args.queries < 1
            or (args.max_tasks is not None and args.max_tasks < 1) or (args.inner_steps is not None and args.inner_steps < 0)
            or (args.subspace_inner_lr is not None and not 0 < args.subspace_inner_lr <= 1)
            or not (math.isfinite(args.curvature_scale) and args.curvature_scale >= 0)):
        print(f"error: factors must be > 0, draws >= 2, shots, queries and max-tasks >= 1, inner-steps >= 0, "
              f"subspace-inner-lr in (0, 1], curvature-scale >= 0; got {args.factors}, {args.draws}, {args.shots}, "
              f"{args.queries}, {args.max_tasks}, {args.inner_steps}, {args.subspace_inner_lr}, {args.curvature_scale}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    def run() -> None:
        rows = probe(args.run, args.factors, args.draws, args.split, args.shots, args.queries, args.seed, args.max_tasks,
                     args.inner_steps, args.subspace_inner_lr, args.curvature_scale)
        if args.out:
            atomic_write_text(args.out, json.dumps({"run": str(args.run), "split": args.split, "inner_steps": args.inner_steps,
                                                    "subspace_inner_lr": args.subspace_inner_lr,
                                                    "curvature_scale": args.curvature_scale, "rows": rows}, indent=1) + "\n")

    return run_probe_main(args.run, run)


if __name__ == "__main__":
    raise SystemExit(main())
