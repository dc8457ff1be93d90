"""The per-task methods across shots (k = 1 … 16 at the preset's K) and inner-step budgets (K = 5, 20, 50
at 16 shots): accuracy, NLL, Brier, ECE with its floor, epistemic share, cost, and ABMLL's paired differences.

    python scripts/regimes/run.py --preset smoke --out runs/regimes-smoke
    python scripts/regimes/run.py --preset cpu --out runs/regimes-cpu --set eval_query_size=16 \
        --methods lora lora-ts laplace-lora blob ensemble-lora mc-dropout-lora bayes-lora abmll
    # reuse trained runs of the same settings (nothing retrained; lora's run serves lora-ts, laplace-lora, ...):
    python scripts/regimes/run.py --preset cpu --out runs/reg --runs lora=runs/bench/runs/lora-seed0 \
        abmll=runs/bench/runs/abmll-seed0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser, trained_runs
from scripts.regimes.regimes import BUDGETS, SHOTS, run_regimes

# the smoke preset's generated tasks, with room for 16 shots beside a 6-example query set
SMOKE_TASKS = dict(num_train=6, num_test=3, examples=24)
PER_TASK = ["lora", "lora-ts", "laplace-lora", "blob", "ensemble-lora", "mc-dropout-lora", "bayes-lora", "abmll"]


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=PER_TASK)
    p.add_argument("--shots", nargs="*", type=int, default=list(SHOTS), help="the shots curve (at the preset's K)")
    p.add_argument("--budgets", nargs="*", type=int, default=list(BUDGETS), help="the budget curve's K (at 16 shots)")
    p.add_argument("--runs", nargs="*", default=[], metavar="METHOD=RUN_DIR",
                   help="take METHOD's trained state from RUN_DIR (same settings) instead of training it")
    args = p.parse_args(argv)
    runs = trained_runs(p, args.runs)
    config = base_config(args, synthetic=SMOKE_TASKS)
    result = run_regimes(config, args.out, args.methods, args.shots, args.budgets, runs, not args.quiet)
    # the last line: per regime, each method's pooled [accuracy, NLL, ECE]
    print(json.dumps({name: {m: [round(v[f]["value"], 3) for f in ("accuracy", "nll", "ece")]
                             for m, v in r["methods"].items()} for name, r in result["regimes"].items()}))


if __name__ == "__main__":
    main()
