"""Factor-backed Gaussians (lora/factored.py): the same losses and gradients as the dense path, and no
dense ``[out, in]`` buffer kept for backward per adapted module."""

import pyro
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI
from abmll_pyro.config import InnerLoopConfig
from abmll_pyro.infer.inner import pass_through
from abmll_pyro.infer.meta import Episode
from abmll_pyro.infer.objective import global_loss, task_kl_loss, task_loss
from abmll_pyro.lora.factored import FactorNormal, FactorValue, factor_backed
from abmll_pyro.lora.noise import LeanNormal, dense_saved_storages
from abmll_pyro.models import StudentTPrior, TaskData

NAME = "model.layers.1.self_attn.q_proj"


def _setup(std_map: str, backed: bool, theta_grad: bool):
    lm = tiny_lm("llama", dtype=torch.float64)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=(NAME,), std_map=std_map)).double()
    with torch.no_grad():  # off the initial values (B = 0, σ = init_std everywhere), the same in both setups
        g = torch.Generator().manual_seed(1)
        for p in adapter.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    svi = MetaSVI(adapter, MetaConfig(kl_beta=0.1), factor_backed=backed)
    theta = svi.theta() if theta_grad else {k: v.detach() for k, v in svi.theta().items()}
    start = svi.guide.task_guide.init_task_params(adapter, theta)
    params = {k: (v.detach() + 1e-2).requires_grad_() for k, v in start.items()}
    return lm, adapter, svi, theta, start, params


def _loss(where, svi, theta, start, params, backed):
    batch = TaskData(random_option_batch(4, generator=torch.Generator().manual_seed(2)))
    torch.manual_seed(3)  # the draw of ε
    with factor_backed(backed):
        if where == "global_loss":  # −γ log p(θ): θ's hyperprior densities
            return global_loss(svi.elbo, svi.model, svi.guide, theta, 0.1)
        if where == "outer_kl":  # the default outer step's KL (q fixed), then its query loss
            return task_kl_loss(svi.model, svi.guide, theta, {k: v.detach() for k, v in params.items()})
        if where == "outer_query":
            return task_loss(svi.elbo, svi.model, svi.guide, theta, [pass_through(params, start)], [batch], 0.0)
        return task_loss(svi.elbo, svi.model, svi.guide, theta, [params], [batch], 0.1)  # inner step / combined


@pytest.mark.parametrize("std_map", ["softplus", "paper", "log-rowcol", "log-full"])
@pytest.mark.parametrize("where", ["inner_step", "outer_kl", "global_loss"])
def test_row_blocks_give_the_dense_losses(where, std_map, monkeypatch):
    """A module larger than ROW_BLOCK_ELEMENTS: its KL and θ's hyperprior density are summed over
    row blocks (here 3 rows of the tiny q_proj's 32 at a time), every elementwise term made for one
    block only, and the loss and gradients equal the dense path's to round-off (float64; another
    summation order)."""
    import abmll_pyro.lora.factored as factored
    import abmll_pyro.lora.noise as noise

    out = {}
    kl, rows_of = noise.normal_kl, factored._rows_of
    for backed in (False, True):
        lm, adapter, svi, theta, start, params = _setup(std_map, backed, where != "inner_step")
        columns = adapter.shapes[NAME][1]
        monkeypatch.setattr(factored, "ROW_BLOCK_ELEMENTS", 3 * columns)
        shapes = []
        monkeypatch.setattr(factored, "normal_kl", lambda *a: shapes.append(tuple(a[0].shape)) or kl(*a))
        monkeypatch.setattr(factored, "_rows_of", lambda d, r0, r1: shapes.append((r1 - r0,)) or rows_of(d, r0, r1))
        loss = _loss(where, svi, theta, start, params, backed)
        leaves = list(params.values()) + [p for p in svi.theta().values()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out[backed] = loss.detach(), grads, shapes
    (old_loss, old_grads, _), (new_loss, new_grads, shapes) = out[False], out[True]
    rows = adapter.shapes[NAME][0]
    passes = 2 * (2 if where == "global_loss" else 1)  # forward + backward (θ's two sites: mean and precision)
    assert shapes and max(s[0] for s in shapes) == 3 and sum(s[0] for s in shapes) == passes * rows
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-13, atol=0.0)
    assert sum(g is not None for g in new_grads) > 0
    for a, b in zip(old_grads, new_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15 * float(a.abs().max()))


