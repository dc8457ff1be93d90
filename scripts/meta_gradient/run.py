"""Where ABMLL's outer gradient points: the query-NLL and β·KL parts of θ's mean-factor gradient, their
signal-to-noise over batches and their direction against Regular LoRA's pooled gradient
(scripts/meta_gradient/meta_gradient.py). One JSON on stdout and in OUT/meta_gradient.json.

    python scripts/meta_gradient/run.py --preset smoke --out /tmp/mg
    python scripts/meta_gradient/run.py --preset cpu-long --out runs/mg --batches 6 --set num_threads=1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser
from scripts.meta_gradient.meta_gradient import meta_gradient_probe


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=6, help="batches of training episodes (>= 2)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = base_config(args)
    if config.num_threads:
        import torch

        torch.set_num_threads(config.num_threads)
    result = meta_gradient_probe(config, args.batches)
    text = json.dumps(result, indent=1)
    (args.out / "meta_gradient.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
