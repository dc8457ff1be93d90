"""Cost (issue 8): the frozen-trunk cache's speed-up and ABMLL's time and memory against Regular LoRA,
as ratios measured in one run, each probe in its own subprocess (CPU: ru_maxrss above the resident set
right after the model is loaded; GPU: torch.cuda.max_memory_allocated). Last line, exactly:
``speedup_trunk_cache=X time_ratio_abmll_lora=Y memory_ratio_abmll_lora=Z``.

    python scripts/cost.py --preset smoke --out runs/cost-smoke
    python scripts/cost.py --preset cpu --out runs/cost-cpu
    python scripts/cost.py --preset cpu --out runs/cost-cpu --baseline /path/to/older/checkout   # + old/new ratios

The last line's ratios use MetaSVI's default ELBO; the line above it also gives them with
LeanMeanFieldELBO (``*_lean_elbo``). ``--no-cache-off`` skips the slowest probe (the uncached one:
no trunk-cache speed-ups then, and the last line says ``speedup_trunk_cache=nan``); ``--clock cpu``
times each probe with its own CPU time (a machine shared with other jobs).
"""

from __future__ import annotations

import json
from pathlib import Path

from _common import base_config, parser

from abmll_pyro.train.experiments import cost_ratios


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed meta-steps (after one warm-up step)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of the package: its probes too, and old/new ratios")
    p.add_argument("--no-cache-off", dest="cache_off", action="store_false", help="skip the uncached probe")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time with the wall clock or each probe's CPU time (steadier on a shared machine)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = cost_ratios(base_config(args), args.out, args.steps, baseline=args.baseline, cache_off=args.cache_off,
                         clock=args.clock)
    keys = ("speedup_trunk_cache_cold", "speedup_adapt", "speedup_predict_s8", "time_ratio_lean_elbo",
            "memory_ratio_lean_elbo", "old_over_new", "dense_buffers_per_module", "llama3_8b_qv_dense_buffer_gb")
    print(json.dumps({k: result[k] for k in keys if k in result}))
    for name in ("cache_on", "baseline_cache_on", "cache_off"):
        if name in result:
            r = result[name]
            print(f"{name}: {r['seconds_per_step']:.2f} s/meta-step warm, {r['cold_seconds_per_step']:.2f} s cold; "
                  f"adapt {r['adapt_seconds_per_task']:.2f} s/task; predict S={r['num_samples']} "
                  f"{r['predict_seconds_per_task']:.2f} s/task")
    speedup = result.get("speedup_trunk_cache", float("nan"))
    print(f"speedup_trunk_cache={speedup:.3f} time_ratio_abmll_lora={result['time_ratio']:.3f} "
          f"memory_ratio_abmll_lora={result['memory_ratio']:.3f}")


if __name__ == "__main__":
    main()
