"""Headroom per task: zero-shot vs per-task Regular LoRA on 16 shots, gain with a paired-bootstrap 95% CI.

Resumable: one JSON per task under --out; rerun the same command to continue, add --table to print
the markdown tables of whatever finished.

    python scripts/headroom/run.py --tasks debian-cls --splits test dev train --out runs/headroom-debian-cls
    python scripts/headroom/run.py --tasks bigbench --out runs/headroom-bigbench --table
    python scripts/headroom/run.py --smoke --out /tmp/headroom-smoke      # tiny random model, generated tasks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

import torch

from abmll_pyro.config import AdapterConfig
from abmll_pyro.data.scoring import SCORE_REDUCTIONS
from abmll_pyro.data.sources import load_tasks
from abmll_pyro.lms import load_lm
from abmll_pyro.lora.adapter import BayesLoRA
from abmll_pyro.presets import synthetic_task_folder
from abmll_pyro.train.setup import fit_tasks, last_layer_targets, seed_everything
from scripts._common import prog
from scripts.headroom.headroom import (HeadroomConfig, headroom_summary, headroom_table, headroom_table_wide,
                                       headroom_tasks, run_headroom)

try:  # the frozen-trunk cache (issue 8): exact, and it skips the frozen lower blocks on every pass
    from abmll_pyro.data.trunk import attach_trunk_cache
except ImportError:
    attach_trunk_cache = None


def write_subset(path: Path, suite: str, results: list[dict], reductions: list[str], min_gain: float) -> None:
    """``path``: {"note", "min_gain", "split": "test", "tasks": {suite: {reduction: [names]}}}; other
    suites already in the file are kept."""
    expected = [t.name for t in load_tasks(suite)["test"]]
    chosen = {r: headroom_tasks(results, r, "test", expected, min_gain) for r in reductions}
    data = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    data.update(note=f"test tasks where per-task Regular LoRA on 16 shots beats zero-shot by >= {min_gain} "
                     "(accuracy, same query examples), chosen from that baseline alone; written by "
                     "scripts/headroom/run.py --table --subset (docs/data.md, 'Headroom')",
                min_gain=min_gain, split="test")
    data["tasks"][suite] = {**data["tasks"].get(suite, {}), **chosen}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for r, names in chosen.items():
        print(f"{suite} {r}: {len(names)} of {len(expected)} test tasks with gain >= {min_gain} -> {path}",
              file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="debian-cls", help="bigbench, debian-cls or a task folder")
    p.add_argument("--splits", nargs="+", default=["test", "dev", "train"], choices=["train", "dev", "test"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--last-layers", type=int, default=4, help="adapt the q/v projections of the top N blocks")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--query-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--reductions", nargs="+", default=["char", "sum"], choices=list(SCORE_REDUCTIONS),
                   help="score reductions (the config key score_reduction); LoRA is fitted once per reduction")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--drop-long-examples", action="store_true",
                   help="drop the examples whose prompt plus longest option exceeds --max-length (as the presets' "
                        "drop_long_examples does) instead of cutting prompts; a task left with fewer than "
                        "shots + 2 is recorded as skipped")
    p.add_argument("--max-tasks", type=int, help="at most N tasks per split (the split's first N)")
    p.add_argument("--only", nargs="+", help="only these task names (e.g. a convergence check at more --steps)")
    p.add_argument("--reverse", action="store_true", help="last task first (a second worker on the same --out)")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="print the tables of the finished tasks and stop")
    p.add_argument("--wide", action="store_true", help="with --table: one table, the reductions side by side")
    p.add_argument("--summary", action="store_true", help="with --table: first the per-split summary (means, counts, "
                   "support loss, core-minutes) per reduction")
    p.add_argument("--subset", type=Path, help="with --table and --tasks: write the test tasks with gain >= "
                   "--min-gain per reduction into this JSON (merged by suite); refuses unless every test task is done")
    p.add_argument("--min-gain", type=float, default=0.05)
    p.add_argument("--smoke", action="store_true", help="tiny-llama on generated tasks (a wiring check)")
    args = p.parse_args(argv)
    if args.table:
        results = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
        if args.summary:
            print(headroom_summary(results, args.reductions, args.min_gain) + "\n")
        if args.wide:
            print(headroom_table_wide(results, args.reductions, args.min_gain))
        for reduction in args.reductions:
            print(f"\n### reduction: {reduction}\n\n{headroom_table(results, reduction, args.min_gain)}")
            for split in ("test", "dev", "train"):
                names = sorted(r["task"] for r in results if r["split"] == split and reduction in r["reductions"]
                               and r["reductions"][reduction]["gain"] >= args.min_gain)
                done = sum(r["split"] == split and reduction in r["reductions"] for r in results)
                skips = sum(r["split"] == split and bool(r.get("skipped")) for r in results)
                print(f"\n{split}: {len(names)} of {done} measured with gain >= {args.min_gain}"
                      f"{f' ({skips} skipped)' if skips else ''}: {', '.join(names)}")
        if args.subset is not None:
            write_subset(args.subset, args.tasks, results, args.reductions, args.min_gain)
        return
    torch.set_num_threads(args.num_threads)
    if args.smoke:
        args.model, args.last_layers, args.steps, args.shots, args.query_size = "tiny-llama", 1, 3, 4, 8
        args.tasks = str(synthetic_task_folder(args.out / "tasks", num_train=1, num_test=1, examples=12))
    config = HeadroomConfig(shots=args.shots, query_size=args.query_size, steps=args.steps, lr=args.lr,
                            reductions=tuple(args.reductions), max_length=args.max_length, seed=args.seed,
                            drop_long_examples=args.drop_long_examples)
    seed_everything(args.seed)
    lm, tokenizer = load_lm(args.model, seed=args.seed)
    if attach_trunk_cache is not None:
        attach_trunk_cache(lm)
    targets = last_layer_targets(lm, None, args.last_layers)
    adapter = BayesLoRA(lm, AdapterConfig(rank=args.rank, lora_alpha=args.lora_alpha, target_modules=targets))
    taskset, skipped = load_tasks(args.tasks), {}
    if args.drop_long_examples:
        where = {t.name: s for s in args.splits for t in taskset[s][: args.max_tasks]}
        taskset, report = fit_tasks(taskset, tokenizer, args.max_length, args.shots + 2)
        skipped = {name: (where[name], f"{report['kept'][name][0]} of {report['kept'][name][1]} examples fit "
                                       f"max_length={args.max_length}; needs shots + 2 = {args.shots + 2}")
                   for name in report["dropped_tasks"] if name in where}
    tasks = [(s, t) for s in args.splits for t in taskset[s][: args.max_tasks]]
    if args.only:
        unknown = set(args.only) - {t.name for _, t in tasks}
        if unknown:
            raise SystemExit(f"--only: not in the chosen splits of {args.tasks}: {sorted(unknown)}")
        tasks = [(s, t) for s, t in tasks if t.name in args.only]
    tasks = tasks[::-1] if args.reverse else tasks
    if args.only:
        skipped = {k: v for k, v in skipped.items() if k in args.only}
    run_headroom(adapter, tokenizer, tasks, args.out, config,
                 log=lambda line: print(line, file=sys.stderr, flush=True), skipped=skipped)


if __name__ == "__main__":
    main()
