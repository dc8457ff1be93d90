"""ECE against torchmetrics, the ECE floor against simulation, pooled metrics against per-task ones."""

import pytest
import torch

from abmll_pyro.eval.metrics import compute_metrics, ece_floor, expected_calibration_error, pad_probs
from abmll_pyro.train.evaluate import pooled_metrics

torchmetrics = pytest.importorskip("torchmetrics")


def _random_probs(n: int, k: int, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * sharpness, -1)


@pytest.mark.parametrize("num_bins", [5, 15, 30])
@pytest.mark.parametrize("k", [2, 4])
def test_ece_matches_torchmetrics(num_bins, k):
    probs = _random_probs(500, k, seed=num_bins + k)
    gold = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    gold[:100] = (gold[:100] + 1) % k  # some miscalibration, so the ECE is not near 0
    ours = expected_calibration_error(probs, gold, num_bins)
    ref = torchmetrics.classification.MulticlassCalibrationError(num_classes=k, n_bins=num_bins, norm="l1")
    theirs = float(ref(probs.float(), gold))
    # torchmetrics runs in float32: agreement to float32 round-off of a mean of 500 terms
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours > 0.02


def test_floor_is_the_expected_ece_of_labels_drawn_from_the_predictions():
    probs = _random_probs(64, 3, seed=0, sharpness=1.5)
    floor = ece_floor(probs, 15, draws=400, seed=3)
    # independent route: draw full labels from each row's distribution, compute the ordinary ECE
    g = torch.Generator().manual_seed(11)
    measured = [expected_calibration_error(probs, torch.multinomial(probs, 1, generator=g).squeeze(1), 15)
                for _ in range(400)]
    mean = sum(measured) / len(measured)
    sd = torch.tensor(measured).std().item()
    # two Monte-Carlo means of 400 draws each: 4 standard errors of their difference
    assert floor == pytest.approx(mean, abs=4 * sd * (2 / 400) ** 0.5)
    assert 0.05 < floor < 0.3  # n = 64: far from 0, as the small-n bias says


def test_floor_shrinks_with_n():
    small, large = ece_floor(_random_probs(16, 2, 0), 15), ece_floor(_random_probs(1600, 2, 0), 15)
    assert large < small / 4  # roughly 1/sqrt(n): 10x fewer at 100x more examples, at least 4x


def test_floor_of_certain_predictions_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert ece_floor(probs, 15) == 0.0


def test_pooled_metrics_are_the_metrics_of_all_examples_together():
    a, b = _random_probs(10, 2, 1), _random_probs(20, 4, 2)
    ga, gb = torch.zeros(10, dtype=torch.long), torch.ones(20, dtype=torch.long)
    pooled = pooled_metrics(pad_probs([a, b]), torch.cat([ga, gb]), 15)
    ma, mb = compute_metrics(a, ga), compute_metrics(b, gb)
    assert pooled["n"] == 30
    assert pooled["accuracy"] == pytest.approx((ma.accuracy * 10 + mb.accuracy * 20) / 30)
    assert pooled["nll"] == pytest.approx((ma.nll * 10 + mb.nll * 20) / 30)
    assert pooled["brier"] == pytest.approx((ma.brier * 10 + mb.brier * 20) / 30)
    assert 0 <= pooled["ece_floor"] <= 1 and pooled["ece_bins"] == 15
