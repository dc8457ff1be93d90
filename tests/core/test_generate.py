"""Posterior predictive generation: draws through the guide, one ΔW per draw, seeds, summaries;
Pyro's own Predictive on our model and guide (option probabilities and generated continuations)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI, posterior_predictive
from abmll_pyro import sites
from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.infer.generate import (GenerationConfig, continuations, decode_answers, draw_deltas, encode_prompts,
                                       generation_model, normalize_answer, sample_answers, summarize_answers)
from abmll_pyro.lms.tiny import tiny_model
from abmll_pyro.models import TaskData
from _support.helpers import toy_option_chars

PROMPTS = ["Opposite of hot:", "Plural of cat:", "2+2="]


def _svi(init_std: float = 0.3) -> tuple[MetaSVI, object, dict]:
    lm, tok = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, init_std=init_std), generator=torch.Generator().manual_seed(0))
    svi = MetaSVI(adapter, MetaConfig(kl_beta=1e-3))
    params = {k: v.detach().clone() for k, v in svi.theta().items()}
    return svi, tok, params


def test_s_answers_per_prompt_and_seed_reproducible():
    svi, tok, params = _svi()
    batch = encode_prompts(tok, PROMPTS)
    gen = GenerationConfig(max_new_tokens=5, stop_strings=())
    pyro.set_rng_seed(3)
    a = sample_answers(svi, params, batch, tok, 4, gen)
    pyro.set_rng_seed(3)
    b = sample_answers(svi, params, batch, tok, 4, gen)
    assert len(a) == len(PROMPTS) and all(len(x) == 4 for x in a)
    assert a == b
    # σ = 0.3 elementwise on random factors: the draws must not all give the same answers
    assert any(len(set(x)) > 1 for x in a)


def test_draws_differ_and_one_delta_serves_the_whole_generation():
    svi, tok, params = _svi()
    batch = encode_prompts(tok, PROMPTS)
    gen = GenerationConfig(max_new_tokens=6, stop_strings=())
    pyro.set_rng_seed(0)
    first, second = draw_deltas(svi, params, batch), draw_deltas(svi, params, batch)
    assert set(first) == set(svi.adapter.shapes)
    assert all(not torch.equal(first[m], second[m]) for m in first)
    # the generated site of a draw equals generating with that draw's ΔW (as Predictive returns it) fixed
    names = svi.adapter.module_names
    out = Predictive(generation_model(svi, tok, gen), guide=svi.guide, num_samples=2,
                     return_sites=["generated[0]"] + [sites.phi(0, m) for m in names])(
        svi.theta(), [params], [TaskData(batch, observed=False)])
    for s in range(2):
        with svi.adapter.use({m: out[sites.phi(0, m)][s].reshape(svi.adapter.shapes[m]) for m in names}):
            direct = continuations(svi.adapter.lm, batch, tok, gen)
        assert torch.equal(out["generated[0]"][s], direct)
    assert not torch.equal(out["generated[0]"][0], out["generated[0]"][1])


def test_predictive_generated_site_shape():
    svi, tok, params = _svi()
    batch = encode_prompts(tok, PROMPTS[:2])
    out = Predictive(generation_model(svi, tok, GenerationConfig(max_new_tokens=4)), guide=svi.guide, num_samples=3,
                     return_sites=["generated[0]"])(svi.theta(), [params], [TaskData(batch, observed=False)])
    assert out["generated[0]"].shape == (3, 2, 4)


def _query() -> OptionBatch:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (5,), generator=g).tolist() for _ in range(4)]
    options = [[torch.randint(1, 200, (2,), generator=g).tolist() for _ in range(3)] for _ in range(4)]
    return OptionBatch.from_token_ids(prompts, options, [0, 1, 2, 0], option_chars=toy_option_chars(options))


class _ReplayDraws:
    """A guide that replays given ΔW draws, one per call, in order (through ``poutine.replay``)."""

    def __init__(self, guide, draws: list[dict]):
        self.guide, self.draws, self.calls = guide, draws, 0

    def __call__(self, *args):
        trace = poutine.Trace()
        for name, value in self.draws[self.calls].items():
            trace.add_node(name, type="sample", value=value, is_observed=False, infer={})
        self.calls += 1
        return poutine.replay(self.guide, trace=trace)(*args)


def test_pyro_predictive_matches_posterior_predictive():
    """Pyro's Predictive on our model and guide returns per-sample option probabilities, each the
    softmax of the option scores under that sample's ΔW (also returned), and their mean is
    posterior_predictive's over the same draws (to float round-off: 1e-5). The same draws: under one
    seed the two consume the RNG in another order (Predictive runs the guide S times first, and traces
    once to count plates), so posterior_predictive is fed Predictive's draws by a replaying guide."""
    svi, _, params = _svi(init_std=0.05)
    query = TaskData(_query(), observed=False)
    S, names = 4, svi.adapter.module_names
    phi = [sites.phi(0, m) for m in names]
    out = Predictive(svi.model, guide=svi.guide, num_samples=S, return_sites=[sites.probs(0)] + phi)(
        svi.theta(), [params], [query])
    probs = out[sites.probs(0)]
    assert probs.shape == (S, 4, 3)
    draws = [{p: out[p][s].reshape(svi.adapter.shapes[m]) for p, m in zip(phi, names)} for s in range(S)]
    for s in range(S):
        with torch.no_grad(), svi.adapter.use(dict(zip(names, draws[s].values()))):
            again = torch.softmax(svi.model.likelihood.scores(svi.adapter.lm, query.batch), -1)
        torch.testing.assert_close(probs[s].float(), again, atol=1e-5, rtol=0)
    assert not torch.allclose(probs[0], probs[1], atol=1e-4)  # σ = 0.05: the draws differ, the check is not vacuous
    view = SimpleNamespace(model=svi.model, guide=_ReplayDraws(svi.guide, draws), theta=svi.theta, adapter=svi.adapter)
    ours = posterior_predictive(view, params, query, num_samples=S)
    torch.testing.assert_close(probs.double().mean(0).float(), ours, atol=1e-5, rtol=0)


def test_summaries_and_normalisation():
    assert normalize_answer("  Paris. ") == "paris" and normalize_answer("New   York!") == "new york"
    s = summarize_answers(["Paris", "paris.", "Rome", "Lyon"], target="PARIS")
    assert s["majority"] == "Paris" and s["agreement"] == 0.5 and s["exact_match"] is True
    p = [0.5, 0.25, 0.25]
    assert s["entropy"] == pytest.approx(-sum(x * math.log(x) for x in p))
    agree = summarize_answers(["a", "A"])
    assert agree["entropy"] == 0.0 and "exact_match" not in agree
    assert summarize_answers(["x", "y", "z"])["entropy"] == pytest.approx(math.log(3))


def test_stop_strings_cut_the_answer():
    _, tok, _ = _svi()
    ids = torch.tensor([tok(" cold\nhot", add_special_tokens=False).input_ids])
    assert decode_answers(tok, ids, 256, ["\n"]) == ["cold"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def test_mean_mode_is_one_answer_per_prompt():
    svi, tok, params = _svi()
    batch = encode_prompts(tok, PROMPTS)
    answers = sample_answers(svi, params, batch, tok, 5, GenerationConfig(max_new_tokens=3), mode="mean")
    assert all(len(a) == 1 for a in answers)
