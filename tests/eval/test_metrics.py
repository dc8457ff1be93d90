"""Metrics against hand-computed oracles and torch's own cross-entropy; every validation error path.

Tolerances: oracles are exact rationals evaluated in float64 through a handful of additions, so
1e-12 absolute is far above accumulated rounding (~1e-16 per operation) and far below any real error.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from abmll_pyro.eval import (
    TaskMetrics,
    accuracy,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    macro_average,
    negative_log_likelihood,
    reliability_diagram,
)

TOL = 1e-12


def test_perfect_predictions():
    gold = torch.tensor([0, 2, 1, 1])
    probs = F.one_hot(gold, 3).to(torch.float32)
    m = compute_metrics(probs, gold)
    assert m == TaskMetrics(accuracy=1.0, ece=0.0, nll=0.0, brier=0.0, n=4)


def test_uniform_two_options():
    # Ties go to option 0, so accuracy is the fraction of gold == 0; confidence is 0.5 everywhere,
    # so every bin setting gives ECE = |0.5 - acc|. Brier: (0.5 - 1)^2 + 0.5^2 = 0.5; NLL = log 2.
    gold = torch.tensor([0, 1, 1, 1, 0])
    probs = torch.full((5, 2), 0.5)
    acc = 2 / 5
    assert accuracy(probs, gold) == pytest.approx(acc, abs=TOL)
    for num_bins in (1, 2, 3, 10, 15):
        assert expected_calibration_error(probs, gold, num_bins) == pytest.approx(abs(0.5 - acc), abs=TOL)
    assert brier_score(probs, gold) == pytest.approx(0.5, abs=TOL)
    assert negative_log_likelihood(probs, gold) == pytest.approx(math.log(2), abs=TOL)  # 0.5 is exact in float32


def _three_bin_example():
    probs = torch.tensor(
        [
            [0.30, 0.25, 0.25, 0.20],  # conf .3, bin 0, correct
            [0.25, 0.30, 0.25, 0.20],  # conf .3, bin 0, wrong
            [0.60, 0.20, 0.10, 0.10],  # conf .6, bin 1, correct
            [0.10, 0.50, 0.20, 0.20],  # conf .5, bin 1, wrong
            [0.90, 0.05, 0.05, 0.00],  # conf .9, bin 2, correct (padded slot)
            [0.80, 0.10, 0.10, 0.00],  # conf .8, bin 2, wrong
            [0.70, 0.20, 0.10, 0.00],  # conf .7, bin 2, correct
        ],
        dtype=torch.float64,
    )
    gold = torch.tensor([0, 0, 0, 2, 0, 1, 0])
    return probs, gold


def test_hand_computed_ece_three_bins():
    # Bins (0, 1/3], (1/3, 2/3], (2/3, 1]:
    #   bin 0: conf .3, acc 1/2 -> gap .2;  bin 1: conf .55, acc 1/2 -> gap .05;
    #   bin 2: conf .8, acc 2/3 -> gap 2/15.  ECE = (2 * .2 + 2 * .05 + 3 * 2/15) / 7 = 0.9 / 7.
    probs, gold = _three_bin_example()
    assert expected_calibration_error(probs, gold, num_bins=3) == pytest.approx(0.9 / 7, abs=TOL)
    d = reliability_diagram(probs, gold, num_bins=3)
    assert d.count.tolist() == [2, 2, 3]
    assert torch.allclose(d.confidence, torch.tensor([0.3, 0.55, 0.8], dtype=torch.float64), atol=TOL)
    assert torch.allclose(d.accuracy, torch.tensor([0.5, 0.5, 2 / 3], dtype=torch.float64), atol=TOL)
    assert torch.allclose(d.edges, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64), atol=TOL)
    assert d.num_bins == 3 and d.n == 7 and d.ece == pytest.approx(0.9 / 7, abs=TOL)


def test_ten_bins_leave_empty_bins_nan():
    probs, gold = _three_bin_example()
    d = reliability_diagram(probs, gold, num_bins=10)
    assert d.num_bins == 10 and d.count.sum() == 7
    # conf .3 in (.2, .3] (bin 2), .5 in (.4, .5] (bin 4), .6 -> 5, .7 -> 6, .8 -> 7, .9 -> 8
    assert d.count.tolist() == [0, 0, 2, 0, 1, 1, 1, 1, 1, 0]
    assert torch.isnan(d.accuracy[d.count == 0]).all() and torch.isnan(d.confidence[d.count == 0]).all()


def test_bins_are_closed_on_the_right():
    # With 2 bins, confidence exactly 0.5 belongs to (0, 0.5] and 1.0 to (0.5, 1]; float32 0.3
    # with 10 bins belongs to (0.2, 0.3] as written, not to the next bin.
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert reliability_diagram(probs, torch.tensor([0, 0]), num_bins=2).count.tolist() == [1, 1]
    probs32 = torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=torch.float32)
    assert reliability_diagram(probs32, torch.tensor([0]), num_bins=10).count.tolist()[2] == 1


def test_one_bin_ece_is_mean_confidence_gap():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 4, generator=g, dtype=torch.float64), dim=1)
    gold = torch.randint(0, 4, (50,), generator=g)
    conf, pred = probs.max(dim=1)
    expected = abs(float(conf.mean()) - float((pred == gold).double().mean()))
    assert expected_calibration_error(probs, gold, num_bins=1) == pytest.approx(expected, abs=TOL)


def test_nll_matches_torch_cross_entropy_with_padding():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 5, generator=g, dtype=torch.float64)
    num_options = torch.randint(2, 6, (40,), generator=g)
    logits[torch.arange(5)[None, :] >= num_options[:, None]] = float("-inf")  # padded slots -> p = 0
    gold = (torch.rand(40, generator=g, dtype=torch.float64) * num_options).long()
    probs = torch.softmax(logits, dim=1)
    expected = float(F.cross_entropy(logits, gold))
    assert negative_log_likelihood(probs, gold) == pytest.approx(expected, abs=1e-10)


def test_nll_clamps_zero_probability_to_finite():
    probs = torch.tensor([[1.0, 0.0]])
    nll = negative_log_likelihood(probs, torch.tensor([1]))
    assert nll == pytest.approx(-math.log(torch.finfo(torch.float32).tiny), rel=1e-12)


def test_padded_options_are_ignored():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(30, 3, generator=g, dtype=torch.float64), dim=1)
    gold = torch.randint(0, 3, (30,), generator=g)
    padded = torch.cat([probs, torch.zeros(30, 2, dtype=torch.float64)], dim=1)
    a, b = compute_metrics(probs, gold), compute_metrics(padded, gold)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), abs=TOL)


def test_brier_hand_computed():
    # Row 0: (.7-1)^2 + .2^2 + .1^2 = .14; row 1 (gold 2, padded slot 3): .5^2 + .3^2 + (.2-1)^2 = .98.
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    assert brier_score(probs, torch.tensor([0, 2])) == pytest.approx((0.14 + 0.98) / 2, abs=TOL)


def test_compute_metrics_agrees_with_single_functions():
    probs, gold = _three_bin_example()
    m = compute_metrics(probs, gold, num_bins=3)
    assert m.accuracy == accuracy(probs, gold) == pytest.approx(4 / 7, abs=TOL)
    assert m.ece == expected_calibration_error(probs, gold, 3)
    assert m.nll == negative_log_likelihood(probs, gold) and m.brier == brier_score(probs, gold)
    assert m.n == 7


def test_macro_average_is_unweighted_over_tasks():
    tasks = {
        "a": TaskMetrics(accuracy=1.0, ece=0.0, nll=0.5, brier=0.1, n=10),
        "b": TaskMetrics(accuracy=0.5, ece=0.2, nll=1.5, brier=0.3, n=30),
    }
    out = macro_average(tasks)
    assert out == pytest.approx({"accuracy": 0.75, "ece": 0.1, "nll": 1.0, "brier": 0.2, "n": 40, "num_tasks": 2})
    assert isinstance(out["n"], int)


def test_macro_average_errors():
    with pytest.raises(ValueError, match="empty"):
        macro_average({})
    with pytest.raises(TypeError, match="'t'.*dict"):
        macro_average({"t": {"accuracy": 1.0}})


GOOD = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
GOLD = torch.tensor([0, 1])


@pytest.mark.parametrize(
    "probs, gold, exc, pattern",
    [
        (GOOD[0], GOLD, ValueError, r"shape \[n, max_options\], got \(2,\)"),
        (GOOD, GOLD[:, None], ValueError, r"gold must have shape \[n\], got \(2, 1\)"),
        (GOOD, GOLD[:1], ValueError, "2 rows but gold has 1"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ValueError, "empty"),
        (torch.zeros(2, 0), GOLD, ValueError, "no option slots"),
        (torch.tensor([[1, 0], [0, 1]]), GOLD, TypeError, "floating"),
        (GOOD, GOLD.float(), TypeError, "integer"),
        (GOOD, GOLD.bool(), TypeError, "integer"),
        ([[0.6, 0.4]], [0], TypeError, "torch tensors"),
        (torch.tensor([[0.6, 0.4], [0.3, 0.8]]), GOLD, ValueError, r"row 1 sums to 1\.1"),
        (torch.tensor([[0.6, 0.4], [1.5, -0.5]]), GOLD, ValueError, r"row 1 has an entry outside \[0, 1\]"),
        (torch.tensor([[0.6, 0.4], [float("nan"), 1.0]]), GOLD, ValueError, "row 1 has a non-finite"),
        (torch.tensor([[float("inf"), 0.4], [0.2, 0.8]]), GOLD, ValueError, "row 0 has a non-finite"),
        (GOOD, torch.tensor([0, 2]), ValueError, r"gold\[1\] = 2 is out of range for 2"),
        (GOOD, torch.tensor([-1, 0]), ValueError, r"gold\[0\] = -1 is out of range"),
    ],
)
@pytest.mark.parametrize(
    "fn", [accuracy, expected_calibration_error, negative_log_likelihood, brier_score, reliability_diagram, compute_metrics]
)
def test_invalid_inputs_raise(fn, probs, gold, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(probs, gold)


@pytest.mark.parametrize("fn", [expected_calibration_error, reliability_diagram, compute_metrics])
@pytest.mark.parametrize("num_bins, exc, pattern", [(0, ValueError, ">= 1, got 0"), (-3, ValueError, "got -3"),
                                                    (2.5, TypeError, "2.5"), (True, TypeError, "True")])
def test_invalid_num_bins_raise(fn, num_bins, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(GOOD, GOLD, num_bins)


def test_rows_within_tolerance_are_accepted():
    # float32 softmax over many options is off 1 by ~1e-7, well inside the 1e-4 tolerance.
    probs = torch.softmax(torch.randn(8, 1000, generator=torch.Generator().manual_seed(3)), dim=1)
    assert 0.0 <= accuracy(probs, torch.zeros(8, dtype=torch.long)) <= 1.0