def test_the_logged_hyperprior_density_in_row_blocks(monkeypatch):
    """log_hyperprior (a logged value, no gradient) made 3 rows at a time equals it made whole."""
    import abmll_pyro.lora.factored as factored
    from abmll_pyro.infer.objective import log_hyperprior

    _, adapter, svi, theta, *_ = _setup("softplus", True, False)
    whole = log_hyperprior(svi.model, theta)
    monkeypatch.setattr(factored, "ROW_BLOCK_ELEMENTS", 3 * adapter.shapes[NAME][1])
    assert len(factored.row_blocks(*adapter.shapes[NAME])) > 1
    assert log_hyperprior(svi.model, theta) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("std_map", ["softplus", "paper", "log-rowcol"])
@pytest.mark.parametrize("where", ["inner_step", "outer_loss", "outer_kl", "outer_query", "global_loss"])
def test_same_loss_and_gradients_and_no_dense_buffer_kept(where, std_map):
    """float64: the loss is equal bit for bit (the same ops in the same order) and every gradient to
    1e-12 relative (the recomputed graph's gradients are accumulated in another order); the dense
    path keeps 1 to 7 dense buffers per module (tests/core/test_lean_noise.py; the global loss 7),
    this one none."""
    out = {}
    for backed in (False, True):
        lm, adapter, svi, theta, start, params = _setup(std_map, backed, where != "inner_step")
        loss = _loss(where, svi, theta, start, params, backed)
        frozen = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        count = len(dense_saved_storages(loss, adapter.shapes[NAME], frozen))
        leaves = list(params.values()) + [p for p in svi.theta().values()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        out[backed] = loss.detach(), grads, count
    (old_loss, old_grads, old_count), (new_loss, new_grads, new_count) = out[False], out[True]
    assert old_count >= 1 and new_count == 0
    assert torch.equal(old_loss, new_loss)
    assert sum(g is not None for g in new_grads) > 0
    for a, b in zip(old_grads, new_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15 * float(a.abs().max()))


def test_meta_steps_equal_the_dense_path():
    """Two first-order outer steps at K = 2 (float64, one seed): θ after them equal to 1e-8 of the outer
    learning rate (Adam divides every gradient element by its own size, so an element whose gradient is
    mostly cancellation moves by lr times a direction whose round-off is amplified by that
    cancellation: 4e-10·lr measured; an error in the recomputation would show at the scale of lr)."""
    results = []
    for backed in (False, True):
        pyro.set_rng_seed(0)
        lm = tiny_lm("llama", dtype=torch.float64)
        adapter = BayesLoRA(lm, AdapterConfig(rank=2), generator=torch.Generator().manual_seed(0)).double()
        svi = MetaSVI(adapter, MetaConfig(kl_beta=0.1, inner=InnerLoopConfig(num_inner_steps=2)), factor_backed=backed)
        assert svi.factor_backed is backed
        g = torch.Generator().manual_seed(5)
        episodes = [Episode(f"t{i}", TaskData(random_option_batch(4, generator=g)), TaskData(random_option_batch(4, generator=g)))
                    for i in range(2)]
        steps = [svi.step(episodes, num_tasks=4) for _ in range(2)]
        results.append(({k: v.detach().clone() for k, v in svi.theta().items()}, steps))
    (old, old_steps), (new, new_steps) = results
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=1e-8 * svi.config.outer_lr)
    for a, b in zip(old_steps, new_steps):
        assert b.loss == pytest.approx(a.loss, rel=1e-10)


def test_factor_normal_is_the_lean_normal_of_its_factors():
    _, adapter, _, _, _, params = _setup("softplus", True, False)
    with factor_backed():
        mean, std = adapter.moments(params, NAME)
    assert isinstance(mean, FactorValue) and mean.shape == adapter.shapes[NAME]
    q, dense = FactorNormal(mean, std), LeanNormal(adapter.mean(params, NAME), adapter.std(params, NAME))
    torch.manual_seed(7)
    lazy = q.rsample()
    after_lazy = torch.randn(3)
    torch.manual_seed(7)
    draw = dense.rsample()
    assert torch.equal(torch.randn(3), after_lazy)  # the global generator advanced as by the stock draw
    assert torch.equal(lazy.dense(), draw)
    assert torch.equal(q.log_prob(draw), dense.log_prob(draw)) and torch.equal(q.entropy(), dense.entropy())


