"""The task subspace's scripts: the known-truth study's summary (from committed-format study files, no
training), the scale probe and the marginal-likelihood probe on a tiny trained run; bad input exits 2
with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abmll_pyro.presets import synthetic_task_folder
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.run import train_run

SCRIPTS = Path(__file__).parents[2] / "scripts" / "subspace_truth"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=ENV, timeout=600)


def test_the_study_summarizes_existing_studies(tmp_path):
    """--summarize-only reads the per-study files the committed summary was made from (here: its own
    rows written back as study files) and reproduces the committed table."""
    committed = Path(__file__).parents[2] / "docs" / "results" / "subspace-truth"
    for study in json.loads((committed / "summary.json").read_text())["studies"]:
        c = study["config"]
        (tmp_path / f"s{c['spread']:g}-start{c['init_scale']:g}.json").write_text(json.dumps(study))
    done = _script("run.py", "--out", str(tmp_path), "--spreads", "3", "10", "30", "--summarize-only")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "summary.md").read_text() == (committed / "summary.md").read_text()
    assert done.stdout.strip().splitlines()[-1].startswith("worst_ratio=0.313 ")
    missing = _script("run.py", "--out", str(tmp_path / "none"), "--spreads", "3", "--summarize-only")
    assert missing.returncode != 0 and "missing" in missing.stderr
    bad = _script("run.py", "--out", str(tmp_path), "--spreads", "-1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "spreads" in bad.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny ABMLL run with a 2-direction task subspace (2 outer steps on the generated tasks)."""
    root = tmp_path_factory.mktemp("subspace-run")
    tasks = synthetic_task_folder(root / "tasks")
    config = RunConfig(method="abmll", model="tiny-llama", tasks=str(tasks), steps=2, tasks_per_step=2, shots=3,
                       query_size=3, rank=2, num_inner_steps=1, inner_lr=1e-2, kl_beta=1e-3, max_test_tasks=1,
                       eval_query_size=3, num_threads=1, num_samples=2, subspace_dim=2, subspace_scale=0.5)
    train_run(config, root / "run", progress=False)
    return root / "run"


def test_the_scale_probe_on_a_tiny_run(tmp_path, tiny_run):
    out = tmp_path / "probe.json"
    done = _script("scale_probe.py", "--run", str(tiny_run), "--factors", "1", "4", "--shots", "0", "2",
                   "--queries", "3", "--samples", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["factor"], r["shots"]) for r in rows] == [(1.0, 0), (1.0, 2), (4.0, 0), (4.0, 2)]
    assert all(r["n"] == 3 and r["nll"] > 0 for r in rows)  # max_test_tasks=1: one task × 3 queries
    assert rows[2]["epistemic_share"] > rows[0]["epistemic_share"]  # a wider prior: draws disagree more
    for args, needle in ((["--run", str(tmp_path / "nowhere")], "config.json"),
                         (["--run", str(tiny_run), "--factors", "0"], "factors")):
        bad = _script("scale_probe.py", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr


def test_the_marginal_summary_on_closed_forms():
    """Per-example predictive and joint marginal likelihood from R draws' log-probabilities."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from marginal_probe import summarize
    finally:
        sys.path.remove(str(SCRIPTS))
    same = summarize(torch.full((4, 2), -0.5, dtype=torch.float64), torch.full((4, 3), -1.0, dtype=torch.float64))
    assert same["log_pred_sum"] == pytest.approx(-3.0) and same["log_ml"] == pytest.approx(-4.0)
    assert same["ess"] == pytest.approx(4.0) and (same["n_query"], same["n_all"]) == (3, 5)
    # two draws, one query example each way round: per example log((0.9 + 0.1)/2) twice; jointly the
    # product 0.09 under both draws: log 0.09
    q = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64).log()
    mixed = summarize(torch.zeros(2, 0, dtype=torch.float64), q)
    assert mixed["log_pred_sum"] == pytest.approx(2 * torch.tensor(0.5).log().item())
    assert mixed["log_ml"] == pytest.approx(torch.tensor(0.09).log().item()) and mixed["ess"] == pytest.approx(2.0)
    # one draw explains both examples: the joint prefers it (weight 0.81 / 0.82), ESS near 1
    q = torch.tensor([[0.9, 0.9], [0.1, 0.1]], dtype=torch.float64).log()
    skew = summarize(torch.zeros(2, 0, dtype=torch.float64), q)
    assert skew["log_ml"] == pytest.approx(torch.tensor((0.81 + 0.01) / 2).log().item())
    assert skew["ess"] == pytest.approx(1 / ((0.81 / 0.82) ** 2 + (0.01 / 0.82) ** 2))


def test_the_marginal_probe_on_a_tiny_run(tmp_path, tiny_run):
    out = tmp_path / "marginal.json"
    done = _script("marginal_probe.py", "--run", str(tiny_run), "--split", "test", "--factors", "1", "4",
                   "--draws", "4", "--shots", "3", "--queries", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["factor"] for r in rows] == [1.0, 4.0] and all(r["tasks"] == 1 and r["draws"] == 4 for r in rows)
    for r in rows:
        assert r["nll_per_example"] > 0 and r["joint_nll_per_example"] > 0 and 1.0 <= r["min_ess"] <= 4.0
        assert r["posterior_z2_ratio"] > 0 and r["q_z2_ratio"] > 0 and 1.0 <= r["min_support_ess"] <= 4.0
        task = r["per_task"][0]
        assert (task["n_query"], task["n_all"]) == (3, 6)
    assert rows[1]["mean_scale"] == pytest.approx(4 * rows[0]["mean_scale"])
    # no inner steps: q is the (rescaled) prior, E_q[z²]/s² = 1 at every scale
    still = tmp_path / "still.json"
    done = _script("marginal_probe.py", "--run", str(tiny_run), "--split", "test", "--factors", "1", "4",
                   "--draws", "2", "--shots", "3", "--queries", "3", "--inner-steps", "0", "--out", str(still))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["q_z2_ratio"] for r in json.loads(still.read_text())["rows"]] == pytest.approx([1.0, 1.0], rel=1e-5)
    for args, needle in ((["--run", str(tmp_path / "nowhere")], "config.json"),
                         (["--run", str(tiny_run), "--draws", "1"], "draws"),
                         (["--run", str(tiny_run), "--subspace-inner-lr", "2"], "subspace-inner-lr"),
                         (["--run", str(tiny_run), "--curvature-scale", "-1"], "curvature-scale")):
        bad = _script("marginal_probe.py", *args)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and needle in bad.stderr, bad.stderr
