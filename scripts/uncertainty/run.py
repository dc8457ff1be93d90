"""Uncertainty that tracks the data: epistemic uncertainty against shots (0, 1, 2, 4, 8, 16) and
selective prediction (accuracy of the most certain x%, ranked by total and by epistemic uncertainty).

    python scripts/uncertainty/run.py --preset smoke --out runs/uncertainty-smoke
    python scripts/uncertainty/run.py --preset cpu --out runs/uncertainty-cpu --methods abmll bayes-lora lora-ts
    # reuse trained runs of a benchmark (nothing retrained) and compare with another suite's tasks:
    python scripts/uncertainty/run.py --preset cpu-long --out runs/unc --runs abmll=runs/long/runs/abmll-seed0 \
        lora-ts=runs/long/runs/lora-seed0 --ood-tasks bigbench --ood-set max_examples=64
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, overrides, parser, trained_runs
from scripts.uncertainty.curves import SHOTS, uncertainty_curves

# the smoke preset's generated tasks, with room for 16 shots beside an 8-example query set
SMOKE_TASKS = dict(num_train=12, num_test=3, examples=24)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["abmll", "bayes-lora", "lora-ts"])
    p.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    p.add_argument("--runs", nargs="*", default=[], metavar="METHOD=RUN_DIR",
                   help="take METHOD's trained state from RUN_DIR (same settings) instead of training it")
    p.add_argument("--ood-tasks", default=None, metavar="SUITE",
                   help="also measure at the largest shots on SUITE's test tasks (out of family)")
    p.add_argument("--ood-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for loading the --ood-tasks suite only (e.g. max_examples=64)")
    args = p.parse_args(argv)
    ood_overrides = overrides(args.ood_set, "--ood-set")
    runs = trained_runs(p, args.runs)
    config = base_config(args, synthetic=SMOKE_TASKS)
    if args.preset == "smoke":
        config = config.updated(eval_query_size=8)
    bad = sorted(set(runs) - set(args.methods))
    if bad:
        p.error(f"--runs names {bad}, not among --methods {args.methods}")
    result = uncertainty_curves(config, args.out, args.methods, args.shots, not args.quiet, runs, args.ood_tasks,
                                ood_overrides)
    # the last line: each method's mean epistemic uncertainty (nats) per shots value
    print(json.dumps({name: {str(r["shots"]): float(f"{r['epistemic']:.4g}") for r in e["curve"]}
                      for name, e in result["methods"].items()}))


if __name__ == "__main__":
    main()
