"""Every experiment script runs its smoke preset end to end (tiny random Llama, generated tasks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[2] / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(script: str, out: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPTS / script), "--preset", "smoke", "--out", str(out), "--quiet",
                           *extra], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_beta_ablation(tmp_path):
    summary = _run("beta_ablation/run.py", tmp_path, "--set", "steps=2")
    assert len(summary["accuracy"]) == len(summary["ece"]) == 5
    assert (tmp_path / "beta_accuracy.png").exists() and (tmp_path / "beta_ece.png").exists()
    runs = json.loads((tmp_path / "beta_ablation.json").read_text())["runs"]
    betas = sorted({json.loads((tmp_path / "runs" / f"beta{r['log10_kl_beta']:g}-seed0" / "config.json").read_text())["kl_beta"]
                    for r in runs})
    assert betas == pytest.approx([1e-16, 1e-12, 1e-8, 1e-4, 1.0])
    for r in runs:  # pooled metrics and the posterior's width per β
        assert 0 <= r["accuracy"] <= 1 and r["n"] > 0 and r["sigma_theta"] > 0 and r["sigma_q"] > 0 and r["epistemic"] >= 0
    assert (tmp_path / "beta_nll.png").exists() and (tmp_path / "beta_epistemic.png").exists()
    again = _run("beta_ablation/run.py", tmp_path, "--set", "steps=2", "--log10-betas", "0", "--kl-gamma", "1e-8")
    config = json.loads((tmp_path / "runs" / "beta0-gamma1e-08-seed0" / "config.json").read_text())
    assert config["kl_beta"] == 1.0 and config["kl_gamma"] == pytest.approx(1e-8) and len(again["accuracy"]) == 1


def test_pruning(tmp_path):
    curves = _run("pruning/run.py", tmp_path, "--set", "steps=2")
    assert set(curves) == {"abmll", "lora", "reptile"}
    for c in curves.values():
        assert len(c["accuracy"]) == 4 and c["accuracy_drop"][0] == 0.0
    assert (tmp_path / "pruning_accuracy.png").exists()


def test_cost(tmp_path):
    import re

    done = subprocess.run([sys.executable, str(SCRIPTS / "cost/run.py"), "--preset", "smoke", "--out", str(tmp_path),
                           "--quiet", "--steps", "1", "--set", "last_layers=1", "--proxy", "off"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *_, above, last = done.stdout.strip().splitlines()
    match = re.fullmatch(r"projected_memory_ratio_8b=nan time_ratio_abmll_lora=(\S+) memory_ratio_abmll_lora=(\S+)", last)
    assert match, last
    assert all(float(x) > 0 for x in match.groups())
    assert float(re.fullmatch(r"speedup_trunk_cache=(\S+)", above).group(1)) > 0
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["cache_on"]["trunk_cache"] and not cost["cache_off"]["trunk_cache"]
    assert cost["lora_all_blocks"]["method"] == "lora" and cost["abmll_all_blocks"]["last_layers"] is None
    assert set(cost["dense_buffers_per_module"].values()) == {0}  # factor-backed (lora/factored.py)
    assert cost["dense_buffers_per_module_dense_path"]["inner_step"] <= 3


def test_scaling(tmp_path):
    out = _run("scaling/run.py", tmp_path, "--task-counts", "3", "12")
    assert len(out["peak_memory_mb"]) == 2 and out["memory_ratio"] > 0


def test_neuron_masks_zero_the_smallest_rows():
    import torch

    from abmll_pyro.lms import tiny_model
    from abmll_pyro.lora import BayesLoRA
    from scripts.pruning.pruning import neuron_masks

    lm, _ = tiny_model("llama")
    adapter = BayesLoRA(lm)
    masks = neuron_masks(adapter, 0.25)
    for name, mask in masks.items():
        norms = adapter.layers[name].base.weight.norm(dim=1)
        k = round(0.25 * norms.numel())
        assert int((mask == 0).sum()) == k
        assert norms[mask == 0].max() <= norms[mask == 1].min()
    assert all(bool((m == 1).all()) for m in neuron_masks(adapter, 0.0).values())


def test_uncertainty(tmp_path):
    out = _run("uncertainty/run.py", tmp_path, "--set", "steps=1", "--methods", "abmll", "bayes-lora", "--shots", "0", "1", "4")
    assert set(out) == {"abmll", "bayes-lora"} and all(list(v) == ["0", "1", "4"] for v in out.values())
    assert all(e >= 0 for v in out.values() for e in v.values())
    result = json.loads((tmp_path / "uncertainty.json").read_text())
    for entry in result["methods"].values():
        for row in entry["curve"]:
            assert row["entropy"] == pytest.approx(row["aleatoric"] + row["epistemic"], abs=1e-9)
        assert entry["selective"]["shots"] == 4 and len(entry["selective"]["by_total"]) == 10
        assert entry["selective"]["by_total"][-1] == pytest.approx(entry["curve"][-1]["accuracy"])  # 100% coverage
    for name in ("epistemic_vs_shots", "selective_total", "selective_epistemic"):
        assert (tmp_path / f"{name}.png").exists()
    # every (method, k) wrote its per-example predictions, keyed alike; the shrinkage summary pairs them
    names = sorted(f.name for f in (tmp_path / "predictions").iterdir())
    assert names == sorted(f"{m}-k{k}.predictions.jsonl" for m in ("abmll", "bayes-lora") for k in (0, 1, 4))
    done = subprocess.run([sys.executable, str(SCRIPTS / "uncertainty/shrinkage.py"), str(tmp_path), "--out", str(tmp_path / "shr"),
                           "--resamples", "200", "--label", str(tmp_path), "bayes-lora", "fixed-prior"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    goals = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"k1_not_above_k0", "k4_not_above_k0", "k1_below_fixed-prior", "k4_within_0.02_of_best"} <= set(goals)
    summary = json.loads((tmp_path / "shr" / "shrinkage.json").read_text())
    for k in ("0", "1", "4"):  # the pooled NLL equals the study's own figure for that k
        row = next(r for r in result["methods"]["abmll"]["curve"] if str(r["shots"]) == k)
        assert summary["per_k"][k]["metrics"]["abmll"]["nll"]["value"] == pytest.approx(row["nll"], rel=1e-6)
    paired = summary["per_k"]["4"]["paired"]
    diff = summary["per_k"]["4"]["metrics"]["abmll"]["nll"]["value"] - summary["per_k"]["0"]["metrics"]["abmll"]["nll"]["value"]
    assert paired["abmll@k0"]["nll"]["diff"] == pytest.approx(diff, abs=1e-9)  # the same examples at every k
    assert "| abmll at k = 0 |" in (tmp_path / "shr" / "shrinkage.md").read_text()
    empty = subprocess.run([sys.executable, str(SCRIPTS / "uncertainty/shrinkage.py"), str(tmp_path / "shr"), "--out",
                            str(tmp_path / "y")], capture_output=True, text=True, env=ENV, timeout=120)
    assert empty.returncode == 2 and "no <method>-k<k>" in empty.stderr and "Traceback" not in empty.stderr


def test_uncertainty_reuses_a_run_and_measures_out_of_family(tmp_path):
    first = tmp_path / "first"
    _run("uncertainty/run.py", first, "--set", "steps=1", "--methods", "abmll", "--shots", "2")
    run = first / "runs" / "abmll"
    stamp = (run / "results.json").stat().st_mtime_ns
    # the "other suite" is the run's own generated tasks: out of family must equal in family exactly
    second = tmp_path / "second"
    _run("uncertainty/run.py", second, "--set", "steps=1", f"tasks={first / 'tasks'}", "--methods", "abmll",
         "--shots", "2", "--runs", f"abmll={run}", "--ood-tasks", str(first / "tasks"))
    assert not (second / "runs").exists() and (run / "results.json").stat().st_mtime_ns == stamp  # not retrained
    entry = json.loads((second / "uncertainty.json").read_text())["methods"]["abmll"]
    assert entry["curve"] == json.loads((first / "uncertainty.json").read_text())["methods"]["abmll"]["curve"]
    ood = entry["out_of_family"]
    assert ood["in"] == ood["out"] and ood["epistemic_out_minus_in"]["diff"] == 0.0
    share = ood["epistemic_share"]
    assert share["in"] == share["out"] == pytest.approx(ood["in"]["epistemic"] / ood["in"]["entropy"])
    assert (second / "out_of_family.png").exists()
    # a second call with the same settings resumes: the finished method is taken from uncertainty.json
    before = (second / "uncertainty.json").read_text()
    _run("uncertainty/run.py", second, "--set", "steps=1", f"tasks={first / 'tasks'}", "--methods", "abmll",
         "--shots", "2", "--runs", f"abmll={tmp_path / 'first' / 'runs' / 'abmll'}", "--ood-tasks", str(first / "tasks"))
    assert json.loads((second / "uncertainty.json").read_text()) == json.loads(before)
    bad = subprocess.run([sys.executable, str(SCRIPTS / "uncertainty/run.py"), "--preset", "smoke", "--out", str(tmp_path / "x"),
                          "--runs", f"abmll={tmp_path / 'nowhere'}"], capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "not a finished run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_difference_interval():
    import torch

    from scripts.uncertainty.curves import difference_interval

    a = [torch.zeros(5), torch.zeros(3)]
    b = [torch.ones(4), 3 * torch.ones(4)]
    d, lo, hi = difference_interval(a, b)
    assert d == 2.0 and 1.0 <= lo <= d <= hi <= 3.0
    assert difference_interval(a, a)[1:] == (0.0, 0.0)


def test_roundoff_growth(tmp_path):
    """Two runs from one start are identical (rel 0: the probe compares like with like); an ulp-sized
    start differs by about 2^-23 before the first step."""
    same = _run("roundoff/run.py", tmp_path / "same", "--method", "abmll", "--steps", "2", "--rel", "0")
    assert set(same["divergence"]) == {"mu_A", "mu_B", "sigma_A", "sigma_B"}
    assert all(v == 0.0 for d in same["divergence"].values() for v in d) and len(same["divergence"]["mu_A"]) == 3
    ulp = _run("roundoff/run.py", tmp_path / "ulp", "--method", "lora", "--steps", "2")
    assert list(ulp["divergence"]) == ["all"] and 1e-8 < ulp["divergence"]["all"][0] < 1e-6
    assert json.loads((tmp_path / "ulp" / "roundoff_growth.json").read_text())["method"] == "lora"
    bad = subprocess.run([sys.executable, str(SCRIPTS / "roundoff/run.py"), "--preset", "smoke", "--out",
                          str(tmp_path / "bad"), "--method", "pretrained"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "trains nothing" in bad.stderr


def test_known_truth(tmp_path):
    summary = _run("known_truth.py", tmp_path, "--spreads", "0.2")
    assert set(summary) == {"0.2"} and summary["0.2"]["sigma_theta"] > 0 and 0 <= summary["0.2"]["sbc_p"] <= 1
    runs = json.loads((tmp_path / "known_truth.json").read_text())["runs"]
    assert runs[0]["spread"] == 0.2 and sum(runs[0]["sbc"]["histogram"]) == runs[0]["sbc"]["num_ranks"]
    assert (tmp_path / "sbc_ranks.png").exists()
    bad = subprocess.run([sys.executable, str(SCRIPTS / "known_truth.py"), "--out", str(tmp_path), "--set", "nope=1"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope=1" in bad.stderr


def test_known_truth_beta(tmp_path):
    """Two smoke studies (β = 1, 3) and their paired summary; a second call reuses them."""
    args = [sys.executable, str(SCRIPTS / "known_truth_beta/run.py"), "--out", str(tmp_path), "--preset", "smoke", "--steps", "2",
            "--eval-shots", "1,2", "--spreads", "0.3", "--betas", "1", "3"]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(json.loads(done.stdout.strip().splitlines()[-1])["0.3"]) == {"k1", "k4"}
    result = json.loads((tmp_path / "beta.json").read_text())
    one, three = sorted(result["runs"], key=lambda r: r["kl_beta"])
    assert one["shots"] == [0, 1, 2, 4] and "vs_beta1" not in one and set(one["vs_k0"]) == {"k1", "k2", "k4"}
    study = json.loads((tmp_path / "s0.3-beta3" / "known_truth.json").read_text())["runs"][0]
    ref = json.loads((tmp_path / "s0.3-beta1" / "known_truth.json").read_text())["runs"][0]
    diff = three["vs_beta1"]["k4"]["diff"]
    assert diff == pytest.approx(sum(a - b for a, b in zip(study["per_task"]["k4"], ref["per_task"]["k4"])) / 2, rel=1e-9)
    assert study["config"]["kl_beta"] == 3.0 and study["config"]["fine_tune"] is True
    stamp = (tmp_path / "s0.3-beta1" / "known_truth.json").stat().st_mtime_ns
    again = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and (tmp_path / "s0.3-beta1" / "known_truth.json").stat().st_mtime_ns == stamp
