"""A run with the task subspace end to end: ``subspace_dim`` and the other ``subspace_*`` keys reach the
method, ``subspace_init: gradients`` sets the directions from the training tasks before training, the
run logs the subspace's KL and scale, and a run killed and resumed ends where the uninterrupted run ends
(tests/train/test_resume.py)."""

from __future__ import annotations

import json

import pytest
import torch

from abmll_pyro.presets import synthetic_task_folder
from abmll_pyro.train.config import ConfigError, RunConfig
from abmll_pyro.train.run import train_run
from abmll_pyro.train.setup import build


def _config(tmp_path, **changes):
    values = dict(method="abmll", model="tiny-llama", tasks=str(synthetic_task_folder(tmp_path / "tasks")), steps=2,
                  tasks_per_step=2, shots=3, query_size=3, rank=2, num_inner_steps=2, inner_lr=1e-2, kl_beta=1e-3,
                  max_test_tasks=1, eval_query_size=3, num_threads=1, num_samples=2, subspace_dim=2,
                  subspace_init="gradients", subspace_scale=0.5, subspace_scale_lr=0.05)
    values.update(changes)
    return RunConfig(**values)


def test_gradient_directions_are_set_before_training_and_seeded(tmp_path):
    built, _ = build(_config(tmp_path))
    sub = built.method.svi.subspace
    assert sub is not None and sub.init == "gradients" and sub.dim == 2
    again, _ = build(_config(tmp_path))
    random_start, _ = build(_config(tmp_path, subspace_init="random"))
    m = sub.modules[0]
    torch.testing.assert_close(sub.A[sub._name(m)], again.method.svi.subspace.A[sub._name(m)])  # seeded
    a, _ = sub.directions(m)
    a_random, _ = random_start.method.svi.subspace.directions(m)
    assert not torch.allclose(a, a_random)
    torch.testing.assert_close(a @ a.T, torch.eye(2), atol=1e-5, rtol=0)
    assert build(_config(tmp_path, subspace_dim=0))[0].method.svi.subspace is None


def test_a_subspace_run_logs_its_scale_and_kl(tmp_path):
    """(Kill-and-resume with the subspace: tests/train/test_resume.py, case abmll-subspace.)"""
    train_run(_config(tmp_path, steps=3), tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 3 and all(r["subspace_kl"] >= 0 and r["subspace_scale"] > 0 for r in trained)
    assert trained[0]["subspace_scale"] == pytest.approx(0.5, rel=1e-6)  # logged before its first step


def test_bad_subspace_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="subspace_dim"):
        _config(tmp_path, subspace_dim=-1)
    with pytest.raises(ConfigError, match="subspace_init"):
        _config(tmp_path, subspace_init="pca")
    with pytest.raises(ConfigError, match="subspace_inner_lr"):
        _config(tmp_path, subspace_inner_lr=0.0)
