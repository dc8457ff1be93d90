"""Shared argument handling of the experiment scripts: a preset plus ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from abmll_pyro.presets import get_preset, synthetic_task_folder
from abmll_pyro.train.config import RunConfig

# the scripts' own smoke preset: the benchmark's smoke settings on more generated tasks
SMOKE_TASKS = dict(num_train=12, num_test=3, examples=16)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=["smoke", "cpu", "cpu-long", "paper"], default="smoke")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--quiet", action="store_true")
    return p


def base_config(args: argparse.Namespace, synthetic: dict | None = None, force_synthetic: bool = False) -> RunConfig:
    """The preset's config; generated tasks for the smoke preset (or whenever ``force_synthetic``)."""
    preset = get_preset(args.preset)
    values = dict(preset.config)
    if preset.synthetic is not None or force_synthetic:
        values["tasks"] = str(synthetic_task_folder(args.out / "tasks", **(synthetic or SMOKE_TASKS)))
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        values[key] = yaml.safe_load(value)
    return RunConfig.from_dict(values, where="--preset/--set")
