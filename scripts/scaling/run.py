"""Scaling: peak memory of ABMLL meta-training with 10 vs 100 training tasks (each in a subprocess).
No per-task state survives a task, so the ratio should stay near 1 (task data aside).

    python scripts/scaling/run.py --preset smoke --out runs/scaling-smoke
    python scripts/scaling/run.py --preset cpu --out runs/scaling-cpu --synthetic

``--synthetic`` uses generated tasks (any count) with the preset's model; the smoke preset always does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser
from scripts.scaling.scaling import scaling_memory


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--task-counts", nargs="+", type=int, default=[10, 100])
    p.add_argument("--synthetic", action="store_true", help="generated tasks instead of the preset's source")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = base_config(args, synthetic=dict(num_train=max(args.task_counts), num_test=2, examples=12),
                         force_synthetic=args.synthetic)
    result = scaling_memory(config, args.out, args.task_counts)
    print(json.dumps({"memory_ratio": result["memory_ratio"], "peak_memory_mb": [r["peak_memory_mb"] for r in result["runs"]]}))


if __name__ == "__main__":
    main()
