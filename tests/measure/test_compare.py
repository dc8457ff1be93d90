"""Paired bootstrap comparisons: identities, power, and the ``abmll compare`` command."""

import json

import numpy as np
import pytest

from abmll_pyro.cli import main
from abmll_pyro.eval.compare import (PredictionsError, Predictions, load_predictions, paired_comparison,
                                     summarize)
from _support.helpers import write_predictions_run


def _preds(method: str, sharp: float, seed: int = 0, n_tasks: int = 8, n: int = 40) -> Predictions:
    rng = np.random.default_rng(seed)
    keys = [(0, f"t{t}", i) for t in range(n_tasks) for i in range(n)]
    gold = np.random.default_rng(99).integers(0, 2, len(keys))
    logits = rng.normal(size=(len(keys), 2))
    logits[np.arange(len(keys)), gold] += sharp
    p = np.exp(logits)
    return Predictions(method, keys, gold, p / p.sum(1, keepdims=True))


def test_a_method_against_itself_differs_by_exactly_zero():
    a = _preds("a", 1.0)
    b = Predictions("b", a.keys, a.gold, a.probs.copy())
    row = paired_comparison({"a": a, "b": b}, "a", num_resamples=200)[0]
    for m in ("accuracy", "nll", "brier", "ece"):
        assert row[m]["diff"] == 0.0 and row[m]["ci95"] == [0.0, 0.0] and not row[m]["excludes_zero"]


def test_a_clearly_better_method_is_resolved_and_a_noise_copy_is_not():
    good, bad = _preds("good", 2.0, seed=1), _preds("bad", 0.0, seed=2)
    row = paired_comparison({"good": good, "bad": bad}, "good", num_resamples=300)[0]
    assert row["accuracy"]["excludes_zero"] and row["accuracy"]["diff"] > 0.2
    assert row["nll"]["excludes_zero"] and row["nll"]["diff"] < 0
    twin = _preds("twin", 2.0, seed=3)  # same quality, different noise: CI must cover 0
    row = paired_comparison({"good": good, "twin": twin}, "good", num_resamples=300)[0]
    lo, hi = row["accuracy"]["ci95"]
    assert lo < 0 < hi


def test_pairing_uses_only_common_examples_and_checks_gold():
    a = _preds("a", 1.0)
    sub = Predictions("b", a.keys[:50], a.gold[:50], a.probs[:50])
    assert paired_comparison({"a": a, "b": sub}, "a", num_resamples=50)[0]["n"] == 50
    wrong = Predictions("c", a.keys, 1 - a.gold, a.probs)
    with pytest.raises(PredictionsError, match="disagree on gold"):
        paired_comparison({"a": a, "c": wrong}, "a", num_resamples=50)


def test_standard_error_shrinks_with_more_tasks():
    few, many = summarize({"x": _preds("x", 1.0, n_tasks=4)})[0], summarize({"x": _preds("x", 1.0, n_tasks=64)})[0]
    assert many["accuracy"]["se"] < few["accuracy"]["se"] / 2


