"""Posterior predictive: shapes, normalization, padding, modes and seed reproducibility."""

import dataclasses

import pyro
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm, toy_option_chars

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI, posterior_predictive
from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.models import TaskData


def _svi():
    adapter = BayesLoRA(tiny_lm("qwen2", seed=4), AdapterConfig(rank=2, init_std=0.05),
                        generator=torch.Generator().manual_seed(0))
    return MetaSVI(adapter, MetaConfig(kl_beta=1e-3))


def _mixed_query():
    """Examples with 2, 3 and 4 options: padded option slots must get probability 0."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 48, (4,), generator=g).tolist() for _ in range(3)]
    options = [[[int(t)] for t in torch.randint(1, 48, (k,), generator=g)] for k in (2, 3, 4)]
    return OptionBatch.from_token_ids(prompts, options, [0, 2, 3], option_chars=toy_option_chars(options))


@pytest.mark.parametrize("mode,samples", [("sample", 1), ("sample", 5), ("mean", 1)])
def test_shapes_normalization_and_padding(mode, samples):
    svi = _svi()
    support = TaskData(random_option_batch(4, generator=torch.Generator().manual_seed(2)))
    post = svi.adapt(support)
    probs = posterior_predictive(svi, post, TaskData(_mixed_query()), num_samples=samples, mode=mode)
    assert probs.shape == (3, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert probs[0, 2:].eq(0).all() and probs[1, 3].eq(0)


def test_same_seed_same_prediction_and_samples_differ_from_mean():
    svi = _svi()
    support = TaskData(random_option_batch(4, generator=torch.Generator().manual_seed(2)))
    query = TaskData(random_option_batch(6, generator=torch.Generator().manual_seed(3)))
    pyro.set_rng_seed(5)
    post = svi.adapt(support)
    a = posterior_predictive(svi, post, query, num_samples=3)
    pyro.set_rng_seed(5)
    post2 = svi.adapt(support)
    b = posterior_predictive(svi, post2, query, num_samples=3)
    assert torch.equal(a, b)
    mean = posterior_predictive(svi, post, query, mode="mean")
    assert not torch.equal(a, mean)  # σ = 0.05 elementwise: samples move the probabilities
    torch.testing.assert_close(a, mean, atol=0.2, rtol=0)  # ... but not far from the mean's


def test_labels_are_not_used():
    svi = _svi()
    post = svi.adapt(TaskData(random_option_batch(4)))
    q = random_option_batch(5, generator=torch.Generator().manual_seed(9))
    flipped = dataclasses.replace(q, gold=(q.gold + 1) % 3)
    pyro.set_rng_seed(0)
    a = posterior_predictive(svi, post, TaskData(q), num_samples=2)
    pyro.set_rng_seed(0)
    b = posterior_predictive(svi, post, TaskData(flipped), num_samples=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # labels unused; ulp-level kernel noise only


def test_bad_prediction_settings():
    svi = _svi()
    post = svi.adapt(TaskData(random_option_batch(4)))
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        posterior_predictive(svi, post, TaskData(random_option_batch(2)), num_samples=0)
    with pytest.raises(ValueError, match="mode must be 'sample' or 'mean', got 'mode'"):
        posterior_predictive(svi, post, TaskData(random_option_batch(2)), mode="mode")
