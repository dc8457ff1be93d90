"""`abmll benchmark --preset smoke`: every method, same splits, a table, plots, schema-valid results."""

from __future__ import annotations

import json
import time

import pytest

from abmll_pyro.cli import main
from abmll_pyro.presets import ALL_METHODS, PEER_METHODS
from abmll_pyro.train.results import validate_result


def test_smoke_benchmark_end_to_end(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["--quiet", "benchmark", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 120, f"the smoke preset must stay under 2 minutes, took {elapsed:.0f} s"
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results] == list(ALL_METHODS)
    for r in results:
        validate_result(r)
        assert (tmp_path / f"reliability-{r['method']}.png").stat().st_size > 1000
        assert set(r["per_task"]) == set(results[0]["per_task"])  # the same unseen tasks for every method
        assert r["macro"]["n"] == results[0]["macro"]["n"]  # and the same query sets
        assert f"| {r['method']} |" in table
        pooled = r["pooled"]
        assert pooled["n"] == r["macro"]["n"] and 0 <= pooled["ece_floor"] <= 1 and pooled["nll"] > 0
        lines = (tmp_path / "runs" / f"{r['method']}-seed0" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == pooled["n"]
        rec = json.loads(lines[0])
        assert set(rec) == {"method", "seed", "task", "index", "gold", "probs", "entropy", "aleatoric", "epistemic", "spread"} and rec["method"] == r["method"]
    assert (tmp_path / "table.md").read_text() in table
    comparison = (tmp_path / "comparison.md").read_text()
    assert comparison in table and "| abmll − method |" in comparison
    paired = json.loads((tmp_path / "comparison.json").read_text())["paired"]
    assert {row["method"] for row in paired} == set(ALL_METHODS) - {"abmll"}
    assert all(len(row["nll"]["ci95"]) == 2 for row in paired)
    # lora-ts is evaluated from lora's checkpoint: the same trained factors, not a second training
    assert "same training" in (tmp_path / "runs" / "lora-ts-seed0" / "log.txt").read_text()
    bench = json.loads((tmp_path / "benchmark.json").read_text())
    assert bench["runs_wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in results))
    # a finished benchmark is reused, not rerun; benchmark.json keeps the run's own time beside this call's
    t1 = time.perf_counter()
    assert main(["--quiet", "benchmark", "--preset", "smoke", "--out", str(tmp_path), "--methods", "abmll"]) == 0
    assert time.perf_counter() - t1 < 10
    bench = json.loads((tmp_path / "benchmark.json").read_text())
    abmll_wall = next(r["wall_time_s"] for r in results if r["method"] == "abmll")
    assert bench["runs_wall_time_s"] == pytest.approx(abmll_wall) and bench["wall_time_s"] < 10


def test_the_bayesian_lora_peers_on_the_smoke_preset(tmp_path, capsys):
    """`abmll benchmark --methods lora <the four peers>`: schema-valid results and predictions with their
    epistemic part, paired against lora; laplace-lora, blob and ensemble-lora evaluate lora's checkpoint,
    mc-dropout-lora trains with dropout; seconds on the tiny model."""
    t0 = time.perf_counter()
    assert main(["--quiet", "benchmark", "--preset", "smoke", "--methods", "lora", *PEER_METHODS, "--reference", "lora",
                 "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, f"the peers on the smoke preset should take seconds, took {elapsed:.0f} s"
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results] == ["lora", *PEER_METHODS]
    for r in results:
        validate_result(r)
        assert f"| {r['method']} |" in table and r["macro"]["n"] == results[0]["macro"]["n"]
        lines = (tmp_path / "runs" / f"{r['method']}-seed0" / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == r["pooled"]["n"]
        if r["method"] != "lora":  # several samples per prediction: a non-zero epistemic part
            assert sum(json.loads(line)["epistemic"] for line in lines) > 0, r["method"]
    for method in ("laplace-lora", "blob", "ensemble-lora"):
        assert "same training" in (tmp_path / "runs" / f"{method}-seed0" / "log.txt").read_text()
    assert (tmp_path / "runs" / "mc-dropout-lora-seed0" / "checkpoints" / "latest.json").exists()
    laplace = next(r for r in results if r["method"] == "laplace-lora")
    assert all("log10_prior_precision" in v for v in laplace["per_task"].values())
    paired = json.loads((tmp_path / "comparison.json").read_text())["paired"]
    assert {row["method"] for row in paired} == set(PEER_METHODS)
    # cost beside quality: every method has a row, and a task's state holds what the method says it does
    costs = (tmp_path / "cost.md").read_text()
    assert costs in table and all(f"| {r['method']} |" in costs for r in results)
    cost = {r["method"]: r["cost"] for r in results}
    lora_values = cost["lora"]["trained_values"]
    assert cost["lora"]["adapted_values_per_task"] == lora_values and all(c["predict_s_per_query"] > 0 for c in cost.values())
    # E members, each the trained pair plus an equally shaped member pair
    assert cost["ensemble-lora"]["adapted_values_per_task"] == 2 * 5 * lora_values
    assert lora_values < cost["blob"]["adapted_values_per_task"] < 2 * lora_values  # M, B and G (A's shape)


def test_two_seeds_give_mean_and_std(tmp_path, capsys):
    assert main(["--quiet", "benchmark", "--preset", "smoke", "--out", str(tmp_path), "--methods", "pretrained", "lora",
                 "--seeds", "2", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "±" in table and "| lora |" in table
    assert {r["seed"] for r in json.loads((tmp_path / "results.json").read_text())} == {0, 1}


def test_jobs_run_in_parallel_with_the_same_results(tmp_path, capsys):
    """`--jobs 2`: runs in two worker processes (lora-ts after lora), the same numbers as one after another."""
    args = ["--quiet", "benchmark", "--preset", "smoke", "--methods", "pretrained", "lora", "lora-ts", "abmll",
            "--steps", "2", "--last-layers", "1"]  # the top block adapted: the runs share the trunk below it
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert [r["method"] for r in two] == ["pretrained", "lora", "lora-ts", "abmll"]
    for a, b in zip(one, two):
        assert a["pooled"] == b["pooled"] and a["per_task"].keys() == b["per_task"].keys()
        assert (tmp_path / "one" / "runs" / f"{a['method']}-seed0" / "predictions.jsonl").read_text() == \
            (tmp_path / "two" / "runs" / f"{b['method']}-seed0" / "predictions.jsonl").read_text()
    assert "same training" in (tmp_path / "two" / "runs" / "lora-ts-seed0" / "log.txt").read_text()
    assert json.loads((tmp_path / "two" / "benchmark.json").read_text())["jobs"] == 2
    capsys.readouterr()
    assert main(["--quiet", "benchmark", "--preset", "smoke", "--out", str(tmp_path / "x"), "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs" in err[0] and not (tmp_path / "x" / "runs").exists()


def test_a_failed_parallel_run_keeps_the_others(tmp_path):
    """With `--jobs`, a run that fails does not stop the others (their results are written), a run that
    needs its checkpoint is not started, and the first failure is raised."""
    import pytest

    from abmll_pyro.presets import PRESETS, synthetic_task_folder
    from abmll_pyro.train.benchmark import _Job, _run_parallel
    from abmll_pyro.train.config import RunConfig

    base = RunConfig.from_dict({**PRESETS["smoke"].config, "tasks": str(synthetic_task_folder(tmp_path / "tasks")),
                                "steps": 1})
    broken = base.updated(method="lora", tasks=str(tmp_path / "no-such-folder"))
    runs = tmp_path / "runs"
    jobs = [_Job(broken, runs / "lora-seed0", None),
            _Job(base.updated(method="lora-ts"), runs / "lora-ts-seed0", runs / "lora-seed0"),
            _Job(base.updated(method="pretrained"), runs / "pretrained-seed0", None)]
    with pytest.raises(Exception, match="no-such-folder"):
        _run_parallel(jobs, 2, progress=False)
    validate_result(json.loads((runs / "pretrained-seed0" / "results.json").read_text()))
    assert not (runs / "lora-ts-seed0").exists()


def test_a_run_whose_checkpoint_is_ready_goes_before_runs_listed_after_it(tmp_path):
    """Runs are handed to a worker only when one is free, in list order among those ready: lora-ts starts
    as soon as lora finished, not behind every run queued meanwhile."""
    from abmll_pyro.presets import PRESETS, synthetic_task_folder
    from abmll_pyro.train.benchmark import _Job, _run_parallel
    from abmll_pyro.train.config import RunConfig

    base = RunConfig.from_dict({**PRESETS["smoke"].config, "tasks": str(synthetic_task_folder(tmp_path / "tasks")),
                                "steps": 1, "max_test_tasks": 1})
    runs = tmp_path / "runs"
    jobs = [_Job(base.updated(method="lora"), runs / "lora-seed0", None),
            _Job(base.updated(method="lora-ts"), runs / "lora-ts-seed0", runs / "lora-seed0"),
            _Job(base.updated(method="pretrained"), runs / "pretrained-seed0", None),
            _Job(base.updated(method="pretrained", seed=1), runs / "pretrained-seed1", None)]
    _run_parallel(jobs, 1, progress=False)
    finished = sorted(jobs, key=lambda j: (j.run_dir / "results.json").stat().st_mtime_ns)
    assert [j.run_dir.name for j in finished] == ["lora-seed0", "lora-ts-seed0", "pretrained-seed0", "pretrained-seed1"]


def test_runs_that_train_start_first_and_results_keep_the_listed_order(tmp_path):
    """The long runs (those that train) are handed out first, so the evaluate-only ones fill in around
    them; the results come back in the listed order."""
    from abmll_pyro.presets import PRESETS, synthetic_task_folder
    from abmll_pyro.train.benchmark import _Job, _run_parallel
    from abmll_pyro.train.config import RunConfig

    base = RunConfig.from_dict({**PRESETS["smoke"].config, "tasks": str(synthetic_task_folder(tmp_path / "tasks")),
                                "steps": 1, "max_test_tasks": 1})
    runs = tmp_path / "runs"
    jobs = [_Job(base.updated(method="pretrained"), runs / "pretrained-seed0", None),
            _Job(base.updated(method="lora"), runs / "lora-seed0", None)]
    results = _run_parallel(jobs, 1, progress=False)
    assert [r["method"] for r in results] == ["pretrained", "lora"]
    finished = sorted(jobs, key=lambda j: (j.run_dir / "results.json").stat().st_mtime_ns)
    assert [j.run_dir.name for j in finished] == ["lora-seed0", "pretrained-seed0"]


def test_runs_share_the_frozen_trunk(tmp_path, capsys):
    """The benchmark's runs share one on-disk trunk cache: OUT/trunk-cache by default, deleted at the end;
    a folder given with --trunk-dir is kept (the second method read the first's entries); 'none' turns it
    off — and the predictions agree with a benchmark without it to float round-off."""
    import pytest

    args = ["benchmark", "--preset", "smoke", "--methods", "lora", "abmll", "--steps", "2", "--last-layers", "1"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "shared trunk cache" in err and "(deleted)" in err and not (tmp_path / "auto" / "trunk-cache").exists()
    assert main(["--quiet", *args, "--out", str(tmp_path / "kept"), "--trunk-dir", str(tmp_path / "trunk")]) == 0
    assert len(list((tmp_path / "trunk").rglob("*.pt"))) > 0
    assert main(["--quiet", *args, "--out", str(tmp_path / "off"), "--trunk-dir", "none"]) == 0
    assert not (tmp_path / "off" / "trunk-cache").exists()
    for method in ("lora", "abmll"):
        shared, off = ([json.loads(line) for line in (tmp_path / d / "runs" / f"{method}-seed0" / "predictions.jsonl")
                        .read_text().splitlines()] for d in ("auto", "off"))
        assert [r["index"] for r in shared] == [r["index"] for r in off]
        for a, b in zip(shared, off):
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-4)
