"""Is the task subspace's learned scale the one the held-out tasks want? Rescale s at test time.

Loads a trained ABMLL run with a task subspace (its config and newest checkpoint), multiplies every
direction's scale s by each factor, and for each number of support examples k adapts every task of
the run's eval split (``eval_split``: dev for tuning) on the first k of its 16 support examples and
scores the same 32 queries at every k with
8 posterior draws: the pooled NLL and the epistemic share of the predictive entropy. Nothing is
trained; the splits are seeded by ``--seed``.

    python scripts/subspace_truth/scale_probe.py --run runs/sub/devE/runs/abmll --factors 1 3 10 --shots 0 1 4 16

Prints one line per (factor, k) and writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: its abmll_pyro

import torch

from abmll_pyro.data.tasks import split_task
from abmll_pyro.infer.predictive import predictive_samples, uncertainty_split
from abmll_pyro.models.likelihoods import TaskData
from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.episodes import EpisodeEncoder
from scripts.subspace_truth.trained import load_subspace_run, run_probe_main


def probe(run: Path, factors: list[float], shots: list[int], queries: int, samples: int, seed: int) -> list[dict]:
    config, built, taskset = load_subspace_run(run)
    svi = built.method.svi
    tasks = taskset.dev if config.eval_split == "dev" else taskset.test
    encoder = EpisodeEncoder(built.tokenizer, built.config.prompt_length(False), config.template)
    start = {k: v.detach().clone() for k, v in svi.subspace.log_scale.items()}
    rows = []
    for factor in factors:
        with torch.no_grad():
            for k, v in svi.subspace.log_scale.items():
                v.copy_(start[k] + math.log(factor))
        for k_shots in shots:
            g = torch.Generator().manual_seed(seed)  # the same splits for every factor and k
            nll, entropy, epistemic, n = 0.0, 0.0, 0.0, 0
            for task in tasks:
                # one split per task for every k: the largest support set, the same queries
                split = split_task(task, max(max(shots), 1), queries, g, allow_smaller_query=True)
                episode = encoder(split)
                support = TaskData(episode.support.select(torch.arange(k_shots)) if k_shots else episode.support)
                params = (svi.adapt(support) if k_shots else
                          {key: v.detach() for key, v in svi.init_task_params(svi.theta(), support).items()})
                torch.manual_seed(seed)
                split_u = uncertainty_split(predictive_samples(svi, params, TaskData(episode.query), samples))
                p = split_u.probs.gather(1, episode.query.gold[:, None]).squeeze(1)
                nll += float(-p.log().sum())
                entropy += float(split_u.entropy.sum())
                epistemic += float(split_u.epistemic.sum())
                n += len(p)
            rows.append({"factor": factor, "shots": k_shots, "nll": nll / n, "epistemic_share": epistemic / entropy, "n": n})
            print(f"s x {factor:g}, k = {k_shots}: NLL {nll / n:.4f}, epistemic share {epistemic / entropy:.4f} (n = {n})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--factors", nargs="+", type=float, default=[1.0, 3.0, 10.0])
    ap.add_argument("--shots", nargs="+", type=int, default=[0, 1, 4, 16])
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if any(f <= 0 for f in args.factors) or any(k < 0 for k in args.shots) or args.queries < 1 or args.samples < 1:
        print(f"error: factors must be > 0, shots >= 0, queries and samples >= 1; got {args.factors}, {args.shots}, "
              f"{args.queries}, {args.samples}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    def run() -> None:
        rows = probe(args.run, args.factors, args.shots, args.queries, args.samples, args.seed)
        if args.out:
            atomic_write_text(args.out, json.dumps({"run": str(args.run), "rows": rows}, indent=1) + "\n")

    return run_probe_main(args.run, run)


if __name__ == "__main__":
    raise SystemExit(main())
