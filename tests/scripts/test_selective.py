"""Selective prediction: accuracy of the least uncertain fraction, against a hand-ranked oracle."""

import pytest
import torch

from scripts.uncertainty.curves import selective_accuracy


def test_selective_accuracy_ranks_by_uncertainty():
    uncertainty = torch.tensor([0.9, 0.1, 0.5, 0.3])
    correct = torch.tensor([False, True, False, True])
    # ranked: 0.1 (right), 0.3 (right), 0.5 (wrong), 0.9 (wrong)
    assert selective_accuracy(uncertainty, correct, (0.25, 0.5, 0.75, 1.0)) == pytest.approx([1.0, 1.0, 2 / 3, 0.5])
    assert selective_accuracy(uncertainty, correct, (0.1,)) == [1.0]  # at least one example
