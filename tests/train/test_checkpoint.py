"""Checkpoints: atomic replacement, pruning of old ones, and loading without unpickling objects."""

from __future__ import annotations

import json
import random

import torch

from abmll_pyro.train.checkpoint import load_latest, save_checkpoint
from _support.helpers import stepped_adam


def test_round_trip_restores_tensors_optimizer_and_rng(tmp_path):
    p, opt = stepped_adam()
    random.seed(3)
    torch.manual_seed(5)
    sampler = torch.Generator().manual_seed(7)
    save_checkpoint(tmp_path, 4, {"w": p.detach()}, opt, sampler.get_state(), {"seed": 0})
    expected_torch, expected_py = torch.rand(2), random.random()
    torch.manual_seed(99)
    random.seed(99)
    ckpt = load_latest(tmp_path)
    assert ckpt.step == 4 and torch.equal(ckpt.tensors["w"], p.detach())
    assert torch.equal(ckpt.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    torch.set_rng_state(ckpt.torch_rng)
    random.setstate(ckpt.python_rng)
    assert torch.equal(torch.rand(2), expected_torch) and random.random() == expected_py
    assert torch.equal(ckpt.sampler_rng, sampler.get_state())


def test_latest_points_at_the_newest_and_old_ones_are_pruned(tmp_path):
    p, opt = stepped_adam()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"w": p.detach() * step}, opt, None, {}, keep=2)
    names = sorted(x.name for x in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "step-000004", "step-000006"]  # no temporary folders left behind
    assert json.loads((tmp_path / "checkpoints/latest.json").read_text())["step"] == 6
    assert torch.equal(load_latest(tmp_path).tensors["w"], p.detach() * 6)


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    p, opt = stepped_adam()
    save_checkpoint(tmp_path, 2, {"w": p.detach()}, opt, None, {})
    (tmp_path / "checkpoints" / ".step-000004.tmp-123").mkdir()  # what a kill mid-write leaves
    assert load_latest(tmp_path).step == 2
    assert load_latest(tmp_path / "nothing") is None
