"""results.json's cost block and the benchmark's cost table (abmll_pyro/train/cost.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from abmll_pyro.train.cost import PeakMemory, cost_block, cost_table, state_values


@dataclass(frozen=True)
class _Fit:
    params: dict
    matrix: torch.Tensor
    scalar: float


def test_state_values_counts_every_tensor_element():
    params = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert state_values(params) == 10
    assert state_values([params, params]) == 20  # an ensemble's members
    assert state_values((params, 1.5)) == 10  # lora-ts: factors and a temperature
    assert state_values(_Fit(params, torch.zeros(3, 3), 0.5)) == 19
    assert state_values(None) == 0


def test_cost_block_and_table():
    block = cost_block([1.0, 3.0], [0.5, 1.5], num_queries=8, peak_mb=100.0, trained_values=448, adapted_values=[10, 30])
    assert block == {"adapt_s_per_task": 2.0, "predict_s_per_query": 0.25, "eval_peak_memory_mb": 100.0,
                     "trained_values": 448, "adapted_values_per_task": 20.0}
    other = dict(block, adapt_s_per_task=4.0)
    table = cost_table([{"method": "lora", "cost": block}, {"method": "lora", "cost": other},
                        {"method": "pretrained"}])  # a result without cost (an older run) gets no row
    assert "| lora | 3.000 | 250.00 | 100 | 448 | 20 |" in table and "pretrained" not in table


def test_peak_memory_is_at_least_the_allocation_after_start():
    """In a fresh process (in a long-lived one, freed heap pages still resident absorb a new allocation
    without raising the resident-set peak): 64 MiB touched after start() raise the peak by ~64 MiB."""
    import subprocess
    import sys

    code = ("import torch\nfrom abmll_pyro.train.cost import PeakMemory\n"
            "m = PeakMemory(torch.device('cpu')); m.start(); before = m.peak_mb()\n"
            "block = torch.ones(64 * 2**20 // 4)\nprint(before, m.peak_mb())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(float, done.stdout.split())
    assert after >= before + 60 or before != before  # NaN where /proc is missing