def test_factor_backed_applies_to_the_first_order_mean_field_hierarchical_case_only():
    adapter = BayesLoRA(tiny_lm("llama"), AdapterConfig(rank=2))
    assert MetaSVI(adapter, MetaConfig()).factor_backed
    assert not MetaSVI(adapter, MetaConfig(), factor_backed=False).factor_backed
    second = MetaConfig(inner=InnerLoopConfig(order="second"))
    assert not MetaSVI(adapter, second).factor_backed
    assert not MetaSVI(adapter, MetaConfig(), prior=StudentTPrior()).factor_backed
    with pytest.raises(ValueError, match="factor_backed=True needs"):
        MetaSVI(adapter, second, factor_backed=True)


_TARGET = {"llama": "model.layers.1.self_attn.q_proj", "qwen2": "model.layers.1.self_attn.v_proj",
           "gpt2": "transformer.h.1.attn.c_attn"}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_the_merged_layer_backward_does_not_rerun_the_forward_product(kind):
    """A sampled factor-backed ΔW in a mergeable layer (Linear with and without bias, Conv1D): the
    output equals the dense ΔW's bit for bit, the gradients of x and of the factors equal plain
    autograd's to round-off, and backward forms one ``[tokens, ·]`` product, ∂x (``recomputed``
    reruns the merged matmul too: two)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from abmll_pyro.lora.factored import FactorGaussian, recomputed

    class Products(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and out.shape[0] == self.shape[0]:
                self.count += 1
            return out

    name = _TARGET[kind]
    lm = tiny_lm(kind, dtype=torch.float64)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=(name,))).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in adapter.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = adapter.global_params()
    layer = lm.get_submodule(name)
    out_features, in_features = adapter.shapes[name]
    gaussian = FactorGaussian(adapter, name, params)
    torch.manual_seed(4)
    value = FactorNormal(FactorValue(gaussian, "mean"), FactorValue(gaussian, "std")).rsample()
    x = torch.randn(2, 5, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weights = torch.randn(2, 5, out_features, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    leaves = [x, *gaussian.tensors()]
    runs = {}
    for how in ("merged", "dense", "recomputed"):
        if how == "recomputed":
            y = recomputed(lambda h, *f: layer._dense(h, value.dense_of(f)), x, *value.tensors())
        else:
            layer.delta = value if how == "merged" else value.dense()
            y = layer(x)
        layer.delta = None
        with Products((10, out_features)) as products:
            grads = torch.autograd.grad((y * weights).sum(), leaves)
        runs[how] = y.detach(), grads, products.count
    assert torch.equal(runs["merged"][0], runs["dense"][0])
    for a, b in zip(runs["dense"][1], runs["merged"][1]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15 * float(a.abs().max()))
    assert runs["merged"][2] == 1 and runs["recomputed"][2] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["normal", "gamma"])
def test_hyperprior_density_with_one_value_parameters_is_the_expanded_one(family, dtype):
    """θ's hyperprior (one Normal or Gamma expanded to [out, in]) scored with its parameters as 0-dim
    values (factored._compact): the log-density and its gradient in the value equal bit for bit the
    expanded distribution's (the same elementwise ops on the same numbers), densely and in row blocks."""
    import abmll_pyro.lora.factored as factored
    from abmll_pyro.lora.factored import FactorIndependent

    one = torch.tensor(2.0, dtype=dtype)
    base = (pyro.distributions.Normal(one * 0.1, one) if family == "normal"
            else pyro.distributions.Gamma(one, one * 0.005)).expand((7, 5))
    assert factored._compact(base) is not base and factored._compact(base).batch_shape == ()
    g = torch.Generator().manual_seed(0)
    value = (torch.rand(7, 5, generator=g, dtype=dtype) * 3 + 0.1).requires_grad_()
    old = pyro.distributions.Independent(base, 2).log_prob(value)
    new = FactorIndependent(base, 2).log_prob(value)
    assert torch.equal(new, old)
    assert torch.equal(torch.autograd.grad(new, value)[0], torch.autograd.grad(old, value)[0])
    rows = factored._rows_of(base, 2, 5)
    assert torch.equal(rows.log_prob(value[2:5]), base.log_prob(value)[2:5])
    varied = pyro.distributions.Normal(torch.zeros(7, 5, dtype=dtype), one)  # parameters not one value: kept
    assert factored._compact(varied) is varied and factored._rows_of(varied, 2, 5).loc.shape == (3, 5)
