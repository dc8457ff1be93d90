"""θ's prior moments made once per first-order inner loop (lora/prior_cache.py): the same refined
parameters and outer gradients bit for bit, and no cache over the bound or in second order."""

from types import SimpleNamespace

import pyro
import pytest
import torch
from _support.helpers import random_option_batch, tiny_lm

import abmll_pyro.infer.meta as meta
import abmll_pyro.lora.prior_cache as prior_cache
from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI
from abmll_pyro.config import InnerLoopConfig
from abmll_pyro.infer.meta import Episode
from abmll_pyro.models import TaskData

TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")


def _svi(std_map: str = "softplus", theta_cache=None, optimizer: str = "adam", order: str = "first") -> MetaSVI:
    lm = tiny_lm("llama", dtype=torch.float64)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=TARGETS, std_map=std_map)).double()
    with torch.no_grad():  # off the initial values (B = 0, σ = init_std everywhere): μ_θ ≠ 0, σ_θ not constant
        g = torch.Generator().manual_seed(1)
        for p in adapter.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    inner = InnerLoopConfig(num_inner_steps=3, inner_lr=1e-2, optimizer=optimizer, order=order)
    return MetaSVI(adapter, MetaConfig(kl_beta=0.5, inner=inner), theta_cache=theta_cache)


def _caches(monkeypatch) -> list:
    """The PriorCache objects made from now on."""
    made, init = [], prior_cache.PriorCache.__init__
    monkeypatch.setattr(prior_cache.PriorCache, "__init__", lambda self, theta: made.append(self) or init(self, theta))
    return made


def _refined(svi: MetaSVI) -> dict:
    support = TaskData(random_option_batch(4, generator=torch.Generator().manual_seed(2)))
    theta = svi.theta()
    start = svi.guide.task_guide.init_task_params(svi.adapter, theta, support)
    torch.manual_seed(3)  # the inner steps' draws of ε
    return {k: v.detach() for k, v in svi.refine(theta, start, support).items()}


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("optimizer", ["adam", "kl-precond"])
@pytest.mark.parametrize("std_map", ["softplus", "paper", "log-rowcol"])
def test_cached_inner_loop_refines_to_the_same_parameters(std_map, optimizer, blocks, monkeypatch):
    """float64, K = 3: every refined factor equal bit for bit (the cached p moments are the same ops
    on the same rows, and p's factors need no gradient either way); ``blocks=3``: the KL over row
    blocks of 3 rows (ROW_BLOCK_ELEMENTS cut), each block's moments cached."""
    import abmll_pyro.lora.factored as factored

    if blocks > 1:
        monkeypatch.setattr(factored, "ROW_BLOCK_ELEMENTS", 3 * 32)  # the tiny q_proj's 32 columns
    made = _caches(monkeypatch)
    uncached = _refined(_svi(std_map, theta_cache=False, optimizer=optimizer))
    assert made == []
    cached = _refined(_svi(std_map, theta_cache=None, optimizer=optimizer))
    assert len(made) == 1 and len(made[0].store) == len(TARGETS)  # one entry per module, made once in K steps
    if blocks > 1:
        assert all(len(entry) > 1 for entry in made[0].store.values())
    assert cached.keys() == uncached.keys()
    for k in cached:
        assert torch.equal(cached[k], uncached[k]), k


def test_cached_outer_step_has_the_same_loss_and_gradients(monkeypatch):
    """One first-order outer step (two episodes, K = 3): the loss and θ's gradients equal bit for bit."""
    made = _caches(monkeypatch)
    out = []
    for theta_cache in (False, True):
        pyro.set_rng_seed(0)
        svi = _svi(theta_cache=theta_cache)
        g = torch.Generator().manual_seed(5)
        episodes = [Episode(f"t{i}", TaskData(random_option_batch(4, generator=g)), TaskData(random_option_batch(4, generator=g)))
                    for i in range(2)]
        result = svi.loss_and_grads(episodes, num_tasks=4)
        out.append((result, {k: v.grad.clone() for k, v in svi.theta().items() if v.grad is not None}))
    assert len(made) == 2  # one per episode's inner loop, none in the outer losses (θ needs its gradient there)
    (old, old_grads), (new, new_grads) = out
    assert new.loss == old.loss and new.task_kl == old.task_kl and new.nll == old.nll
    assert old_grads and new_grads.keys() == old_grads.keys()
    for k in old_grads:
        assert torch.equal(new_grads[k], old_grads[k]), k


def test_no_cache_over_the_bound_or_in_second_order(monkeypatch):
    made = _caches(monkeypatch)
    svi = _svi()
    need = prior_cache.prior_cache_bytes(svi.adapter, svi.theta())
    assert need == 2 * 8 * (32 * 32 + 16 * 32)  # μ_θ and σ_θ, float64, of q_proj [32, 32] and v_proj [16, 32]
    monkeypatch.setattr(meta, "PRIOR_CACHE_BYTES", need - 1)
    _refined(svi)
    assert made == []
    _refined(_svi(theta_cache=True))  # True: whatever the size
    assert len(made) == 1
    second = _svi(order="second")
    assert not second.factor_backed
    _refined(second)
    assert len(made) == 1
    with pytest.raises(ValueError, match="theta_cache=True needs"):
        _svi(order="second", theta_cache=True)


def test_the_bound_caches_smollm2_all_blocks_not_llama3_8b():
    """The automatic bound against the two q/v configurations of the docstrings (float32)."""

    def adapter(blocks: int, q: tuple, v: tuple):
        shapes = {f"{i}.{m}": s for i in range(blocks) for m, s in (("q", q), ("v", v))}
        return SimpleNamespace(shapes=shapes, key=lambda m, kind: f"{m}:{kind}"), \
            {f"{m}:mu_A": torch.zeros(2, 1) for m in shapes}

    smollm2 = prior_cache.prior_cache_bytes(*adapter(30, (576, 576), (192, 576)))
    llama = prior_cache.prior_cache_bytes(*adapter(32, (4096, 4096), (1024, 4096)))
    assert smollm2 == 106_168_320 <= prior_cache.PRIOR_CACHE_BYTES < llama == 5_368_709_120
