"""scripts/distributed_speed/run.py on its smoke preset: 1 and 2 torchrun processes, a rate for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "distributed_speed" / "run.py"
ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_distributed_speed_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(tmp_path), "--set", "steps=3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rates = summary["steps_per_s"]
    assert set(rates) == {"1", "2"} and all(r > 0 for r in rates.values())
    assert summary["ratio"] == pytest.approx(rates["2"] / rates["1"])
    # the 2-process run logged each step once, with the 1-process run's losses
    logs = [[json.loads(line) for line in (tmp_path / f"procs{n}" / "metrics.jsonl").read_text().splitlines()]
            for n in (1, 2)]
    assert [m["step"] for m in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
