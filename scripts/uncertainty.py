"""Uncertainty that tracks the data: epistemic uncertainty against shots (0, 1, 2, 4, 8, 16) and
selective prediction (accuracy of the most certain x%, ranked by total and by epistemic uncertainty).

    python scripts/uncertainty.py --preset smoke --out runs/uncertainty-smoke
    python scripts/uncertainty.py --preset cpu --out runs/uncertainty-cpu --methods abmll bayes-lora lora-ts
"""

from __future__ import annotations

import json

from _common import base_config, parser

from abmll_pyro.train.uncertainty_curves import SHOTS, uncertainty_curves

# the smoke preset's generated tasks, with room for 16 shots beside an 8-example query set
SMOKE_TASKS = dict(num_train=12, num_test=3, examples=24)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["abmll", "bayes-lora", "lora-ts"])
    p.add_argument("--shots", nargs="+", type=int, default=list(SHOTS))
    args = p.parse_args(argv)
    config = base_config(args, synthetic=SMOKE_TASKS)
    if args.preset == "smoke":
        config = config.updated(eval_query_size=8)
    result = uncertainty_curves(config, args.out, args.methods, args.shots, not args.quiet)
    # the last line: each method's mean epistemic uncertainty (nats) per shots value
    print(json.dumps({name: {str(r["shots"]): float(f"{r['epistemic']:.4g}") for r in e["curve"]}
                      for name, e in result["methods"].items()}))


if __name__ == "__main__":
    main()
