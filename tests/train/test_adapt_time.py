"""Adaptation time per test task: measured around ``method.adapt`` alone and written to results.json."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from abmll_pyro.eval.metrics import TaskMetrics
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder
from abmll_pyro.train.evaluate import TaskResults, evaluate_method, metrics_json
from abmll_pyro.train.results import validate_result
from abmll_pyro.train.run import train_run
from abmll_pyro.train.setup import build

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = dict(model="tiny-llama", tasks=str(HANDWRITTEN), rank=2, shots=2, query_size=2, eval_query_size=3,
            num_threads=1, max_length=96, num_samples=2)


def test_an_abmll_run_records_adaptation_seconds_per_task(tmp_path):
    result = train_run(RunConfig(method="abmll", steps=1, num_inner_steps=1, **TINY), tmp_path, progress=False)
    validate_result(result)
    times = {name: m["adapt_time_s"] for name, m in result["per_task"].items()}
    assert set(times) == {"animals", "opposites"} and all(t > 0 for t in times.values())
    assert result["macro"]["adapt_time_s_per_task"] == pytest.approx(sum(times.values()) / len(times))
    assert result["macro"]["adapt_time_s_per_task"] < result["eval_time_s"]


class _Slow:
    """Delegates to a real method; ``adapt`` sleeps ``adapt_s`` and ``predict`` sleeps ``predict_s``."""

    def __init__(self, method, adapt_s: float, predict_s: float):
        self.method, self.adapt_s, self.predict_s = method, adapt_s, predict_s
        self.name = method.name

    def adapt(self, episode):
        time.sleep(self.adapt_s)
        return self.method.adapt(episode)

    def predict(self, state, episode):
        time.sleep(self.predict_s)
        return self.method.predict(state, episode)


def test_only_adapt_is_timed():
    config = RunConfig(method="pretrained", **TINY)
    built, taskset = build(config)
    encoder = EpisodeEncoder(built.tokenizer, config.max_length)
    per_task, _ = evaluate_method(_Slow(built.method, 0.05, 0.3), taskset.test, encoder, config, progress=False)
    assert isinstance(per_task, TaskResults) and set(per_task.adapt_time_s) == set(per_task)
    assert all(0.05 <= t < 0.3 for t in per_task.adapt_time_s.values())  # the sleep in adapt, not the one in predict


def test_metrics_json_without_times_is_unchanged():
    metrics = {"a": TaskMetrics(accuracy=1.0, ece=0.1, nll=0.2, brier=0.3, n=4)}
    tasks, macro = metrics_json(metrics)  # a plain dict (no TaskResults): no time fields
    assert "adapt_time_s" not in tasks["a"] and "adapt_time_s_per_task" not in macro
    timed = TaskResults(metrics)
    timed.adapt_time_s["a"] = 1.5
    tasks, macro = metrics_json(timed)
    assert tasks["a"]["adapt_time_s"] == 1.5 and macro["adapt_time_s_per_task"] == 1.5
