"""Compact prediction files (float32 precision, xz) are read by `abmll compare` as the plain ones are,
and the tables they give agree to float32 round-off."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abmll_pyro.cli import main
from abmll_pyro.eval.compare import find_prediction_files, load_predictions, summarize
from abmll_pyro.eval.predictions_io import compact_predictions, compact_record, open_predictions

ROOT = Path(__file__).resolve().parents[2]


def _run(path: Path, method: str, seed: int = 0, n: int = 60) -> Path:
    rng = np.random.default_rng(seed + len(method))
    path.mkdir(parents=True)
    with open(path / "predictions.jsonl", "w") as fh:
        for i in range(n):
            logits = rng.normal(size=3)
            p = np.exp(logits) / np.exp(logits).sum()
            fh.write(json.dumps({"method": method, "seed": 0, "task": f"t{i % 4}", "index": i, "gold": i % 3,
                                 "probs": p.tolist(), "entropy": float(-(p * np.log(p)).sum())}) + "\n")
    return path


def test_compact_record_keeps_float32_precision_only():
    rec = compact_record({"method": "m", "index": 3, "probs": [0.1234567890123, 0.8765432109877], "entropy": 1 / 3})
    assert rec["index"] == 3 and rec["method"] == "m"
    assert rec["probs"] == [0.12345679, 0.8765432]  # the shortest decimals that round-trip the float32 values
    assert abs(rec["entropy"] - 1 / 3) < 1e-7 and len(repr(rec["entropy"])) <= 12


def test_compact_files_give_the_same_table(tmp_path):
    a, b = _run(tmp_path / "plain" / "a", "lora"), _run(tmp_path / "plain" / "b", "abmll")
    for run in (a, b):
        compact_predictions(run / "predictions.jsonl", tmp_path / "compact" / run.name / "predictions.jsonl.xz")
    plain = {r["method"]: r for r in summarize(load_predictions([a, b]), num_bins=15, num_resamples=200, seed=0)}
    compact_dirs = [tmp_path / "compact" / "a", tmp_path / "compact" / "b"]
    assert [f.name for f in find_prediction_files(compact_dirs)] == ["predictions.jsonl.xz"] * 2
    compact = {r["method"]: r for r in summarize(load_predictions(compact_dirs), num_bins=15, num_resamples=200, seed=0)}
    for method in ("lora", "abmll"):
        for key in ("accuracy", "nll", "brier", "ece"):
            assert compact[method][key]["value"] == pytest.approx(plain[method][key]["value"], abs=1e-6)  # float32 round-off
            assert compact[method][key]["se"] == pytest.approx(plain[method][key]["se"], abs=1e-6)
    size = sum((d / "predictions.jsonl.xz").stat().st_size for d in compact_dirs)
    assert size * 3 < sum((d / "predictions.jsonl").stat().st_size for d in (a, b))


def test_gzip_files_and_the_cli_read_them(tmp_path, capsys):
    run = _run(tmp_path / "a", "lora")
    with gzip.open(tmp_path / "a.predictions.jsonl.gz", "wt") as out:
        out.write((run / "predictions.jsonl").read_text())
    with open_predictions(tmp_path / "a.predictions.jsonl.gz") as fh:
        assert fh.read() == (run / "predictions.jsonl").read_text()
    other = compact_predictions(_run(tmp_path / "b", "abmll") / "predictions.jsonl")
    assert other.name == "predictions.jsonl.xz"
    assert main(["compare", str(tmp_path / "a.predictions.jsonl.gz"), str(other), "--reference", "abmll"]) == 0
    assert "| lora |" in capsys.readouterr().out


def test_compact_refuses_to_overwrite_its_source(tmp_path):
    src = compact_predictions(_run(tmp_path / "a", "lora") / "predictions.jsonl")
    with pytest.raises(ValueError, match="overwrite its own source"):
        compact_predictions(src, src)


def test_the_script_compacts_a_folder(tmp_path):
    _run(tmp_path / "res" / "r1", "lora")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compact_predictions.py"), str(tmp_path / "res")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "res" / "r1" / "predictions.jsonl.xz").is_file() and not (tmp_path / "res" / "r1" / "predictions.jsonl").exists()
    assert done.stdout.startswith("1 files:")
