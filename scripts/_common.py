"""Shared by the studies: a preset plus ``--set KEY=VALUE`` overrides, ``--runs METHOD=RUN_DIR``, a run
trained once and reused, and a plot that is skipped (with a warning) without matplotlib."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from abmll_pyro.presets import get_preset, synthetic_task_folder
from abmll_pyro.train.config import RunConfig, load_yaml
from abmll_pyro.train.run import RESULTS, train_run

# the scripts' own smoke preset: the benchmark's smoke settings on more generated tasks
SMOKE_TASKS = dict(num_train=12, num_test=3, examples=16)


def prog() -> str:
    """``scripts/<study>/run.py`` (not every driver's bare ``run.py``) for usage and error lines."""
    return "/".join(Path(sys.argv[0]).parts[-3:])


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog(), description=description)
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
    values.update(overrides(args.set, "--set"))
    return RunConfig.from_dict(values, where="--preset/--set")


def overrides(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` items as a dict, each value read as YAML (``1e-8`` a float, ``true`` a bool)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: {flag} expects KEY=VALUE, got {item!r}", file=sys.stderr)
            raise SystemExit(2)
        values[key] = load_yaml(value)
    return values


def trained_runs(p: argparse.ArgumentParser, items: list[str]) -> dict[str, Path]:
    """``--runs METHOD=RUN_DIR ...`` as ``{method: run dir}``; a malformed item or a directory without
    ``results.json`` is a usage error naming it."""
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--runs expects METHOD=RUN_DIR, got {item!r}")
        if not (Path(path) / "results.json").is_file():
            p.error(f"--runs {item}: {path} is not a finished run directory (no results.json)")
        runs[name] = Path(path)
    return runs


def trained(config: RunConfig, run_dir: Path, progress: bool) -> dict:
    """``run_dir``'s results.json when the run finished there, else train it now."""
    done = run_dir / RESULTS
    if done.exists():
        return json.loads(done.read_text())
    return train_run(config, run_dir, progress=progress)


def plot(xs, ys, xlabel, ylabel, path, yerr=None):
    """:func:`~abmll_pyro.eval.plots.plot_metric_curve`, or a warning where matplotlib is missing."""
    try:
        from abmll_pyro.eval.plots import plot_metric_curve

        return plot_metric_curve(xs, ys, xlabel, ylabel, path, yerr)
    except ImportError as err:
        warnings.warn(f"plot {path} skipped: {err}")
