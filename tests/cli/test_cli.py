"""The `abmll` command end to end on the hand-written task folder (the documented format)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from abmll_pyro.cli import main
from abmll_pyro.methods.temperature import TEMPERATURES
from abmll_pyro.train.results import validate_result


def _train(tmp_path, handwritten, tiny, method="abmll", *extra):
    out = tmp_path / method
    code = main(["--quiet", "train", "--method", method, "--tasks", str(handwritten), "--out", str(out),
                 "--steps", "3", "--checkpoint-every", "2", *tiny, *extra])
    assert code == 0
    return out


def test_train_writes_a_complete_run_directory(tmp_path, handwritten, tiny):
    run = _train(tmp_path, handwritten, tiny)
    for name in ("config.json", "log.txt", "metrics.jsonl", "results.json", "checkpoints/latest.json"):
        assert (run / name).exists(), name
    result = validate_result(json.loads((run / "results.json").read_text()))
    assert result["method"] == "abmll" and result["steps"] == 3
    assert set(result["per_task"]) == {"animals", "opposites"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"nll", "task_kl", "log_p_theta"} <= set(lines[0])  # the loss components are logged
    ckpt = run / "checkpoints" / json.loads((run / "checkpoints/latest.json").read_text())["path"]
    assert (ckpt / "adapter.safetensors").exists() and (ckpt / "optimizer.pt").exists()


def test_config_file_yaml_and_flags_precedence(tmp_path, handwritten, tiny):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kl_beta: 0.001\nsteps: 2\nprior: hierarchical\nguide: mean-field\n")
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--method", "abmll", "--tasks", str(handwritten), "--out", str(out),
                 "--config", str(cfg), "--steps", "1", *tiny]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["kl_beta"] == 0.001 and saved["steps"] == 1  # the flag beats the file


@pytest.mark.parametrize("method", ["lora", "structured-lora", "reptile", "abmll-icl", "laplace-lora", "blob",
                                    "ensemble-lora", "mc-dropout-lora"])
def test_every_trainable_method_trains_and_evaluates(tmp_path, handwritten, tiny, method, capsys):
    run = _train(tmp_path, handwritten, tiny, method)
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "--run", str(run), "--num-samples", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and 0 <= summary["accuracy"] <= 1


def test_evaluate_a_run_as_the_method_trained_the_same_way(tmp_path, handwritten, tiny, capsys):
    """`--method lora-ts` on a lora run: temperature scaling on lora's checkpoint, no retraining (as the
    benchmark does); a method trained differently is refused with one line naming both."""
    run = _train(tmp_path, handwritten, tiny, "lora")
    plain, scaled = tmp_path / "lora.json", tmp_path / "lora-ts.json"
    assert main(["--quiet", "evaluate", "--run", str(run), "--out", str(plain)]) == 0
    # unregularized T (the default prior keeps T = 1 on 4 shots of a tiny model: nothing to compare)
    assert main(["--quiet", "evaluate", "--run", str(run), "--method", "lora-ts", "--ts-prior-std", "null",
                 "--out", str(scaled)]) == 0
    a, b = (validate_result(json.loads(p.read_text())) for p in (plain, scaled))
    assert (a["method"], b["method"]) == ("lora", "lora-ts") and b["steps"] == a["steps"] == 3
    assert a["config"]["ts_prior_std"] == 0.25 and b["config"]["ts_prior_std"] is None
    assert a["pooled"]["accuracy"] == b["pooled"]["accuracy"]  # a temperature does not change the argmax
    assert a["pooled"]["nll"] != b["pooled"]["nll"]
    # the fitted T is recorded per task, and it is the T that turns lora's predictions into lora-ts's
    assert all("temperature" not in v for v in a["per_task"].values())
    temps = {t: v["temperature"] for t, v in b["per_task"].items()}
    assert set(temps) == set(a["per_task"]) and all(t in TEMPERATURES.tolist() for t in temps.values())
    rows = [[json.loads(line) for line in p.with_suffix(".predictions.jsonl").read_text().splitlines()]
            for p in (plain, scaled)]
    for x, y in zip(*rows):
        assert (x["task"], x["index"]) == (y["task"], y["index"])
        p = torch.tensor(x["probs"], dtype=torch.float64)
        live = p > 0
        tempered = torch.softmax(p[live].log() / temps[x["task"]], 0)
        assert torch.allclose(tempered, torch.tensor(y["probs"], dtype=torch.float64)[live], atol=1e-5)
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "--run", str(run), "--method", "abmll"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained as 'lora'" in err[0] and "--method lora-ts on a lora run" in err[0]


@pytest.mark.parametrize("method", ["pretrained", "icl"])
def test_untrained_methods_evaluate(tmp_path, handwritten, tiny, method):
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--method", method, "--tasks", str(handwritten), "--out", str(out), *tiny]) == 0
    validate_result(json.loads(out.read_text()))


def test_predict_writes_probabilities(tmp_path, handwritten, tiny):
    run = _train(tmp_path, handwritten, tiny)
    support = tmp_path / "support.jsonl"
    support.write_text("".join((handwritten / "animals.jsonl").read_text().splitlines(True)[:3]))
    query = tmp_path / "query.jsonl"
    query.write_text(json.dumps({"input": "Which animal purrs?", "options": ["cat", "cow", "crab"]}) + "\n"
                     + json.dumps({"input": "Which animal moos?", "options": ["cat", "cow"], "output": "cow"}) + "\n")
    out = tmp_path / "pred.jsonl"
    assert main(["--quiet", "predict", "--run", str(run), "--support", str(support), "--query", str(query),
                 "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["probs"]) == 3 and len(rows[1]["probs"]) == 2
    for row in rows:
        assert math.isclose(sum(row["probs"]), 1.0, abs_tol=1e-5)  # float32 softmax averaged over samples
        assert row["prediction"] in row["options"]
        # the uncertainty split (nats): total = aleatoric + epistemic, epistemic >= 0, total <= log K
        assert math.isclose(row["entropy"], row["aleatoric"] + row["epistemic"], abs_tol=1e-9)
        assert row["epistemic"] >= 0 and row["entropy"] <= math.log(len(row["options"])) + 1e-9
    assert "correct" in rows[1] and "correct" not in rows[0]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--method", "maml", "--tasks", "x", "--out", "y"], "invalid choice"),
    (["evaluate", "--run", "/nonexistent/run"], "does not exist"),
    (["train", "--method", "abmll", "--tasks", "HW", "--out", "OUT", "--kl-beta", "-1"], "kl_beta must be finite and >= 0"),
    (["train", "--method", "abmll", "--tasks", "HW", "--out", "OUT", "--config", "BADKEY"], "unknown config key(s) ['kl_betta']"),
    (["train", "--method", "abmll", "--tasks", "/nonexistent/folder", "--out", "OUT"], "unknown task source"),
    (["train", "--method", "abmll", "--tasks", "HW", "--out", "OUT", "--prior", "nope"], "nope"),
    (["train", "--method", "abmll", "--tasks", "HW", "--out", "OUT", "--guide", "no.such.module:X"], "no.such.module"),
    (["train", "--resume", "/nonexistent/run"], "does not exist"),
    (["benchmark", "--preset", "gpu", "--out", "OUT"], "invalid choice"),
])
def test_bad_input_exits_nonzero_with_a_clear_message(tmp_path, handwritten, tiny, capsys, argv, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kl_betta": 1e-8}))
    argv = [str(handwritten) if a == "HW" else str(tmp_path / "out") if a == "OUT" else str(bad) if a == "BADKEY" else a
            for a in argv]
    with pytest.raises(SystemExit) if needle == "invalid choice" else _no_raise() as info:
        code = main(argv)
    err = capsys.readouterr().err
    assert needle in err
    if needle != "invalid choice":
        assert code == 2
    else:
        assert info.value.code == 2


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("prior, guide", [("fixed", "point-mass"), ("student-t", "amortized"),
                                          ("abmll_pyro.models.priors:HierarchicalPrior", "abmll_pyro.guides:MeanFieldGuide")])
def test_prior_and_guide_resolve_through_the_registry(tmp_path, handwritten, tiny, prior, guide):
    run = _train(tmp_path, handwritten, tiny, "abmll", "--prior", prior, "--guide", guide)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["prior"], saved["guide"]) == (prior, guide)
    assert main(["--quiet", "evaluate", "--run", str(run), "--num-samples", "1"]) == 0  # the guide's state reloads


@pytest.mark.parametrize("method", ["abmll", "lora"])
def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path, handwritten, tiny, method):
    run = _train(tmp_path, handwritten, tiny, method, "--mixed-precision", "bf16", "--grad-accum", "2")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(x["loss"]) for x in lines)
    if method == "abmll":
        assert all(math.isfinite(x["task_kl"]) and x["task_kl"] >= 0 for x in lines)  # KL computed in float32


def test_boolean_flags_parse_true_and_false(tmp_path, handwritten, tiny):
    run = _train(tmp_path, handwritten, tiny, "lora", "--drop-long-examples", "false")
    assert json.loads((run / "config.json").read_text())["drop_long_examples"] is False
    with pytest.raises(SystemExit):
        main(["train", "--method", "lora", "--out", str(tmp_path / "x"), "--drop-long-examples", "maybe"])


def test_train_and_evaluate_share_a_trunk_folder(tmp_path, handwritten, tiny, capsys, monkeypatch):
    """`--trunk-dir`: train fills the folder with the frozen blocks' states; evaluate in another call
    reads them (its results the same as without the folder, to float round-off), and the variable is
    not left set after the command."""
    import os

    from abmll_pyro.data.trunk import TRUNK_DIR_ENV

    trunk = tmp_path / "trunk"
    run = _train(tmp_path, handwritten, tiny, "lora", "--last-layers", "1", "--trunk-dir", str(trunk))
    filled = sorted(trunk.rglob("*.pt"))
    assert filled and TRUNK_DIR_ENV not in os.environ
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "--run", str(run), "--trunk-dir", str(trunk)]) == 0
    shared = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["--quiet", "evaluate", "--run", str(run)]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shared["accuracy"] == alone["accuracy"] and shared["nll"] == pytest.approx(alone["nll"], abs=1e-4)
    assert sorted(trunk.rglob("*.pt")) == filled  # the test tasks' rows were all there already
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "evaluate", "--run", str(run), "--trunk-dir", "none"]) == 0  # off, not a folder "none"
    assert not (tmp_path / "none").exists()


def test_data_synthetic_writes_the_requested_sizes_and_refuses_bad_ones(tmp_path, capsys):
    """``abmll data synthetic``'s size flags (an out-of-family suite for the uncertainty study):
    the folder holds the asked-for tasks and examples; a count below its minimum is one line, exit 2."""
    from abmll_pyro.data.sources.folder import load_task_folder

    out = tmp_path / "ood"
    assert main(["data", "synthetic", "--out", str(out), "--num-train", "0", "--num-test", "5", "--examples", "40",
                 "--seed", "3"]) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"] == [] and len(splits["test"]) == 5
    tasks = load_task_folder(out, splits["train"], None, splits["test"])
    assert [len(t.examples) for t in tasks.test] == [40] * 5
    first = (out / "synthetic00.jsonl").read_text()
    assert main(["data", "synthetic", "--out", str(out), "--num-train", "0", "--num-test", "5", "--examples", "40",
                 "--seed", "4", "--overwrite"]) == 0
    assert (out / "synthetic00.jsonl").read_text() != first  # the seed is passed on
    capsys.readouterr()
    for flag, value, needle in (("--num-test", "0", "must be at least 1, got 0"), ("--examples", "x", "expected an integer"),
                                ("--num-train", "-1", "must be at least 0, got -1")):
        with pytest.raises(SystemExit) as stop:
            main(["data", "synthetic", "--out", str(tmp_path / "bad"), flag, value])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and flag in err[0]
        assert not (tmp_path / "bad").exists()
