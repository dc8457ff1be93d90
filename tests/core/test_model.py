"""The Pyro model and guide: sites, plates, subsampling scale, likelihoods, and all three architectures."""

import pyro.poutine as poutine
import pytest
import torch
from _support.helpers import family_episode, random_option_batch, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI, TokenLikelihood, sites
from abmll_pyro.data.scoring import TokenBatch
from abmll_pyro.infer import Episode
from abmll_pyro.models import TaskData


def _traces(svi, tasks):
    theta = svi.theta()
    params = [svi.guide.task_guide.init_task_params(svi.adapter, theta) for _ in tasks]
    args = (theta, params, tasks)
    guide_tr = poutine.trace(svi.guide).get_trace(*args)
    model_tr = poutine.trace(poutine.replay(svi.model, trace=guide_tr)).get_trace(*args)
    return guide_tr, model_tr


def test_sites_plates_and_shapes():
    adapter = BayesLoRA(tiny_lm("llama"), AdapterConfig(rank=2))
    svi = MetaSVI(adapter)
    tasks = [TaskData(random_option_batch(3)), TaskData(random_option_batch(5))]
    guide_tr, model_tr = _traces(svi, tasks)
    for m, shape in adapter.shapes.items():
        for key in ("mean", "precision"):
            assert model_tr.nodes[sites.theta(m, key)]["value"].shape == shape
            assert guide_tr.nodes[sites.theta(m, key)]["fn"].__class__.__name__ == "Delta"
        for i in range(2):
            assert model_tr.nodes[sites.phi(i, m)]["value"].shape == shape
    for i, n in enumerate((3, 5)):
        assert model_tr.nodes[sites.obs(i)]["value"].shape == (n,)
        assert model_tr.nodes[sites.probs(i)]["value"].shape == (n, 3)
        frames = {f.name for f in model_tr.nodes[sites.obs(i)]["cond_indep_stack"]}
        assert frames == {sites.TASKS, sites.data(i)}


def test_data_plate_subsampling_scales_by_n_over_subsample():
    svi = MetaSVI(BayesLoRA(tiny_lm("llama"), AdapterConfig(rank=2)))
    _, model_tr = _traces(svi, [TaskData(random_option_batch(6), subsample_size=2)])
    node = model_tr.nodes[sites.obs(0)]
    assert node["value"].shape == (2,) and node["scale"] == pytest.approx(3.0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_meta_step_on_each_architecture(kind):
    svi = MetaSVI(BayesLoRA(tiny_lm(kind), AdapterConfig(rank=2)), MetaConfig(kl_beta=1e-6))
    g = torch.Generator().manual_seed(0)
    before = {k: v.detach().clone() for k, v in svi.theta().items()}
    result = svi.step([family_episode(i, 3, 4, g) for i in range(2)], num_tasks=10)
    assert all(map(lambda v: abs(v) < float("inf"), (result.loss, result.nll, result.task_kl, result.log_p_theta)))
    assert any(not torch.equal(before[k], v) for k, v in svi.theta().items())


def _token_batch(n, g):
    ids = torch.randint(1, 48, (n, 7), generator=g)
    target = torch.zeros(n, 7, dtype=torch.bool)
    target[:, 4:] = True
    return TokenBatch(ids, torch.ones_like(ids), target)


def test_token_likelihood_observes_target_tokens():
    lm = tiny_lm("llama")
    svi = MetaSVI(BayesLoRA(lm, AdapterConfig(rank=2)), likelihood=TokenLikelihood())
    g = torch.Generator().manual_seed(0)
    batch = _token_batch(3, g)
    _, model_tr = _traces(svi, [TaskData(batch)])
    node = model_tr.nodes[sites.obs(0)]
    with svi.adapter.use({m: node_v for m, node_v in
                          ((m, model_tr.nodes[sites.phi(0, m)]["value"]) for m in svi.adapter.shapes)}):
        logp = torch.log_softmax(lm(input_ids=batch.input_ids).logits.float(), -1)
    direct = logp[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)[:, 3:].sum()
    torch.testing.assert_close(node["fn"].log_prob(node["value"]).sum(), direct, rtol=1e-5, atol=1e-4)
    result = svi.step([Episode("gen", TaskData(_token_batch(2, g)), TaskData(_token_batch(2, g)))], num_tasks=1)
    assert result.nll > 0
