"""LoRA layers, lean noise, every method's training step, adaptation and prediction on ``$ABMLL_TEST_DEVICE``.

Marked ``device``: ``scripts/device_check/run.py --device cuda`` runs this file on a GPU (the ``device``
fixture of tests/conftest.py); here it runs on the CPU. Each test is a device-independent identity,
checked on that device, with every draw audited against its tensors' device (tests/_support/devices.py).
"""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from _support.devices import GeneratorAudit

from abmll_pyro.config import AdapterConfig
from abmll_pyro.data.tasks import Example, TaskSplit
from abmll_pyro.lms import tiny_model
from abmll_pyro.lora import BayesLoRA
from abmll_pyro.lora.noise import LeanNormal
from abmll_pyro.methods import METHODS, build_method
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder

pytestmark = pytest.mark.device

EXAMPLES = [Example(f"Is {w} an animal?", ("yes", "no"), g) for w, g in
            [("cat", 0), ("rock", 1), ("dog", 0), ("cup", 1), ("cow", 0), ("pen", 1), ("owl", 0), ("car", 1)]]
SETTINGS = dict(model="tiny-llama", rank=2, lora_alpha=4.0, num_inner_steps=1, inner_lr=1e-2, num_samples=2,
                kl_beta=1e-3, ensemble_size=2, laplace_logit_samples=8)


def _built(device: torch.device, method: str, dtype: torch.dtype = torch.float32):
    lm, tok = tiny_model("llama", seed=0)
    lm = lm.to(device=device, dtype=dtype)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0), generator=torch.Generator().manual_seed(0))
    m = build_method(method, adapter, RunConfig(**SETTINGS, method=method), num_train_tasks=2)
    episode = EpisodeEncoder(tok, 192, in_context=m.in_context, device=device)(
        TaskSplit("animals", tuple(EXAMPLES[:4]), tuple(EXAMPLES[4:])))
    return lm, adapter, m, episode


def test_lean_noise_draws_and_gradients_equal_the_stock_normal_on_the_device(device):
    """LeanNormal keeps no ε for backward but draws exactly what ``Normal.rsample`` draws from the same
    generator state, so sample and gradients agree bit for bit (the replay regenerates the same ε)."""
    out = []
    for cls in (LeanNormal, dist.Normal):
        loc = torch.linspace(-1, 1, 12, device=device).view(3, 4).requires_grad_()
        scale = torch.linspace(0.1, 2, 12, device=device).view(3, 4).requires_grad_()
        torch.manual_seed(7)
        with GeneratorAudit() as audit:
            x = cls(loc, scale).rsample()
            (x.square() * torch.arange(4, device=device)).sum().backward()
        assert not audit.mismatches(), audit.mismatches()
        out.append((x.detach(), loc.grad, scale.grad))
    for lean, stock in zip(*out):
        assert lean.device.type == device.type and torch.equal(lean, stock)


def test_zero_B_gives_the_base_models_logits_on_the_device(device):
    lm, adapter, _, episode = _built(device, "lora")
    ids = episode.query.input_ids
    with torch.no_grad(), adapter.off():
        base = lm(ids).logits
    with torch.no_grad(), adapter.use(adapter.mean_deltas(adapter.global_params())):  # B_μ = 0 at the start
        adapted = lm(ids).logits
    assert base.device.type == device.type and torch.equal(base, adapted)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_adapts_and_predicts_on_the_device(device, method):
    """One training step (trainable methods), then adapt and predict: probabilities on the device,
    finite, summing to 1; trained tensors and their gradients stay on the device; every draw on it."""
    _, _, m, episode = _built(device, method)
    optimizer = m.make_optimizer()
    with GeneratorAudit() as audit:
        if m.trainable:
            parts = m.train_step([episode], lambda loss: loss.backward())
            assert parts and all(torch.isfinite(torch.tensor(v)) for v in parts.values()), parts
            grads = [p.grad for p in m.parameters() if p.grad is not None]
            assert grads and {g.device.type for g in grads} == {device.type}
            optimizer.step()
        with torch.enable_grad() if m.trainable or method == "bayes-lora" else torch.no_grad():
            state = m.adapt(episode)
        with torch.no_grad():
            probs = m.predict(state, episode)
    assert not audit.mismatches(), audit.mismatches()
    assert probs.device.type == device.type and probs.shape[0] == len(EXAMPLES[4:])
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1).double(), torch.ones(4, dtype=torch.float64),
                                                          atol=1e-5)  # float32 softmax: sums within a few ulps
    assert {p.device.type for p in m.parameters()} <= {device.type}


def test_bf16_weights_keep_the_trained_factors_and_kl_in_float32_on_the_device(device):
    """ABMLL on a bfloat16 LM: the loss is finite and the factors (and their gradients) stay float32."""
    _, _, m, episode = _built(device, "abmll", dtype=torch.bfloat16)
    parts = m.train_step([episode], lambda loss: loss.backward())
    assert all(torch.isfinite(torch.tensor(v)) for v in parts.values()), parts
    assert {(p.dtype, p.grad.dtype) for p in m.parameters() if p.grad is not None} == {(torch.float32, torch.float32)}


def test_one_seed_one_training_step_on_the_device(device):
    """The same seed gives the same step on the device: ΔW noise, Pyro's draws and the replay are all
    seeded by torch.manual_seed (CPU and every CUDA generator)."""
    losses = []
    for _ in range(2):
        _, _, m, episode = _built(device, "abmll")
        torch.manual_seed(3)
        losses.append(m.train_step([episode], lambda loss: loss.backward()))
    assert losses[0] == losses[1]
