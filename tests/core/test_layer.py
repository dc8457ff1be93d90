"""The Bayesian LoRA layer: identities with the base model, forward modes, attach/detach, errors."""

import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm
from transformers.pytorch_utils import Conv1D

from abmll_pyro import AdapterConfig, BayesLoRA
from abmll_pyro.lora import AbsStd, LowRankDelta, SoftplusStd

TARGETS = {"llama": None, "qwen2": None, "gpt2": None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_b_zero_mean_mode_equals_base_logits_exactly(kind):
    lm = tiny_lm(kind)
    ids = torch.randint(0, 48, (2, 7))
    with torch.no_grad():
        base = lm(input_ids=ids).logits
        adapter = BayesLoRA(lm, AdapterConfig(rank=4))
        with adapter.use(adapter.mean_deltas(adapter.global_params())):
            adapted = lm(input_ids=ids).logits
    assert torch.equal(base, adapted)  # exact: B = 0 adds exact zeros


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_detach_restores_module_tree(kind):
    lm = tiny_lm(kind)
    before = {n: m for n, m in lm.named_modules()}
    keys = list(lm.state_dict())
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    assert any("BayesLoRALayer" in type(m).__name__ for m in lm.modules())
    adapter.detach()
    after = {n: m for n, m in lm.named_modules()}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert list(lm.state_dict()) == keys


def test_gpt2_conv1d_sampled_mode_matches_manual():
    lm = tiny_lm("gpt2")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    name = adapter.module_names[0]
    layer = adapter.layers[name]
    assert isinstance(layer.base, Conv1D)
    out, inp = adapter.shapes[name]
    assert (out, inp) == (96, 32)  # c_attn: 32 -> 3·32
    delta = torch.randn(out, inp)
    x = torch.randn(3, inp)
    with adapter.use({name: delta}):
        y = layer(x)
    torch.testing.assert_close(y, layer.base(x) + x @ delta.T)


def test_modes_off_mean_sample():
    lm = tiny_lm("llama")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    theta = adapter.global_params()
    name = adapter.module_names[0]
    layer = adapter.layers[name]
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        low = LowRankDelta(theta[adapter.key(name, "mu_A")], theta[adapter.key(name, "mu_B")], adapter.config.scaling)
        with adapter.use({name: low}):
            y_mean = layer(x)
        with adapter.use({name: adapter.mean(theta, name)}):
            y_dense = layer(x)
        with adapter.off():
            y_off = layer(x)
        torch.testing.assert_close(y_mean, y_dense, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_off, layer.base(x))
        draw = adapter.sample_deltas(theta, torch.Generator().manual_seed(1))[name]
        again = adapter.sample_deltas(theta, torch.Generator().manual_seed(1))[name]
        assert torch.equal(draw, again) and not torch.equal(draw, adapter.mean(theta, name))
    assert layer.delta is None  # the context restores the previous state


def test_std_maps_start_and_floor():
    raw = torch.zeros(3, 4)
    torch.testing.assert_close(SoftplusStd(init_std=1e-3)(raw), torch.full((3, 4), 1e-3))
    assert torch.all(SoftplusStd(init_std=1e-3, floor=1e-6)(torch.full((2,), -1e4)) >= 1e-6)
    assert torch.equal(AbsStd(floor=0.5)(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([2.5, 0.5, 3.5]))
    lm = tiny_lm("llama")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, init_std=0.02))
    name = adapter.module_names[0]
    torch.testing.assert_close(adapter.std(adapter.global_params(), name), torch.full(adapter.shapes[name], 0.02))


def test_base_frozen_and_only_factors_trainable():
    lm = tiny_lm("llama")
    adapter = BayesLoRA(lm, AdapterConfig(rank=3))
    assert not any(p.requires_grad for p in lm.parameters() if not any(p is q for q in adapter.parameters()))
    # 4 modules (q, v in 2 layers), 2 pairs each: r·(in + out) per pair
    expected = sum(2 * 3 * (o + i) for o, i in adapter.shapes.values())
    assert adapter.num_trainable() == expected
    assert set(adapter.state_dict()) == {f"factors.{k}" for k in adapter.global_params()}


def test_unknown_target_lists_linear_modules():
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match=r"\['nope'\].*q_proj"):
        BayesLoRA(lm, AdapterConfig(target_modules=("q_proj", "nope")))
    with pytest.raises(ValueError, match="c_attn"):
        BayesLoRA(tiny_lm("gpt2"), AdapterConfig(target_modules=("q_proj",)))


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_below_one_is_an_error(rank):
    with pytest.raises(ValueError, match=f"rank must be an integer >= 1, got {rank}"):
        AdapterConfig(rank=rank)


def test_attaching_twice_is_an_error():
    lm = tiny_lm("llama")
    BayesLoRA(lm)
    with pytest.raises(ValueError, match="already carries"):
        BayesLoRA(lm)


def test_option_scoring_through_adapter_has_gradients():
    lm = tiny_lm("qwen2")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    from abmll_pyro.data.scoring import option_scores

    batch = random_option_batch(3)
    theta = adapter.global_params()
    with adapter.use(adapter.mean_deltas(theta)):
        loss = -option_scores(lm, batch).log_softmax(-1).gather(-1, batch.gold[:, None]).sum()
    loss.backward()
    name = adapter.module_names[0]
    assert theta[adapter.key(name, "mu_B")].grad.abs().sum() > 0


def _two_matmuls(layer, x, delta):
    """The unmerged reference: base(x) + x ΔWᵀ."""
    return layer.base(x) + x @ delta.to(x.dtype).T


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dense_delta_merged_weight_equals_two_matmuls_values_and_gradients(kind):
    lm = tiny_lm(kind).double()
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    name = adapter.module_names[0]
    layer = adapter.layers[name]
    assert layer._mergeable(torch.zeros(1, layer.in_features, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, layer.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(adapter.shapes[name], generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, layer.out_features, generator=g, dtype=torch.float64)
    with adapter.use({name: delta}):
        merged = layer(x)
    reference = _two_matmuls(layer, x, delta)
    torch.testing.assert_close(merged, reference, rtol=1e-12, atol=1e-12)
    g_merged = torch.autograd.grad((weight * merged).sum(), [x, delta])
    g_reference = torch.autograd.grad((weight * reference).sum(), [x, delta])
    for a, b in zip(g_merged, g_reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dense_delta_keeps_two_matmuls_in_bf16_and_behind_hooks():
    lm = tiny_lm("llama")
    adapter = BayesLoRA(lm, AdapterConfig(rank=2))
    name = adapter.module_names[0]
    layer = adapter.layers[name]
    delta = 1e-3 * torch.randn(adapter.shapes[name])
    x = torch.randn(3, layer.in_features)
    assert layer._mergeable(x) and not layer._mergeable(x.bfloat16())
    layer.base.bfloat16()
    with torch.no_grad(), adapter.use({name: delta}):  # bf16: ΔW is not rounded into W0
        assert torch.equal(layer(x.bfloat16()), _two_matmuls(layer, x.bfloat16(), delta))
    layer.base.float()
    seen = []
    handle = layer.base.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad(), adapter.use({name: delta}):
        assert not layer._mergeable(x)
        assert torch.equal(layer(x), _two_matmuls(layer, x, delta))
    handle.remove()
    assert len(seen) == 2  # the hook ran inside the layer and in the reference
