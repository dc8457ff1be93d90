"""Pruning robustness: zero the smallest-magnitude 10/20/30% of neurons of the adapted layers after
adaptation; degradation of ABMLL vs Regular LoRA vs Reptile.

    python scripts/pruning/run.py --preset smoke --out runs/prune-smoke
    python scripts/pruning/run.py --preset cpu --out runs/prune-cpu --runs-from runs/bench-cpu/runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser
from scripts.pruning.pruning import pruning_robustness


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["abmll", "lora", "reptile"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-from", type=Path, help="reuse trained runs <dir>/<method>-seed<k> (e.g. a benchmark's runs/)")
    args = p.parse_args(argv)
    result = pruning_robustness(base_config(args), args.out, args.methods, args.fractions, args.seed,
                                not args.quiet, args.runs_from)
    print(json.dumps(result["curves"]))


if __name__ == "__main__":
    main()
