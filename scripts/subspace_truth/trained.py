"""A trained ABMLL run with a task subspace, for the probes that read one (``scale_probe.py``,
``marginal_probe.py``): loading it, and the probes' common handling of a bad run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from abmll_pyro.train.checkpoint import CheckpointError, load_latest
from abmll_pyro.train.config import ConfigError, RunConfig
from abmll_pyro.train.setup import build

__all__ = ["load_subspace_run", "run_probe_main"]


def load_subspace_run(run: Path):
    """``(config, built, taskset)`` of ``run``: its config and newest checkpoint's state; a run without a
    checkpoint or without a task subspace is an error naming it."""
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()), where=str(run / "config.json"))
    checkpoint = load_latest(run)
    if checkpoint is None:
        raise CheckpointError(f"{run}: no checkpoint")
    built, taskset = build(config)
    built.method.load_state_tensors(checkpoint.tensors)
    if built.method.svi.subspace is None:
        raise ConfigError(f"{run / 'config.json'}: subspace_dim is 0 (no task subspace to probe)")
    return config, built, taskset


def run_probe_main(run: Path, probe: Callable[[], object]) -> int:
    """Exit status of ``probe()`` on ``run``: 2 with one line on stderr when ``run`` is not a run folder
    or cannot be probed, else 0."""
    if not (run / "config.json").is_file():
        print(f"error: {run / 'config.json'}: no such file (--run names a run folder)", file=sys.stderr)
        return 2
    try:
        probe()
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
