"""scripts/cost/flops.py on the smoke preset: the last line, the analytic count against torch's
FlopCounterMode, and one-line usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "cost" / "flops.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
LAST = re.compile(r"adapt_seconds=(\S+) flop_limit_seconds=(\S+) ratio_to_limit=(\S+)")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True,
                          env=ENV, timeout=120)


@pytest.mark.parametrize("last_layers", ["1", "null"])  # the cpu preset's shape (trunk cached), every block adapted
def test_flops_smoke(tmp_path, last_layers):
    done = _run(tmp_path, "--preset", "smoke", "--tasks", "2", "--repeats", "2", "--set", f"last_layers={last_layers}")
    assert done.returncode == 0, done.stderr[-3000:]
    match = LAST.fullmatch(done.stdout.strip().splitlines()[-1])
    assert match, done.stdout
    adapt, limit, ratio = map(float, match.groups())
    assert adapt > 0 and limit > 0 and ratio == pytest.approx(adapt / limit, rel=1e-2)  # printed to 6 and 2 digits
    out = json.loads((tmp_path / "flops.json").read_text())
    # exact but for FactorValue.dtype's 1 x 1 probe products (2·r FLOPs each, ~1e-5 of a smoke step), which
    # the count leaves out: a missed or doubled matmul of the step would be off by > 1e-3
    assert abs(out["counter_rel_diff_math_sdpa"]) < 1e-4 and abs(out["counter_rel_diff_default_sdpa"]) < 1e-4
    assert out["lowest_adapted_block"] == (1 if last_layers == "1" else 0) and out["trunk_misses_timed"] == 0
    step = out["step_flops_task0"]
    assert sum(out["step_flops_by_shape_task0"].values()) == step["needed"]["total"]
    assert step["needed"]["total"] <= step["executed"]["total"] and out["needed_flops"] <= out["executed_flops"]
    assert set(out["by_clock"]) == {"cpu", "wall"} and out["clock"] == "cpu"


@pytest.mark.parametrize("extra, message", [(["--tasks", "0"], "--tasks must be >= 1"),
                                            (["--set", "nope=1"], "nope")])
def test_flops_bad_input(tmp_path, extra, message):
    bad = _run(tmp_path, "--preset", "smoke", *extra)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr
