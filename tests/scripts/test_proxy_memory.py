"""The Llama-3-8B memory projection from the 1- and 2-block proxies (the formula; the probes are slow)."""

import pytest

from abmll_pyro.presets import get_preset
from abmll_pyro.train.config import RunConfig
from scripts.cost.proxy_memory import LLAMA3_8B_WEIGHT_BYTES, PAPER_RATIO, project_memory, proxy_config


def test_projection_is_weights_plus_fixed_plus_32_blocks():
    r = project_memory(1000.0, 1600.0)  # MiB above the model with 1 and 2 blocks
    assert r["per_block_mb"] == 600.0 and r["fixed_mb"] == 400.0 and r["linear_check"]
    assert r["projected_total_gb"] == pytest.approx((LLAMA3_8B_WEIGHT_BYTES + (400 + 32 * 600) * 2**20) / 1e9)
    assert not project_memory(1000.0, 2100.0)["linear_check"]  # the second block cost more than the first + fixed
    assert not project_memory(1000.0, 900.0)["linear_check"]
    assert PAPER_RATIO == pytest.approx(1.0756, abs=1e-4) and LLAMA3_8B_WEIGHT_BYTES / 1e9 == pytest.approx(16.06, abs=0.01)


def test_proxy_config_keeps_the_paper_settings(tmp_path):
    paper = RunConfig.from_dict(get_preset("paper").config)
    c = proxy_config(paper, "abmll", 2, tmp_path)
    assert (c.model, c.tasks, c.data_dir, c.last_layers, c.trunk_cache) == ("llama3-8b-proxy-2l", "cls-45", str(tmp_path), None, False)
    for key in ("rank", "lora_alpha", "num_inner_steps", "tasks_per_step", "shots", "query_size", "dtype", "mixed_precision"):
        assert getattr(c, key) == getattr(paper, key), key
    assert (c.rank, c.num_inner_steps, c.tasks_per_step, c.shots, c.dtype) == (8, 5, 2, 16, "bfloat16")


_FRAGMENT = """
import torch
from abmll_pyro.train.cost import rss_mb
x = torch.ones(4 * 2**20)  # 16 MiB, mmapped; glibc's default raises its mmap threshold to this size on free
del x
before = rss_mb()
kept = [torch.ones(2 * 2**20) for _ in range(20)]  # 20 × 8 MiB: from the heap once the threshold has risen
last = kept[-1]
del kept  # all but the last freed; by default the heap below it stays resident
print(rss_mb() - before)
"""


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_the_fixed_allocator_returns_freed_tensors(mode):
    """``{"malloc": "fixed"}``'s settings are the ones glibc reads: freed tensors leave the resident set
    (the probe's peak then counts live tensors); glibc's default keeps them resident."""
    import os
    import subprocess
    import sys

    from scripts.cost.probe import MALLOC_MODES

    env = {**os.environ, **MALLOC_MODES[mode]}
    for name in MALLOC_MODES["fixed"]:
        if mode == "default":
            env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    resident = float(done.stdout.strip())
    if mode == "fixed":
        assert resident < 40, resident  # the last 8 MiB block (and small change)
    else:
        assert resident > 100, resident  # the 19 freed blocks too


def test_an_unknown_malloc_mode_is_refused(tmp_path):
    from scripts.cost.probe import run_probe

    paper = RunConfig.from_dict(get_preset("paper").config)
    with pytest.raises(ValueError, match="malloc must be one of"):
        run_probe(proxy_config(paper, "abmll", 1, tmp_path), 0, {"malloc": "jemalloc"})
