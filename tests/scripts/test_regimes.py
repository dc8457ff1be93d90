"""scripts/regimes/run.py on its smoke preset, and the pieces of scripts.regimes.regimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scripts.regimes.regimes import Regime, format_verdicts, regimes, verdict

SCRIPT = Path(__file__).parents[2] / "scripts" / "regimes" / "run.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(out: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_regimes_smoke(tmp_path):
    methods = ["lora", "lora-ts", "ensemble-lora", "abmll"]
    last = _run(tmp_path, "--set", "steps=1", "--methods", *methods, "--shots", "1", "4",
                "--budgets", "2", "4")
    names = ["k1-K2", "k4-K2", "k16-K2", "k16-K4"]  # smoke's K is 2: k = 16 at K = 2 is on both curves, once
    assert list(last) == names and all(list(last[r]) == methods for r in names)
    summary = json.loads((tmp_path / "regimes.json").read_text())
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["abmll", "lora"]  # lora's run serves the twins
    for name in names:
        regime = summary["regimes"][name]
        assert {r["config"]["shots"] for r in (json.loads((tmp_path / name / m / "results.json").read_text())
                                               for m in methods)} == {regime["shots"]}
        for m in methods:
            assert (tmp_path / name / m / "predictions.jsonl").exists()
            row = regime["methods"][m]
            assert row["ece"]["se"] > 0 and 0 <= row["ece_floor"] and 0 <= row["epistemic_share"] <= 1
            assert row["cost"]["adapt_s_per_task"] >= 0
        assert set(regime["paired"]) == set(methods) - {"abmll"}
        for row in regime["paired"].values():  # an interval around each difference
            lo, hi = row["nll"]["ci95"]
            assert lo <= row["nll"]["diff"] <= hi and row["nll"]["verdict"] in ("beats", "loses", "level")
        # the same query examples for every method within a regime (paired on them)
        keys = {m: [(r["task"], r["index"]) for r in map(json.loads, (tmp_path / name / m / "predictions.jsonl").open())]
                for m in methods}
        assert all(k == keys["abmll"] for k in keys.values())
        assert "epistemic share" in (tmp_path / name / "regime.md").read_text()
    assert (tmp_path / "tables.md").read_text().count("| abmll |") == len(names)
    assert (tmp_path / "verdicts.md").read_text().count("- k = ") == len(names)
    for plot in ("nll_vs_shots", "ece_vs_shots", "nll_vs_budget", "ece_vs_budget"):
        assert (tmp_path / f"{plot}.png").exists()
    # a second call resumes: every finished evaluation is reused, nothing retrained
    stamp = (tmp_path / "k4-K2" / "abmll" / "results.json").stat().st_mtime_ns
    assert _run(tmp_path, "--set", "steps=1", "--methods", *methods, "--shots", "1", "4",
                "--budgets", "2", "4") == last
    assert (tmp_path / "k4-K2" / "abmll" / "results.json").stat().st_mtime_ns == stamp



def test_regimes_reuses_runs(tmp_path):
    first = tmp_path / "first"
    before = _run(first, "--set", "steps=1", "--methods", "lora", "abmll", "--shots", "1", "--budgets")
    second = tmp_path / "second"
    # lora's run serves its twin laplace-lora too; nothing is trained again
    last = _run(second, "--set", "steps=1", f"tasks={first / 'tasks'}", "--methods", "laplace-lora", "abmll",
                "--shots", "1", "--budgets", "--runs", f"lora={first / 'runs' / 'lora'}", f"abmll={first / 'runs' / 'abmll'}")
    assert list(last) == ["k1-K2"] and not (second / "runs").exists()
    assert last["k1-K2"]["abmll"] == before["k1-K2"]["abmll"]  # the same trained state on the same examples
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(tmp_path / "third"), "--quiet",
                           "--set", "steps=1", "rank=4", f"tasks={first / 'tasks'}", "--methods", "abmll", "--shots", "1",
                           "--budgets", "--runs", f"abmll={first / 'runs' / 'abmll'}"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0 and "rank=2 (study: 4)" in done.stderr


def test_regimes_plan_and_verdict():
    assert regimes([1, 16], [5, 20], 5) == [Regime(1, 5), Regime(16, 5), Regime(16, 20)]
    row = {"accuracy": {"diff": 0.1, "excludes_zero": True}, "nll": {"diff": 0.1, "excludes_zero": True},
           "ece": {"diff": -0.1, "excludes_zero": False}}
    assert [verdict(row, m) for m in ("accuracy", "nll", "ece")] == ["beats", "loses", "level"]
    row["brier"] = {"diff": 0.0, "excludes_zero": False}
    paired = {m: {"diff": row[m]["diff"], "verdict": verdict(row, m)} for m in row}
    text = format_verdicts({"regimes": {"k1-K5": {"shots": 1, "num_inner_steps": 5, "reference": "abmll",
                                                  "paired": {"lora": paired}}}})
    assert text == "- k = 1, K = 5: abmll against lora (beats on accuracy; loses on NLL; level on Brier, ECE).\n"
