"""The method contract (every method), and each baseline's algorithm against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from abmll_pyro.config import AdapterConfig, InnerLoopConfig
from abmll_pyro.data.tasks import TaskSplit
from abmll_pyro.lms import tiny_model
from abmll_pyro.lora import BayesLoRA
from abmll_pyro.methods import METHODS, Reptile, RegularLoRA, StructuredLoRA, build_method, option_nll, option_probs
from abmll_pyro.presets import _synthetic_task
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder, with_demonstrations

CONFIG = RunConfig(model="tiny-llama", rank=2, lora_alpha=4.0, num_inner_steps=2, inner_lr=1e-2, outer_lr=1e-2,
                   num_samples=2, kl_beta=1e-3)


@pytest.fixture
def setup():
    import random

    lm, tok = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0))
    task = _synthetic_task(0, 10, random.Random(0))
    split = TaskSplit(task.name, task.examples[:3], task.examples[3:7])
    return adapter, tok, split


def _episode(tok, split, in_context=False):
    return EpisodeEncoder(tok, 128, in_context=in_context)(split)


@pytest.mark.parametrize("name", list(METHODS))
def test_contract_adapt_predict_and_train_step(setup, name):
    adapter, tok, split = setup
    method = build_method(name, adapter, CONFIG, num_train_tasks=4)
    episode = _episode(tok, split, method.in_context)
    probs = method.predict(method.adapt(episode), episode)
    assert probs.shape == (4, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)  # float32 softmax (averaged) sums to 1
    if method.trainable:
        before = {k: v.clone() for k, v in method.state_tensors().items()}
        opt = method.make_optimizer()
        parts = method.train_step([episode, episode], lambda loss: loss.backward())
        opt.step()
        assert math.isfinite(parts["loss"])
        after = method.state_tensors()
        assert any(not torch.equal(before[k], after[k]) for k in before), "a training step changed nothing"
        method.load_state_tensors(before)
        assert all(torch.equal(before[k], v) for k, v in method.state_tensors().items())
    else:
        with pytest.raises(NotImplementedError):
            method.train_step([episode], lambda loss: loss.backward())


def test_lora_with_zero_B_is_the_pretrained_model(setup):
    adapter, tok, split = setup
    lora = RegularLoRA(adapter, InnerLoopConfig(num_inner_steps=0), 1e-2)
    ep = _episode(tok, split)
    assert torch.equal(option_probs(adapter, lora.lora.params(), ep.query), option_probs(adapter, None, ep.query))
    # zero inner steps: adaptation returns the trained factors unchanged
    assert all(torch.equal(v, lora.lora.params()[k]) for k, v in lora.adapt(ep).items())


def test_reptile_update_is_theta_plus_eps_times_mean_shift(setup):
    adapter, tok, split = setup
    eps = 0.5
    reptile = Reptile(adapter, InnerLoopConfig(num_inner_steps=2, inner_lr=1e-2, optimizer="sgd"), eps)
    ep = _episode(tok, split)
    theta = {k: v.detach().clone() for k, v in reptile.lora.params().items()}
    # the hand computation: two SGD steps on the task loss (support ∪ query, example-weighted)
    phi = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    n = len(ep.support) + len(ep.query)
    for _ in range(2):
        loss = (option_nll(adapter, phi, ep.support) * len(ep.support) + option_nll(adapter, phi, ep.query) * len(ep.query)) / n
        grads = torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
        phi = {k: (v - 1e-2 * g if g is not None else v).detach().requires_grad_(True) for (k, v), g in zip(phi.items(), grads)}
    opt = reptile.make_optimizer()
    reptile.train_step([ep], lambda loss: loss.backward())
    opt.step()
    for k, v in reptile.lora.params().items():
        expected = theta[k] + eps * (phi[k].detach() - theta[k])
        assert torch.allclose(v, expected, atol=1e-6), k  # float32: same ops, reassociated sums


def test_structured_lora_with_zero_task_adapter_equals_the_global_lora(setup):
    adapter, tok, split = setup
    s = StructuredLoRA(adapter, InnerLoopConfig(num_inner_steps=0), 1e-2)
    with torch.no_grad():
        for p in s.shared.factors.values():
            p.normal_(0, 0.1)
    ep = _episode(tok, split)
    state = s.adapt(ep)  # zero steps: the task adapter is its initialization (B = 0)
    assert torch.allclose(s.predict(state, ep), option_probs(adapter, s.shared.params(), ep.query), atol=1e-6)


def test_structured_lora_trains_global_directly_and_task_init_first_order(setup):
    adapter, tok, split = setup
    s = StructuredLoRA(adapter, InnerLoopConfig(num_inner_steps=1, inner_lr=1e-2), 1e-2)
    ep = _episode(tok, split)
    s.train_step([ep], lambda loss: loss.backward())
    assert all(p.grad is not None for p in s.shared.factors.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.task_init.factors.values())


def test_in_context_prompts_leave_one_out_on_the_support_set(setup):
    _, _, split = setup
    support = with_demonstrations(split.support, split.support, leave_one_out=True)
    query = with_demonstrations(split.query, split.support, leave_one_out=False)
    for ex, orig in zip(support, split.support):
        assert ex.input.endswith(orig.input) and ex.input.count("task 0:") == len(split.support)  # 2 demos + itself
    assert all(q.input.count("task 0:") == len(split.support) + 1 for q in query)


def test_unknown_method_lists_the_choices(setup):
    adapter, _, _ = setup
    with pytest.raises(ValueError, match="unknown method 'maml'; choose one of"):
        build_method("maml", adapter, CONFIG, 1)
