"""Evaluation writes the uncertainty split: per example in predictions.jsonl, means in results.json."""

import json
import math

import pytest

from abmll_pyro.presets import get_preset, synthetic_task_folder
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.run import train_run


@pytest.mark.parametrize("method", ["abmll", "lora"])
def test_predictions_and_results_carry_the_split(tmp_path, method):
    tasks = synthetic_task_folder(tmp_path / "tasks", num_train=3, num_test=2, examples=10)
    config = RunConfig.from_dict({**get_preset("smoke").config, "tasks": str(tasks), "steps": 1, "method": method,
                                  "init_std": 0.05})
    result = train_run(config, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        assert math.isclose(row["entropy"], row["aleatoric"] + row["epistemic"], abs_tol=1e-9)
        assert row["epistemic"] >= 0
    if method == "lora":  # one deterministic prediction: nothing to disagree
        assert all(row["epistemic"] == 0 for row in rows)
    else:  # σ = 0.05 elementwise, 2 samples: they disagree somewhere
        assert max(row["epistemic"] for row in rows) > 0
    pooled = result["pooled"]
    assert pooled["entropy"] == pytest.approx(sum(r["entropy"] for r in rows) / len(rows))
    for task, values in result["per_task"].items():
        mine = [r["epistemic"] for r in rows if r["task"] == task]
        assert values["epistemic"] == pytest.approx(sum(mine) / len(mine))
