"""Does meta-training amplify round-off? Two runs whose starting factors differ by ~1 float32 ulp, same
episodes and noise; their relative distance after every outer step, per factor kind
(scripts/roundoff/roundoff.py). One JSON on stdout and in OUT/roundoff_growth.json.

    python scripts/roundoff/run.py --preset smoke --out /tmp/rg --method abmll
    python scripts/roundoff/run.py --preset cpu-long --out runs/rg --method abmll --steps 8 --set num_threads=1
    python scripts/roundoff/run.py --preset cpu-long --out runs/rg-sgd --method abmll --steps 8 \\
        --set num_threads=1 inner_optimizer=sgd
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser
from scripts.roundoff.roundoff import roundoff_growth


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--method", default="abmll", help="a meta-trained method (abmll, lora, reptile, structured-lora, ...)")
    p.add_argument("--steps", type=int, default=8, help="outer steps of each run (>= 1)")
    p.add_argument("--rel", type=float, default=2.0 ** -23, help="relative size of the starting perturbation")
    args = p.parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    config = base_config(args).updated(method=args.method)
    if config.num_threads:
        import torch

        torch.set_num_threads(config.num_threads)
    try:
        result = roundoff_growth(config, args.steps, args.rel)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    text = json.dumps(result)
    (args.out / "roundoff_growth.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
