"""Cost: the frozen-trunk cache's speed-up, ABMLL's time and memory against Regular LoRA, and both
methods' memory at Llama-3-8B's shapes projected to the whole model, each probe in its own subprocess
(CPU: peak resident set above the resident set right after the model is loaded; GPU:
torch.cuda.max_memory_allocated). Last line, exactly:
``projected_memory_ratio_8b=X time_ratio_abmll_lora=Y memory_ratio_abmll_lora=Z``.

* X (``scripts/cost/proxy_memory.py``, formula in its docstring): ABMLL / Regular LoRA peak memory
  of Llama-3-8B (weights + fixed part + 32 × per-block part), the parts measured on the 1- and 2-block
  shape proxies (``llama3-8b-proxy``, ``-2l``) at the ``paper`` preset's settings (rank 8, α 16, q/v,
  K = 5, 2 tasks per step, 16 shots, bf16, first order), whatever ``--preset`` says. The paper: 1.076.
* Y, Z: ABMLL / Regular LoRA seconds per 1k token-passes and peak memory above the model, every block's
  targets adapted, on ``--preset``'s model and tasks (SmolLM2 for ``cpu``; a tiny Llama for ``smoke``);
  with ``--proxy only`` the preset's probes are skipped and Y, Z come from the 2-block proxy instead
  (where the vocabulary head and the MLP dominate the time).

The line above the last gives ``speedup_trunk_cache=…`` (nan with ``--no-cache-off`` or ``--proxy only``).

    python scripts/cost/run.py --preset smoke --out runs/cost-smoke --proxy off
    python scripts/cost/run.py --preset cpu --out runs/cost-cpu
    python scripts/cost/run.py --preset paper --out runs/cost-proxy --proxy only --clock cpu     # X alone (13 min, 2 busy cores)
    python scripts/cost/run.py --preset cpu --out runs/cost-cpu --baseline /path/to/older/checkout   # + old/new ratios

The preset's ratios use MetaSVI's default ELBO; ``cost.json`` also gives them with LeanMeanFieldELBO
(``*_lean_elbo``). ``--no-cache-off`` skips the slowest probe (the uncached one); ``--clock cpu`` times
each probe with its own CPU time (a machine shared with other jobs). Memory is the resident set with glibc's
mmap threshold fixed (``--malloc fixed``, the default: freed tensors leave the resident set, as on a GPU's
allocated-memory counter; ``--malloc default`` measures with glibc's own settings, whose peak also counts
freed blocks kept in the heap; ``scripts/cost/probe.py`` says why). ``--proxy off`` skips the proxy
probes (X is nan); they need about 4.5 GB of memory and a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from abmll_pyro.presets import get_preset
from abmll_pyro.train.config import RunConfig
from scripts._common import base_config, parser
from scripts.cost.probe import run_probe
from scripts.cost.proxy_memory import proxy_memory
from scripts.cost.ratios import cost_ratios

NAN = float("nan")


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="timed meta-steps (after one warm-up step)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of the package: its probes too, and old/new ratios")
    p.add_argument("--no-cache-off", dest="cache_off", action="store_false", help="skip the uncached probe")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time with the wall clock or each probe's CPU time (steadier on a shared machine)")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="the probes' glibc allocator: mmap threshold fixed at 64 KiB, so resident memory follows "
                        "live tensors (fixed), or glibc's default, whose peak also counts freed memory kept in the heap")
    p.add_argument("--proxy", choices=["on", "off", "only"], default="on",
                   help="the Llama-3-8B shape-proxy memory probes: also (on), not (off), or alone (only)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ratios = {"time_ratio": NAN, "memory_ratio": NAN}
    if args.proxy != "only":
        ratios = cost_ratios(base_config(args), args.out, args.steps, baseline=args.baseline,
                             cache_off=args.cache_off, clock=args.clock, malloc=args.malloc)
        keys = ("speedup_trunk_cache_cold", "speedup_adapt", "speedup_predict_s8", "time_ratio_lean_elbo",
                "memory_ratio_lean_elbo", "old_over_new", "dense_buffers_per_module", "llama3_8b_qv_dense_buffer_gb")
        print(json.dumps({k: ratios[k] for k in keys if k in ratios}))
        for name in ("cache_on", "baseline_cache_on", "cache_off"):
            if name in ratios:
                r = ratios[name]
                print(f"{name}: {r['seconds_per_step']:.2f} s/meta-step warm, {r['cold_seconds_per_step']:.2f} s cold; "
                      f"adapt {r['adapt_seconds_per_task']:.2f} s/task; predict S={r['num_samples']} "
                      f"{r['predict_seconds_per_task']:.2f} s/task")
    projected = NAN
    if args.proxy != "off":
        # the paper preset's settings; with --preset paper, --set changes them too
        paper = (base_config(args) if args.preset == "paper"
                 else RunConfig.from_dict(get_preset("paper").config, where="the paper preset"))
        proxy = proxy_memory(paper, args.out, run_probe, clock=args.clock, malloc=args.malloc)
        projected = proxy["projected_memory_ratio_8b"]
        for m in ("abmll", "lora"):
            r = proxy[m]
            print(f"proxy {m}: above the model {r['m1_mb']:.0f} MB (1 block), {r['m2_mb']:.0f} MB (2 blocks); "
                  f"per block {r['per_block_mb']:.0f} MB, fixed {r['fixed_mb']:.0f} MB, linear {r['linear_check']}; "
                  f"projected Llama-3-8B total {r['projected_total_gb']:.2f} GB")
        if args.proxy == "only":
            ratios = {"time_ratio": proxy["time_ratio_2_blocks"], "memory_ratio": proxy["memory_ratio_2_blocks"]}
    print(f"speedup_trunk_cache={ratios.get('speedup_trunk_cache', NAN):.3f}")
    print(f"projected_memory_ratio_8b={projected:.3f} time_ratio_abmll_lora={ratios['time_ratio']:.3f} "
          f"memory_ratio_abmll_lora={ratios['memory_ratio']:.3f}")


if __name__ == "__main__":
    main()
