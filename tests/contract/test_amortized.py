"""The amortized guide: starts as the mean-field guide, encodes the labelled support set with the
frozen LM, and trains through the first-order pass-through (and not without it)."""

import pytest
import torch
from _support.helpers import family_batch

from abmll_pyro import InnerLoopConfig, MeanFieldGuide, MetaConfig
from abmll_pyro.guides.amortized import AmortizedGuide, support_embedding
from abmll_pyro.models import TaskData


def test_zero_initialized_output_starts_as_mean_field(make_svi, make_episodes):
    svi = make_svi("hierarchical", "amortized")
    ep = make_episodes([5])[0]
    theta = svi.theta()
    start = svi.guide.task_guide.init_task_params(svi.adapter, theta, ep.support)
    reference = MeanFieldGuide().init_task_params(svi.adapter, theta, ep.support)
    for k in theta:
        torch.testing.assert_close(start[k], reference[k], rtol=0, atol=0)


def test_embedding_uses_base_model_and_gold_options(make_svi):
    svi = make_svi("hierarchical", "amortized")
    adapter = svi.adapter
    batch = family_batch(4, 3, torch.Generator().manual_seed(0))
    e = support_embedding(adapter, TaskData(batch))
    assert e.shape == (adapter.lm.config.hidden_size,) and e.dtype == torch.float32 and not e.requires_grad
    with adapter.use(adapter.sample_deltas(svi.theta())):  # adapters on: the embedding must not change
        torch.testing.assert_close(support_embedding(adapter, TaskData(batch)), e, rtol=0, atol=0)
    relabelled = type(batch)(**{**batch.__dict__, "gold": (batch.gold + 1) % 3})
    assert not torch.allclose(support_embedding(adapter, TaskData(relabelled)), e)  # labels are evidence


@pytest.mark.parametrize("num_inner_steps,pass_through,trains", [(0, True, True), (2, True, True), (2, False, False)])
def test_encoder_trains_through_pass_through(num_inner_steps, pass_through, trains, make_svi, make_episodes):
    svi = make_svi("hierarchical", "amortized")
    svi.config = MetaConfig(kl_beta=1e-6, outer_lr=3e-2,
                            inner=InnerLoopConfig(num_inner_steps=num_inner_steps, inner_lr=1e-3, pass_through=pass_through))
    guide = svi.guide.task_guide
    before = guide.out.weight.detach().clone()
    svi.step(make_episodes([0, 1]), num_tasks=40)
    moved = not torch.equal(guide.out.weight.detach(), before)
    assert moved == trains
    if trains:  # after one step the start depends on the support set: K = 0 adaptation returns it
        ep = make_episodes([7])[0]
        post = svi.adapt(ep.support, num_inner_steps=0)
        theta = svi.theta()
        assert any(not torch.allclose(post[k], theta[k]) for k in guide.keys)


def test_rejects_bad_settings(make_svi):
    adapter = make_svi("hierarchical", "mean-field").adapter
    with pytest.raises(ValueError, match="factors"):
        AmortizedGuide(adapter, factors=("mu_C",))
    with pytest.raises(ValueError, match="embed_dim"):
        AmortizedGuide(adapter, embed=lambda a, s: torch.zeros(3))
    with pytest.raises(ValueError, match="support"):
        AmortizedGuide(adapter).init_task_params(adapter, adapter.global_params(), None)


def test_custom_embedding_for_non_text_data(make_svi):
    adapter = make_svi("hierarchical", "mean-field").adapter
    guide = AmortizedGuide(adapter, embed=lambda a, s: s.batch.float().mean(0), embed_dim=3, hidden=8)
    start = guide.init_task_params(adapter, adapter.global_params(), TaskData(torch.ones(5, 3)))
    assert set(start) == set(adapter.global_params())


def test_benchmark_script_smoke_preset(capsys):
    from pathlib import Path

    from abmll_pyro.registry import load_object

    script = Path(__file__).resolve().parents[2] / "examples" / "amortization_benchmark.py"
    load_object(f"{script}:main")(["--smoke"])
    out = capsys.readouterr().out
    assert out.count("| rule |") == 4 and "| amortized |" in out and "| mean-field |" in out
