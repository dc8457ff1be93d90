"""The uncertainty split total = aleatoric + epistemic (issue 13, item 4) against closed forms."""

import math

import pyro
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm
from hypothesis import given, settings
from hypothesis import strategies as st

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI, posterior_predictive
from abmll_pyro.eval.uncertainty import example_fields, predict_with_uncertainty, uncertainty_means
from abmll_pyro.infer import predictive_samples, uncertainty_split
from abmll_pyro.models import TaskData

LOG2 = math.log(2.0)


def _h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_known_splits():
    samples = torch.tensor([
        [[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]],  # sample 1
        [[0.0, 1.0], [0.5, 0.5], [0.1, 0.9], [0.7, 0.3]],  # sample 2
    ])
    s = uncertainty_split(samples)
    # 0: confident samples that disagree: all epistemic; 1: identical coin flips: all aleatoric;
    # 2: mirrored 0.9/0.1: mixture is a coin flip, each sample has H(0.9, 0.1); 3: identical: MI = 0
    expected_total = [LOG2, LOG2, LOG2, _h(0.7, 0.3)]
    expected_alea = [0.0, LOG2, _h(0.9, 0.1), _h(0.7, 0.3)]
    torch.testing.assert_close(s.entropy, torch.tensor(expected_total, dtype=torch.float64))
    torch.testing.assert_close(s.aleatoric, torch.tensor(expected_alea, dtype=torch.float64))
    torch.testing.assert_close(s.epistemic, torch.tensor(expected_total, dtype=torch.float64) - torch.tensor(expected_alea, dtype=torch.float64))
    assert s.epistemic[1] == 0 and s.epistemic[3] == 0
    torch.testing.assert_close(s.probs[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # spread: std over samples of the top option's probability (ties go to the first option)
    torch.testing.assert_close(s.spread, torch.tensor([0.5, 0.0, 0.4, 0.0], dtype=torch.float64))


def test_one_sample_and_padding():
    p = torch.tensor([[0.2, 0.8, 0.0]])  # a padded third option: 0·log 0 = 0, no NaN
    s = uncertainty_split(p)
    assert float(s.epistemic) == 0 and float(s.entropy) == pytest.approx(_h(0.2, 0.8))
    assert float(s.spread) == 0
    with pytest.raises(ValueError, match="shape"):
        uncertainty_split(torch.ones(3))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 5), st.integers(0, 10_000))
def test_split_identities(S, n, K, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(S, n, K, generator=g, dtype=torch.float64), -1)
    s = uncertainty_split(p)
    torch.testing.assert_close(s.entropy, s.aleatoric + s.epistemic, rtol=0, atol=1e-12)
    assert bool((s.epistemic >= 0).all()) and bool((s.entropy <= math.log(K) + 1e-12).all())


def _svi():
    adapter = BayesLoRA(tiny_lm("qwen2", seed=4), AdapterConfig(rank=2, init_std=0.05),
                        generator=torch.Generator().manual_seed(0))
    return MetaSVI(adapter, MetaConfig(kl_beta=1e-3))


def test_samples_average_to_the_posterior_predictive_and_sampling_gives_epistemic_uncertainty():
    svi = _svi()
    post = svi.adapt(TaskData(random_option_batch(4, generator=torch.Generator().manual_seed(2))))
    query = TaskData(random_option_batch(6, generator=torch.Generator().manual_seed(3)))
    pyro.set_rng_seed(7)
    samples = predictive_samples(svi, post, query, num_samples=4)
    pyro.set_rng_seed(7)
    mean = posterior_predictive(svi, post, query, num_samples=4)
    assert samples.shape == (4, 6, 3) and samples.dtype == torch.float64
    torch.testing.assert_close(samples.mean(0).float(), mean, rtol=0, atol=0)  # same draws, same average
    split = uncertainty_split(samples)
    assert float(split.epistemic.min()) > 0  # σ = 0.05 elementwise: the samples disagree
    mean_mode = uncertainty_split(predictive_samples(svi, post, query, mode="mean"))
    assert float(mean_mode.epistemic.abs().max()) == 0  # one "sample": nothing to disagree


class _Deterministic:
    def predict(self, state, episode):
        return torch.tensor([[0.25, 0.75], [1.0, 0.0]])


def test_method_helpers_per_example_and_pooled_means():
    split = predict_with_uncertainty(_Deterministic(), None, None)
    rows = example_fields(split)
    assert rows[0]["epistemic"] == 0 and rows[0]["entropy"] == pytest.approx(_h(0.25, 0.75))
    assert rows[1] == {"entropy": 0.0, "aleatoric": 0.0, "epistemic": 0.0, "spread": 0.0}
    other = uncertainty_split(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # 1 example, all epistemic
    means = uncertainty_means({"a": split, "b": other})
    assert means["per_task"]["a"]["entropy"] == pytest.approx(_h(0.25, 0.75) / 2)
    assert means["per_task"]["b"]["epistemic"] == pytest.approx(LOG2)
    assert means["per_task"]["b"]["spread"] == pytest.approx(0.5)  # top option's probability: 1 and 0
    # pooled: the mean over all 3 examples, not the mean of the task means
    assert means["pooled"]["entropy"] == pytest.approx((_h(0.25, 0.75) + LOG2) / 3) and means["pooled"]["n"] == 3
