"""Cost: time per meta-step and peak memory of ABMLL vs Regular LoRA on the same model and tasks, as
ratios; each measured in its own subprocess (CPU: ru_maxrss; GPU: torch.cuda.max_memory_allocated).

    python scripts/cost.py --preset smoke --out runs/cost-smoke
    python scripts/cost.py --preset cpu --out runs/cost-cpu
"""

from __future__ import annotations

import json

from _common import base_config, parser

from abmll_pyro.train.experiments import cost_ratios


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed meta-steps (after one warm-up step)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = cost_ratios(base_config(args), args.out, args.steps)
    print(json.dumps({k: result[k] for k in ("time_ratio", "memory_ratio")}))


if __name__ == "__main__":
    main()
