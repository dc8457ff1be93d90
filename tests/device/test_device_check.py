"""scripts/device_check/run.py: ``--device cpu --quick`` runs every stage and writes the summary table.

Measured on the shared 2-core machine: 40 s at load average 3, about two minutes at load 5 (five fresh
processes, each importing torch and transformers).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_check" / "run.py"
ROW_KEYS = {"stage", "model", "method", "dtype", "status", "tokens_per_s", "peak_memory_mb", "seconds", "note"}


@pytest.mark.slow
def test_quick_cpu_run_fills_the_summary(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "device_check.json").read_text())
    assert summary["device"] == "cpu" and summary["quick"] is True and summary["wall_time_s"] > 0
    rows = summary["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [r["stage"] for r in rows] == ["tests", "smoke", "smoke", "cpu", "paper", "paper"]
    assert {r["status"] for r in rows if r["stage"] != "cpu"} == {"ok"}
    assert rows[3]["status"] == "skipped" and rows[3]["note"] == "skipped by --quick"
    assert "1 passed" in rows[0]["note"]
    assert {r["method"] for r in rows if r["stage"] == "smoke"} == {"lora", "abmll"}
    paper = [r for r in rows if r["stage"] == "paper"]
    assert [(r["method"], r["dtype"]) for r in paper] == [("abmll", "bf16"), ("abmll", "fp32")]
    for r in rows[1:3] + paper:
        assert r["peak_memory_mb"] > 0 and r["seconds"] > 0, r
    assert all(r["tokens_per_s"] > 0 for r in paper)
    # the printed table holds one line per row (plus header, rule and the skip's note)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    spec = importlib.util.spec_from_file_location("device_check_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda but torch sees no CUDA GPU" in err
    assert not (tmp_path / "o").exists()
