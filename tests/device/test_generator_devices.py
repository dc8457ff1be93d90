"""Every random draw comes from a generator on its tensors' device: checked on fake cuda tensors.

A generator hard-coded to the CPU (``torch.Generator()``, ``torch.default_generator``) beside cuda
parameters raises only on a GPU; tests/_support/devices.py makes the parameters *claim* ``cuda:0``
on this CPU-only build, so those tests fail here too (the mutation test below shows one does).
Host-side draws (the episode sampler's task and example picks, the adapter's initial factors, the
Llama-3-8B proxy's weights) are deliberately CPU generators on CPU tensors: the same values on every
device. The whole training step on a real device is tests/device/test_on_device.py.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from _support.devices import ClaimingGenerator, GeneratorAudit, fake_cuda

from abmll_pyro.config import AdapterConfig
from abmll_pyro.lora import BayesLoRA
from abmll_pyro.lora.layer import LowRankDelta
from abmll_pyro.lora.noise import LeanNormal, NormalSample
from abmll_pyro.lms import tiny_model

CUDA = torch.device("cuda", 0)


def _on_cuda(draws) -> list:
    return [d for d in draws if CUDA in d.tensors]


def test_the_audit_reports_a_cpu_generator_beside_cuda_tensors(monkeypatch):
    """The oracle of this file can fail: a hard-coded CPU generator drawing into a cuda tensor."""
    with fake_cuda(monkeypatch) as (fake, audit):
        fake.tensor(torch.empty(4)).normal_(generator=torch.default_generator)
        fake.tensor(torch.empty(4)).normal_(generator=torch.Generator())
        fake.tensor(torch.empty(4)).normal_(generator=torch.Generator(device="cuda"))
    assert [(d.generator.type, d.mismatch) for d in audit.draws] == [("cpu", True), ("cpu", True), ("cuda", False)]


def test_noise_draw_and_replay_use_the_tensors_device(monkeypatch):
    """NormalSample draws ε from the cuda generator and replays it in backward on a cuda generator
    (forward/backward called directly: autograd cannot run on fake cuda leaves)."""
    with fake_cuda(monkeypatch) as (fake, audit):
        loc, scale = fake.tensor(torch.zeros(3, 5)), fake.tensor(torch.ones(3, 5))
        ctx = types.SimpleNamespace(needs_input_grad=(True, True, False))
        out = NormalSample.forward(ctx, loc, scale)
        grad_loc, grad_scale, _ = NormalSample.backward(ctx, fake.tensor(torch.ones(3, 5)))
    assert out.device == grad_loc.device == grad_scale.device == CUDA
    assert [d.op for d in audit.draws] == ["normal_", "normal_"]  # forward draw, backward replay
    assert not audit.mismatches(), audit.mismatches()


def test_a_cpu_replay_generator_would_fail_this_check(monkeypatch):
    """Mutation: NormalSample's replay generator hard-coded to the CPU is reported."""
    with fake_cuda(monkeypatch) as (fake, audit):
        monkeypatch.setattr(torch, "Generator", lambda device="cpu": ClaimingGenerator("cpu"))
        ctx = types.SimpleNamespace(needs_input_grad=(False, True, False))
        NormalSample.forward(ctx, fake.tensor(torch.zeros(2, 2)), fake.tensor(torch.ones(2, 2)))
        NormalSample.backward(ctx, fake.tensor(torch.ones(2, 2)))
    assert [d.mismatch for d in audit.draws] == [False, True]


def test_sampled_weights_and_dropout_stay_on_the_device(monkeypatch):
    """The adapter's posterior draws (predictive sampling's ΔW), LeanNormal.rsample and the LoRA path's
    dropout on a fake-cuda tiny Llama: every draw on cuda, and no op mixes in a CPU tensor
    (FakeTensorMode raises on one)."""
    lm, _ = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0), generator=torch.Generator().manual_seed(0))
    with fake_cuda(monkeypatch) as (fake, audit):
        fake.module(lm)
        fake.module(adapter)
        params = adapter.global_params()
        with torch.no_grad():
            deltas = adapter.sample_deltas(params)
            name = adapter.module_names[0]
            lean = LeanNormal(adapter.mean(params, name), adapter.std(params, name), validate_args=False).rsample()
            layer = adapter.layers[name]
            mean = adapter.mean_deltas(params)[name]
            with adapter.use({name: LowRankDelta(mean.A, mean.B, mean.scaling, dropout=0.5)}):
                y = layer(fake.tensor(torch.zeros(2, 4, layer.in_features)))
    assert {d.device for d in deltas.values()} == {CUDA} and lean.device == CUDA and y.device == CUDA
    assert len(_on_cuda(audit.draws)) == len(deltas) + 1
    assert not audit.mismatches(), audit.mismatches()


def test_episode_sampling_is_host_side_and_batches_go_to_the_device():
    """The sampler's generators pick task and example indices (no tensors come out of it); the encoder
    puts every batch tensor on the device it is given (``meta`` here: any device but the CPU)."""
    from abmll_pyro.data.tasks import Example, Task
    from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler

    tasks = [Task(f"t{i}", [Example(f"x{i} {j}?", ("yes", "no"), j % 2) for j in range(6)]) for i in range(3)]
    sampler = EpisodeSampler(tasks, shots=2, query_size=2, tasks_per_step=2, seed=0)
    with GeneratorAudit() as audit:
        splits = sampler.batch(0)
    assert audit.draws and {d.generator.type for d in audit.draws} == {"cpu"} and not audit.mismatches()
    _, tok = tiny_model("llama", seed=0)
    episode = EpisodeEncoder(tok, 64, device="meta")(splits[0])
    tensors = [getattr(b, f.name) for b in (episode.support, episode.query) for f in dataclasses.fields(b)
               if torch.is_tensor(getattr(b, f.name))]
    assert tensors and {t.device.type for t in tensors} == {"meta"}
