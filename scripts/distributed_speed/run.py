"""Meta-training steps per second with 1 and with N processes (``torchrun``, one thread each).

Each launch trains ``abmll`` (or ``--method``) on the preset into ``<out>/procs<N>/`` with
``OMP_NUM_THREADS=1`` and ``num_threads=1``; the rate is taken from the run's own log: (last step −
first step) / (seconds between their log lines), so model loading, the first (warm-up) step and
evaluation are left out. Prints one JSON line: the rates and their ratio (N processes / 1).

    python scripts/distributed_speed/run.py --preset cpu --out /tmp/ddp-speed --set steps=6
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from scripts._common import base_config, parser

STEP_LINE = " INFO step "


def steps_per_second(run_dir: Path) -> float:
    """Steps per second between the first and last ``step N`` lines of ``run_dir/log.txt``."""
    stamps = []
    for line in (run_dir / "log.txt").read_text().splitlines():
        if STEP_LINE in line:
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            stamps.append((int(line.split(STEP_LINE)[1].split()[0]), when))
    if len(stamps) < 2:
        raise SystemExit(f"{run_dir}/log.txt has {len(stamps)} step lines; run at least 2 steps with log_every=1")
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    return (s1 - s0) / (t1 - t0).total_seconds()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--method", default="abmll")
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    config = base_config(args).updated(method=args.method, num_threads=1, log_every=1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rates = {}
    for n in (1, args.procs):
        run = args.out / f"procs{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "abmll_pyro.cli", "--quiet", "train", "--method", args.method, "--config", str(args.out / "config.json"), "--out", str(run)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
        rates[n] = steps_per_second(run)
    print(json.dumps({"method": args.method, "preset": args.preset, "tasks_per_step": config.tasks_per_step,
                      "steps_per_s": {str(n): r for n, r in rates.items()},
                      "ratio": rates[args.procs] / rates[1]}))


if __name__ == "__main__":
    main()
