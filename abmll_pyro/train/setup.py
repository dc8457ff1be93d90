"""Build what a run needs from a :class:`RunConfig`: tasks, the LM with its adapter, and the method."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any

import pyro
import torch
from torch import nn

from ..data.sources import TaskSet, load_tasks
from ..lms import load_lm
from ..lora.adapter import DEFAULT_TARGETS, FALLBACK_TARGETS, BayesLoRA
from ..lora.layer import is_linear
from ..methods import Method, build_method
from .config import RunConfig

__all__ = ["Built", "seed_everything", "load_taskset", "build", "last_layer_targets"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def load_taskset(config: RunConfig) -> TaskSet:
    """The config's task source, with train/test capped to the first ``max_*_tasks`` tasks."""
    tasks = load_tasks(config.tasks, data_dir=config.data_dir, max_examples=config.max_examples)
    train = tasks.train[: config.max_train_tasks] if config.max_train_tasks else tasks.train
    test = tasks.test[: config.max_test_tasks] if config.max_test_tasks else tasks.test
    return replace(tasks, train=train, test=test)


_LAYER = re.compile(r"\.(\d+)\.")


def last_layer_targets(lm: nn.Module, targets: tuple[str, ...] | None, last: int) -> tuple[str, ...]:
    """Full names of the target linear modules in the ``last`` highest-numbered blocks. Adapting only the
    top blocks keeps backward passes short (gradients stop at the lowest adapted block)."""
    model_type = getattr(getattr(lm, "config", None), "model_type", "")
    suffixes = targets or DEFAULT_TARGETS.get(model_type, FALLBACK_TARGETS)
    named = [(n, int(_LAYER.search(n).group(1))) for n, m in lm.named_modules()
             if is_linear(m) and n.split(".")[-1] in suffixes and _LAYER.search(n)]
    if not named:
        raise ValueError(f"no numbered block holds a linear module named {list(suffixes)}")
    top = max(i for _, i in named)
    return tuple(n for n, i in named if i > top - last)


@dataclass
class Built:
    lm: nn.Module
    tokenizer: Any
    adapter: BayesLoRA
    method: Method


def build(config: RunConfig, num_train_tasks: int, device: torch.device | str = "cpu") -> Built:
    """Seeded: the LM (random tiny models use ``seed``), the adapter's initial factors and the method."""
    seed_everything(config.seed)
    lm, tokenizer = load_lm(config.model, seed=config.seed)
    lm = lm.to(device)
    targets = config.target_modules
    if config.last_layers is not None:
        targets = last_layer_targets(lm, targets, config.last_layers)
    adapter = BayesLoRA(lm, config.adapter_config(targets))
    method = build_method(config.method, adapter, config, num_train_tasks)
    return Built(lm, tokenizer, adapter, method)