def test_compare_command_on_two_run_directories(tmp_path, capsys):
    write_predictions_run(tmp_path / "r1", "abmll", _preds("abmll", 2.0, seed=1))
    write_predictions_run(tmp_path / "r2", "lora", _preds("lora", 0.0, seed=2))
    assert main(["compare", str(tmp_path / "r1"), str(tmp_path / "r2"), "--resamples", "100",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| abmll − method |" in out and "| lora | 320 | 8 |" in out and "ECE floor" in out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["paired"][0]["method"] == "lora" and saved["paired"][0]["accuracy"]["excludes_zero"]
    assert set(load_predictions([tmp_path / "r1", tmp_path / "r2"])) == {"abmll", "lora"}


def test_compare_command_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no predictions.jsonl" in err[0]
    write_predictions_run(tmp_path / "r1", "lora", _preds("lora", 1.0))
    assert main(["compare", str(tmp_path / "r1"), "--reference", "abmll"]) == 2
    assert "has no predictions" in capsys.readouterr().err


def test_compare_names_two_runs_of_one_method_and_restricts_tasks(tmp_path, capsys):
    a, b = _preds("abmll", 2.0, seed=1), _preds("abmll", 0.0, seed=2)
    write_predictions_run(tmp_path / "beta6", "abmll", a)
    write_predictions_run(tmp_path / "beta8", "abmll", b)
    # one method name in both files: without --names an error naming both (never one kept silently)
    with pytest.raises(PredictionsError, match=r"beta6/predictions\.jsonl and .*beta8/predictions\.jsonl both hold "
                                               r"method 'abmll'.*--names"):
        load_predictions([tmp_path / "beta6", tmp_path / "beta8"])
    both = load_predictions([tmp_path / "beta6", tmp_path / "beta8"], names=["b6", "b8"])
    assert set(both) == {"b6", "b8"} and np.array_equal(both["b6"].probs, a.probs)
    sub = load_predictions([tmp_path / "beta6"], tasks=["t1", "t3"])
    assert {k[1] for k in sub["abmll"].keys} == {"t1", "t3"} and len(sub["abmll"].keys) == 80
    (tmp_path / "tasks.txt").write_text("# headroom\nt1\n\nt3  # two\n")
    assert main(["compare", str(tmp_path / "beta6"), str(tmp_path / "beta8"), "--names", "b6", "b8",
                 "--reference", "b6", "--tasks-file", str(tmp_path / "tasks.txt"), "--resamples", "50"]) == 0
    assert "| b8 | 80 | 2 |" in capsys.readouterr().out
    # a task that is nowhere, or a names/paths mismatch: one line, exit 2
    assert main(["compare", str(tmp_path / "beta6"), "--tasks", "nope", "--reference", "abmll"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0]
    assert main(["compare", str(tmp_path / "beta6"), "--names", "x", "y"]) == 2
    assert "one per path" in capsys.readouterr().err


def test_student_t_quantiles():
    from abmll_pyro.eval.compare import t975

    # exact values from tables: df 2, 30, 40, 60, 120
    for df, want in ((2, 4.303), (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)):
        assert abs(t975(df) - want) < 1.5e-3, df
    with pytest.raises(ValueError):
        t975(0)


def _reseed(p: Predictions, seed: int) -> Predictions:
    return Predictions(p.method, [(seed, t, i) for _, t, i in p.keys], p.gold, p.probs)


def _concat(name: str, parts: list[Predictions]) -> Predictions:
    return Predictions(name, [k for p in parts for k in p.keys], np.concatenate([p.gold for p in parts]),
                       np.concatenate([p.probs for p in parts]))


def test_across_seeds_is_the_t_interval_of_per_seed_differences():
    """Each seed's difference equals the single-seed comparison's point difference; the interval is
    mean ± t(k−1)·sd/√k, by hand. Seeds that disagree in sign give an interval covering 0."""
    sharp = {0: (2.0, 0.0), 1: (0.0, 2.0), 2: (1.5, 0.5)}  # the reference wins on seeds 0 and 2, loses on 1
    ref = _concat("ref", [_reseed(_preds("ref", sharp[s][0], seed=10 + s), s) for s in range(3)])
    other = _concat("other", [_reseed(_preds("other", sharp[s][1], seed=20 + s), s) for s in range(3)])
    row = paired_comparison({"ref": ref, "other": other}, "ref", num_resamples=50)[0]
    across = row["across_seeds"]
    assert across["seeds"] == [0, 1, 2]
    for j, m in enumerate(("accuracy", "nll", "brier", "ece")):
        single = []
        for s in range(3):
            keep = [i for i, k in enumerate(ref.keys) if k[0] == s]
            one = {n: Predictions(n, [p.keys[i] for i in keep], p.gold[keep], p.probs[keep]) for n, p in (("ref", ref), ("other", other))}
            single.append(paired_comparison(one, "ref", num_resamples=10)[0][m]["diff"])
            assert paired_comparison(one, "ref", num_resamples=10)[0]["across_seeds"] is None
        assert np.allclose(across[m]["per_seed"], single)
        d = np.array(single)
        half = 4.303 * d.std(ddof=1) / np.sqrt(3)
        assert np.allclose(across[m]["ci95"], [d.mean() - half, d.mean() + half])
    acc = across["accuracy"]
    assert acc["per_seed"][0] > 0.2 and acc["per_seed"][1] < -0.2 and not acc["excludes_zero"]


def test_comparison_table_shows_the_across_seeds_interval():
    from abmll_pyro.eval.compare import format_comparison

    good = _concat("good", [_reseed(_preds("good", 2.0, seed=s), s) for s in range(3)])
    bad = _concat("bad", [_reseed(_preds("bad", 0.0, seed=5 + s), s) for s in range(3)])
    text = format_comparison(paired_comparison({"good": good, "bad": bad}, "good", num_resamples=50))
    assert "Across seeds" in text
    line = [l for l in text.splitlines() if l.startswith("| bad | 3 |")]
    assert len(line) == 1 and line[0].count("→") == 4 and " * " in line[0] + " "
    one = format_comparison(paired_comparison({"good": _preds("good", 2.0), "bad": _preds("bad", 0.0)}, "good",
                                              num_resamples=50))
    assert "Across seeds" not in one
