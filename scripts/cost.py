"""Cost (issue 8): the frozen-trunk cache's speed-up and ABMLL's time and memory against Regular LoRA,
as ratios measured in one run, each probe in its own subprocess (CPU: ru_maxrss above the resident set
right after the model is loaded; GPU: torch.cuda.max_memory_allocated). Last line, exactly:
``speedup_trunk_cache=X time_ratio_abmll_lora=Y memory_ratio_abmll_lora=Z``.

    python scripts/cost.py --preset smoke --out runs/cost-smoke
    python scripts/cost.py --preset cpu --out runs/cost-cpu
"""

from __future__ import annotations

import json

from _common import base_config, parser

from abmll_pyro.train.experiments import cost_ratios


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed meta-steps (after one warm-up step)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = cost_ratios(base_config(args), args.out, args.steps)
    keys = ("speedup_trunk_cache_cold", "speedup_adapt", "speedup_predict_s8", "dense_buffers_per_module",
            "llama3_8b_qv_dense_buffer_gb")
    print(json.dumps({k: result[k] for k in keys}))
    for name in ("cache_on", "cache_off"):
        r = result[name]
        print(f"{name}: {r['seconds_per_step']:.2f} s/meta-step warm, {r['cold_seconds_per_step']:.2f} s cold; "
              f"adapt {r['adapt_seconds_per_task']:.2f} s/task; predict S={r['num_samples']} {r['predict_seconds_per_task']:.2f} s/task")
    print(f"speedup_trunk_cache={result['speedup_trunk_cache']:.3f} time_ratio_abmll_lora={result['time_ratio']:.3f} "
          f"memory_ratio_abmll_lora={result['memory_ratio']:.3f}")


if __name__ == "__main__":
    main()
