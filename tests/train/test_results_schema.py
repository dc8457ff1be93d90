"""The documented results.json schema: a real run validates; broken ones name the problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from abmll_pyro.train.config import ConfigError, RunConfig, load_config_file
from abmll_pyro.train.results import ResultsError, validate_result
from abmll_pyro.train.run import train_run

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    config = RunConfig(method="lora", model="tiny-llama", tasks=str(HANDWRITTEN), rank=2, shots=2, query_size=2,
                       eval_query_size=3, steps=2, num_inner_steps=1, num_threads=1, max_length=96)
    return train_run(config, tmp_path_factory.mktemp("run"), progress=False)


def test_a_real_result_validates_and_matches_the_file(result):
    validate_result(result)
    assert set(result) >= {"method", "model", "tasks", "seed", "per_task", "macro", "config", "wall_time_s", "peak_memory_mb"}
    assert result["peak_memory_mb"] > 0 and result["wall_time_s"] > 0


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.pop("macro"), "lacks the field 'macro'"),
    (lambda r: r["per_task"]["animals"].update(accuracy=1.5), "accuracy must be a number in [0.0, 1.0]"),
    (lambda r: r["macro"].update(num_tasks=7), "macro.num_tasks=7"),
    (lambda r: r.update(seed="0"), "field 'seed' has type str"),
])
def test_broken_results_are_rejected(result, breakage, message):
    broken = copy.deepcopy(result)
    breakage(broken)
    with pytest.raises(ResultsError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_result(broken)


def test_config_errors_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['kl_betta'\]"):
        RunConfig.from_dict({"kl_betta": 1.0})
    with pytest.raises(ConfigError, match="kl_beta must be finite and >= 0, got -1"):
        RunConfig(kl_beta=-1.0)
    with pytest.raises(ConfigError, match="rank must be an integer >= 1, got 0"):
        RunConfig(rank=0)
    bad = tmp_path / "c.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(bad)
    assert RunConfig.from_dict(json.loads(json.dumps(RunConfig().to_dict()))) == RunConfig()  # round trip


def test_yaml_reads_exponent_floats_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; config files and `--set` read it as YAML 1.2 and JSON do."""
    from abmll_pyro.train.config import load_yaml

    conf = tmp_path / "c.yaml"
    conf.write_text("outer_lr: 1e-3\nkl_beta: 5E-8\ninner_adam_eps: 1.0e-4\nsteps: 7\nmodel: 1e3x\n")
    values = load_config_file(conf)
    assert values == {"outer_lr": 1e-3, "kl_beta": 5e-8, "inner_adam_eps": 1e-4, "steps": 7, "model": "1e3x"}
    assert isinstance(values["steps"], int) and isinstance(values["outer_lr"], float)
    assert RunConfig.from_dict({k: v for k, v in values.items() if k != "model"}).outer_lr == 1e-3
    assert load_yaml("-2e+2") == -200.0 and load_yaml("'1e-3'") == "1e-3" and load_yaml("1_000") == 1000
    import yaml

    assert yaml.safe_load("1e-3") == "1e-3"  # the stock loader is left as it was
