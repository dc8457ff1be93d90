"""Headroom measurement: bootstrap oracles, the zero-step identity, resume, the table and the script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from abmll_pyro.config import AdapterConfig
from abmll_pyro.data.tasks import Example, Task
from scripts.headroom import headroom as hr
from abmll_pyro.lms.tiny import tiny_model
from abmll_pyro.lora.adapter import BayesLoRA


def test_paired_bootstrap_oracles():
    assert hr.paired_bootstrap(torch.full((20,), 0.25), 200, 0) == pytest.approx((0.25, 0.25))
    diff = torch.tensor([1.0] * 30 + [0.0] * 70)
    lo, hi = hr.paired_bootstrap(diff, 2000, 0)
    # the mean's standard error is sqrt(.3 * .7 / 100) ≈ 0.046: the 95% interval spans about ±0.09
    assert 0.18 < lo < 0.24 and 0.36 < hi < 0.42


@pytest.fixture
def setup():
    lm, tok = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0))
    words = ["cat", "dog", "sun", "rain", "tree", "stone"]
    examples = [Example(f"{w} number {i}", ["yes", "no"], i % 2) for i, w in enumerate(words * 4)]
    return adapter, tok, Task("toy", tuple(examples))


def test_zero_steps_lora_equals_zero_shot(setup):
    adapter, tok, task = setup
    config = hr.HeadroomConfig(shots=4, query_size=8, steps=0, reductions=("sum", "mean"), num_boot=50)
    result = hr.task_headroom(adapter, tok, task, config)
    assert result["shots"] == 4 and result["query"] == 8 and result["chance"] == 0.5
    for v in result["reductions"].values():  # B = 0 and no step: the base model's predictions
        assert v["lora"] == v["zero_shot"] and v["gain"] == 0.0 and v["gain_ci95"] == [0.0, 0.0]


def test_zero_shot_through_start_factors_is_the_base_model_and_fills_the_trunk_cache():
    from abmll_pyro.data.encoding import encode_options
    from abmll_pyro.data.trunk import attach_trunk_cache, trunk_cache_of
    from abmll_pyro.methods.base import LoRAFactors, option_logits
    from abmll_pyro.models.likelihoods import OptionLikelihood

    lm, tok = tiny_model("llama", seed=0)
    top = lm.config.num_hidden_layers - 1
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0, target_modules=[
        f"model.layers.{top}.self_attn.q_proj", f"model.layers.{top}.self_attn.v_proj"]))
    batch = encode_options(tok, [Example(f"word {i} is", ["yes", "no", "maybe"], i % 3) for i in range(6)],
                           max_length=32, name="q")
    lik = OptionLikelihood("char")
    with torch.no_grad():
        base = option_logits(adapter, None, batch, lik)
        attach_trunk_cache(lm)
        start = LoRAFactors(adapter).params()
        zero = option_logits(adapter, start, batch, lik)
        cache = trunk_cache_of(lm)
        misses = cache.misses
        again = option_logits(adapter, {k: v + 0.01 for k, v in start.items()}, batch, lik)  # as after a fit
    assert torch.equal(zero, base)  # B = 0: W + 0 = W exactly
    assert misses > 0 and cache.misses == misses and cache.hits == misses  # read back, not recomputed
    assert not torch.equal(again, base)


def test_training_fits_the_support(setup):
    adapter, tok, task = setup
    before = hr.task_headroom(adapter, tok, task, hr.HeadroomConfig(shots=4, query_size=4, steps=0, reductions=("sum",)))
    after = hr.task_headroom(adapter, tok, task, hr.HeadroomConfig(shots=4, query_size=4, steps=15, lr=5e-2, reductions=("sum",)))
    assert after["reductions"]["sum"]["support_loss_end"] < before["reductions"]["sum"]["support_loss_end"] - 0.05


def test_resume_reads_finished_tasks(setup, tmp_path, monkeypatch):
    adapter, tok, task = setup
    config = hr.HeadroomConfig(shots=4, query_size=4, steps=1, reductions=("sum",), num_boot=20)
    first = hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None)
    monkeypatch.setattr(hr, "task_headroom", lambda *a: pytest.fail("a finished task was measured again"))
    assert hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None) == first
    table = hr.headroom_table(first, "sum")
    assert "| test | toy | 2 | 4 |" in table and "mean of 1" in table
    sure = int(first[0]["reductions"]["sum"]["gain_ci95"][0] > 0)
    assert f"{sure}/1 with CI lower bound > 0" in table


def test_resume_adds_only_missing_reductions(setup, tmp_path, monkeypatch):
    adapter, tok, task = setup
    config = hr.HeadroomConfig(shots=4, query_size=4, steps=3, lr=5e-2, reductions=("sum", "char"), num_boot=20)
    joint = hr.task_headroom(adapter, tok, task, config)
    hr.run_headroom(adapter, tok, [("test", task)], tmp_path, hr.replace(config, reductions=("char",)), log=lambda s: None)
    measured = []
    real = hr.task_headroom
    monkeypatch.setattr(hr, "task_headroom", lambda a, t, k, c: measured.append(c.reductions) or real(a, t, k, c))
    [merged] = hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None)
    assert measured == [("sum",)] and set(merged["reductions"]) == {"sum", "char"}
    assert merged["config"]["reductions"] == ["char", "sum"]
    for r in ("sum", "char"):  # merged equals measuring both at once (up to the timing)
        got, want = dict(merged["reductions"][r]), dict(joint["reductions"][r])
        got.pop("seconds"), want.pop("seconds")
        assert got == want
    with pytest.raises(ValueError, match="other settings"):
        hr.run_headroom(adapter, tok, [("test", task)], tmp_path, hr.replace(config, steps=4, reductions=("mean",)),
                        log=lambda s: None)


def test_script_smoke_and_table(tmp_path, capsys):
    path = Path(__file__).parents[2] / "scripts" / "headroom" / "run.py"
    spec = importlib.util.spec_from_file_location("headroom_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--smoke", "--out", str(tmp_path), "--reductions", "sum", "char"])
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(results) == 2 and all(set(r["reductions"]) == {"sum", "char"} for r in results)
    test_name = next(r["task"] for r in results if r["split"] == "test")
    only = tmp_path / "only"
    script.main(["--smoke", "--out", str(only), "--reductions", "sum", "--only", test_name])
    assert [p.stem for p in only.glob("*.json")] == [test_name]
    with pytest.raises(SystemExit, match="not in the chosen splits"):
        script.main(["--smoke", "--out", str(only), "--only", "no-such-task"])
    capsys.readouterr()
    script.main(["--out", str(tmp_path), "--table", "--reductions", "sum", "char"])
    assert capsys.readouterr().out.count("mean of 2") == 2


def test_headroom_tasks_choose_from_a_complete_split():
    def res(name, split, gain):
        return {"task": name, "split": split, "reductions": {"char": {"gain": gain}}}
    results = [res("a", "test", 0.05), res("b", "test", 0.0499), res("c", "test", 0.3), res("d", "dev", 0.5)]
    assert hr.headroom_tasks(results, "char", "test", ["c", "b", "a"]) == ["a", "c"]
    with pytest.raises(ValueError, match="not measured under 'char'.*'e'"):
        hr.headroom_tasks(results, "char", "test", ["a", "b", "c", "e"])
    with pytest.raises(ValueError, match="not measured under 'sum'"):
        hr.headroom_tasks(results, "sum", "test", ["a"])


def test_script_subset_file(tmp_path):
    path = Path(__file__).parents[2] / "scripts" / "headroom" / "run.py"
    spec = importlib.util.spec_from_file_location("headroom_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, subset = tmp_path / "out", tmp_path / "subset.json"
    script.main(["--smoke", "--out", str(out), "--reductions", "sum"])
    folder = str(out / "tasks")
    [test_result] = [json.loads(p.read_text()) for p in out.glob("*.json") if json.loads(p.read_text())["split"] == "test"]
    subset.write_text(json.dumps({"tasks": {"other-suite": {"sum": ["x"]}}}))
    # a minimum gain of -1 keeps every test task, of 2 none: the file follows the rule
    script.main(["--table", "--out", str(out), "--tasks", folder, "--reductions", "sum", "--subset", str(subset),
                 "--min-gain", "-1"])
    data = json.loads(subset.read_text())
    assert data["split"] == "test" and data["min_gain"] == -1 and "note" in data
    assert data["tasks"] == {"other-suite": {"sum": ["x"]}, folder: {"sum": [test_result["task"]]}}
    script.main(["--table", "--out", str(out), "--tasks", folder, "--reductions", "sum", "--subset", str(subset),
                 "--min-gain", "2"])
    assert json.loads(subset.read_text())["tasks"][folder] == {"sum": []}
    with pytest.raises(ValueError, match="not measured under 'char'"):  # char was never run
        script.main(["--table", "--out", str(out), "--tasks", folder, "--reductions", "char", "--subset", str(subset)])


def test_committed_headroom_tasks_are_test_tasks_of_their_suite():
    from importlib import resources
    data_dir = resources.files("abmll_pyro.data")
    subset = json.loads(data_dir.joinpath("headroom_tasks.json").read_text())
    assert subset["split"] == "test" and subset["min_gain"] == 0.05
    split_files = {"debian-cls": "debian_cls_split.json", "bigbench": "bigbench_split.json"}
    for suite, by_reduction in subset["tasks"].items():
        test_tasks = set(json.loads(data_dir.joinpath(split_files[suite]).read_text())["test"])
        for names in by_reduction.values():
            assert names == sorted(set(names)) and set(names) <= test_tasks


def test_skipped_tasks_are_recorded_shown_and_never_chosen(setup, tmp_path, monkeypatch):
    adapter, tok, task = setup
    config = hr.HeadroomConfig(shots=4, query_size=4, steps=0, reductions=("sum",), num_boot=20, drop_long_examples=True)
    reason = "3 of 40 examples fit max_length=96; needs shots + 2 = 6"
    results = hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None,
                              skipped={"long": ("test", reason)})
    assert json.loads((tmp_path / "long.json").read_text())["skipped"] == reason
    assert "| test | long | | 0 | skipped: " + reason in hr.headroom_table(results, "sum")
    assert hr.headroom_tasks(results, "sum", "test", ["toy", "long"], min_gain=-1.0) == ["toy"]
    monkeypatch.setattr(hr, "task_headroom", lambda *a: pytest.fail("measured again"))
    again = hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None,
                            skipped={"long": ("test", reason)})
    assert again == results  # read back, nothing measured or rewritten
    with pytest.raises(ValueError, match="other settings"):
        hr.run_headroom(adapter, tok, [("test", task)], tmp_path, hr.HeadroomConfig(
            shots=4, query_size=4, steps=0, reductions=("sum",), num_boot=20), log=lambda s: None)


def test_fit_tasks_reports_examples_kept_per_task():
    from abmll_pyro.data.sources.taskset import TaskSet
    from abmll_pyro.train.setup import fit_tasks

    _, tok = tiny_model("llama", seed=0)
    short = Task("short", tuple(Example(f"w{i}", ["yes", "no"], 0) for i in range(6)))
    long = Task("long", tuple(Example(("many words " * 40) if i else "w", ["yes", "no"], 0) for i in range(6)))
    kept, report = fit_tasks(TaskSet(train=(short,), dev=(), test=(long,)), tok, 32, 3)
    assert [t.name for t in kept.test] == [] and report["dropped_tasks"] == ["long"]
    assert report["kept"] == {"short": (6, 6), "long": (1, 6)}


def test_wide_table_puts_reductions_side_by_side(setup, tmp_path):
    adapter, tok, task = setup
    config = hr.HeadroomConfig(shots=4, query_size=4, steps=0, reductions=("sum",), num_boot=20)
    results = hr.run_headroom(adapter, tok, [("test", task)], tmp_path, config, log=lambda s: None,
                              skipped={"long": ("dev", "too long")})
    lines = hr.headroom_table_wide(results, ["char", "sum"]).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == 4 + 3 * 2 + 1
    assert lines[2].startswith("| test | toy | 2 | 4 | — | — | — | ") and lines[2].endswith("+0.000 [+0.000, +0.000] |")
    assert lines[3].startswith("| dev | long | | 0 | skipped: too long |") and lines[3].count("|") == lines[0].count("|")


def test_summary_counts_per_reduction_and_split():
    def res(split, task, gain, lo, loss=0.1, sec=60.0):
        v = {"zero_shot": 0.5, "lora": 0.5 + gain, "gain": gain, "gain_ci95": [lo, gain + 0.1],
             "support_loss_end": loss, "seconds": sec}
        return {"split": split, "task": task, "reductions": {"char": v}}
    results = [res("test", "a", 0.10, 0.02), res("test", "b", -0.20, -0.3, loss=0.3), res("dev", "c", 0.0, -0.1),
               {"split": "test", "task": "d", "skipped": "too long", "reductions": {}}]
    lines = hr.headroom_summary(results, ["char", "sum"]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == 13  # no `sum` rows: nothing measured
    assert lines[2] == "| `char` | test | 2 | 1 | 0.500 | 0.450 | -0.050 | 1 | 1 | 1 | 0.200 | 2 |"
    assert lines[3].startswith("| `char` | dev | 1 | 0 | 0.500 | 0.500 | +0.000 | 0 | 0 | 0 |")
