"""The ratio-target check (`abmll compare --target`) and the ECE floor's draws it rests on."""

import json

import numpy as np
import pytest
import torch

from abmll_pyro.cli import main
from abmll_pyro.eval.compare import Predictions, PredictionsError
from abmll_pyro.eval.metrics import ece_floor, ece_floor_draws
from abmll_pyro.eval.target import format_target, target_check
from _support.helpers import write_predictions_run


def _pair(n_tasks: int = 10, n: int = 60, p_gold0: float = 0.7):
    """Two predictors with the same argmax (option 0) on labels drawn with P(gold = 0) = p_gold0:
    one states p_gold0 (calibrated), one states 0.99 (overconfident)."""
    keys = [(0, f"t{t}", i) for t in range(n_tasks) for i in range(n)]
    gold = (np.random.default_rng(5).random(len(keys)) >= p_gold0).astype(int)
    calibrated = np.tile([p_gold0, 1 - p_gold0], (len(keys), 1))
    sure = np.tile([0.99, 0.01], (len(keys), 1))
    return Predictions("cal", keys, gold, calibrated), Predictions("sure", keys, gold, sure), gold


def test_floor_is_the_mean_of_its_draws():
    probs = torch.softmax(torch.randn(300, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    draws = ece_floor_draws(probs, 15, draws=400, seed=3)
    assert draws.shape == (400,) and draws.dtype == torch.float64 and (draws >= 0).all()
    assert ece_floor(probs, 15, draws=400, seed=3) == pytest.approx(float(draws.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="draws"):
        ece_floor_draws(probs, draws=0)


def test_a_calibrated_method_meets_the_target_against_an_overconfident_one_and_not_the_reverse():
    cal, sure, gold = _pair()
    t = target_check({"cal": cal, "sure": sure}, "cal", "sure", num_resamples=300, draws=500)
    # pooled figures by hand: same accuracy, NLL of the stated probabilities
    nll_cal = -np.log(np.where(gold == 0, 0.7, 0.3)).mean()
    nll_sure = -np.log(np.where(gold == 0, 0.99, 0.01)).mean()
    assert t["conditions"]["nll"]["ratio"] == pytest.approx(nll_cal / nll_sure)
    assert t["conditions"]["accuracy"]["diff"] == 0.0 and t["conditions"]["accuracy"]["met"]
    ece_sure = abs(0.99 - (gold == 0).mean())
    assert t["pooled"]["sure"]["ece"]["value"] == pytest.approx(ece_sure)
    assert t["conditions"]["nll"]["met"] and t["conditions"]["ece"]["met"] and t["met"]
    assert not t["ece_reachability"]["below_floor"] and t["ece_reachability"]["p_calibrated_meets"] == 1.0
    back = target_check({"cal": cal, "sure": sure}, "sure", "cal", num_resamples=300, draws=500)
    assert not back["conditions"]["nll"]["met"] and not back["conditions"]["ece"]["met"] and not back["met"]
    assert "**not met**" in format_target(back) and "— **met**" in format_target(t)


def test_reachability_is_the_share_of_calibrated_draws_below_the_ece_asked():
    cal, sure, _ = _pair()
    # a baseline whose ECE is already near the floor: half of it is below the calibrated draws
    near = Predictions("near", cal.keys, cal.gold, np.tile([0.72, 0.28], (len(cal.keys), 1)))
    t = target_check({"cal": cal, "near": near}, "cal", "near", num_resamples=200, draws=800, seed=4)
    r = t["ece_reachability"]
    draws = ece_floor_draws(torch.from_numpy(cal.probs), 15, 800, 4).numpy()
    assert r["ece_asked"] == pytest.approx(0.5 * t["pooled"]["near"]["ece"]["value"])
    assert r["p_calibrated_meets"] == pytest.approx((draws <= r["ece_asked"]).mean())
    assert r["floor_mean"] == pytest.approx(draws.mean())
    assert r["below_floor"] == (r["ece_asked"] < draws.mean())
    assert r["below_floor"] and "below the noise floor" in format_target(t)
    # NLL of the calibrated reference in expectation: its mean entropy (binary, p = 0.7)
    q = t["nll_reachability"]
    assert q["nll_if_calibrated"] == pytest.approx(-(0.7 * np.log(0.7) + 0.3 * np.log(0.3)))
    assert q["nll_asked"] == pytest.approx(0.7 * t["pooled"]["near"]["nll"]["value"])
    assert q["needs_sharper"] and "cannot meet the NLL condition" in format_target(t)


def test_target_check_rejects_what_it_cannot_compare():
    cal, sure, _ = _pair()
    with pytest.raises(PredictionsError, match="baseline method 'lora'"):
        target_check({"cal": cal, "sure": sure}, "cal", "lora")
    with pytest.raises(PredictionsError, match="both 'cal'"):
        target_check({"cal": cal, "sure": sure}, "cal", "cal")
    other = Predictions("other", [(1, "x", 0)], np.array([0]), np.array([[0.5, 0.5]]))
    with pytest.raises(PredictionsError, match="share no"):
        target_check({"cal": cal, "other": other}, "cal", "other")


def test_compare_target_command(tmp_path, capsys):
    cal, sure, _ = _pair()
    write_predictions_run(tmp_path / "a", "abmll", cal)
    write_predictions_run(tmp_path / "l", "lora", sure)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "l"), "--target", "lora", "--resamples", "100",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "Target: abmll against lora" in out and "| NLL ratio, difference resolved | ≤ 0.7× |" in out
    saved = json.loads((tmp_path / "cmp" / "target.json").read_text())
    assert saved["met"] and saved["baseline"] == "lora" and (tmp_path / "cmp" / "target.md").is_file()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "l"), "--target", "lora", "--ece-ratio", "0.01",
                 "--resamples", "100"]) == 0
    assert "not met" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "l"), "--target", "reptile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'reptile'" in err[0]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "l"), "--target", "lora", "--nll-ratio", "0"]) == 2
    assert "--nll-ratio must be > 0" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "l"), "--ece-ratio", "0.3"]) == 2
    assert "give --target too" in capsys.readouterr().err
