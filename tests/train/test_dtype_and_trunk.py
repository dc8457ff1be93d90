"""``dtype`` (the LM's weights) and ``trunk_cache`` as run settings: a bf16 smoke training on CPU with
float32 adapter factors and KL, and the cache switched on and off by the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from abmll_pyro.data.trunk import trunk_cache_of
from abmll_pyro.infer.objective import task_kl
from abmll_pyro.train.config import ConfigError, RunConfig
from abmll_pyro.train.run import train_run
from abmll_pyro.train.setup import build

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = dict(model="tiny-llama", tasks=str(HANDWRITTEN), rank=2, shots=2, query_size=2, eval_query_size=3,
            num_threads=1, max_length=96, num_samples=2, last_layers=1)


def test_bfloat16_smoke_training_keeps_kl_terms_in_float32(tmp_path):
    config = RunConfig(method="abmll", steps=2, num_inner_steps=1, dtype="bfloat16", kl_beta=1e-3, **TINY)
    built, _ = build(config)
    assert next(built.lm.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in built.adapter.parameters())
    svi = built.method.svi
    theta = svi.theta()
    assert svi.adapter.mean(theta, svi.adapter.module_names[0]).dtype == torch.float32
    assert math.isfinite(task_kl(svi.model, svi.guide, theta, {k: v * 1.0 for k, v in theta.items()}))
    built.adapter.detach()
    result = train_run(config, tmp_path, progress=False)
    assert all(math.isfinite(result["macro"][k]) for k in ("accuracy", "nll"))


def test_trunk_cache_follows_the_config():
    assert trunk_cache_of(build(RunConfig(method="abmll", steps=1, **TINY))[0].lm) is not None
    assert trunk_cache_of(build(RunConfig(method="abmll", steps=1, trunk_cache=False, **TINY))[0].lm) is None


@pytest.mark.parametrize("key,value", [("dtype", "float8"), ("trunk_cache", "yes")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig(**{key: value})
