"""β ablation: ABMLL at log10 kl_beta ∈ {0, −4, −8, −12, −16}; pooled accuracy, NLL, ECE, epistemic
uncertainty and posterior σ against β, plotted.

    python scripts/beta_ablation/run.py --preset smoke --out runs/beta-smoke
    python scripts/beta_ablation/run.py --preset cpu-long --out runs/beta-long --log10-betas -8 -4 -2 0
    python scripts/beta_ablation/run.py --preset cpu-long --out runs/beta-long-g --log10-betas -2 0 --kl-gamma 1e-8
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser
from scripts.beta_ablation.ablation import beta_ablation


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--log10-betas", nargs="+", type=float, default=[0, -4, -8, -12, -16])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--kl-gamma", type=float, default=None, help="a fixed kl_gamma (default: kl_gamma = kl_beta)")
    args = p.parse_args(argv)
    result = beta_ablation(base_config(args), args.out, args.log10_betas, range(args.seeds), not args.quiet,
                           args.kl_gamma)
    print(json.dumps(result["mean"]))


if __name__ == "__main__":
    main()
