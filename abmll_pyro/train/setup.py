"""Build what a run needs from a :class:`RunConfig`: tasks, the LM with its adapter, and the method."""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pyro
import torch
from torch import nn

from ..data.sources import TaskSet, load_tasks
from ..data.trunk import TRUNK_DIR_ENV, TrunkCache, attach_trunk_cache
from .peft_init import init_from_peft
from ..lms import load_lm
from ..lora.adapter import DEFAULT_TARGETS, FALLBACK_TARGETS, BayesLoRA
from ..lora.layer import is_linear
from ..methods import Method, build_method
from ..models.by_batch import with_tokens
from .config import RunConfig

__all__ = ["Built", "seed_everything", "load_taskset", "build", "last_layer_targets", "context_length", "fit_context"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def load_taskset(config: RunConfig, tokenizer: Any = None) -> TaskSet:
    """The config's task source (with ``drop_long_examples``, filtered by :func:`fit_tasks` using
    ``tokenizer``), train/test then capped to the first ``max_*_tasks`` tasks."""
    tasks = load_tasks(config.tasks, train=config.train_tasks, dev=config.dev_tasks, test=config.test_tasks,
                       data_dir=config.data_dir, max_examples=config.max_examples)
    if config.drop_long_examples:
        if tokenizer is None:
            raise ValueError("drop_long_examples needs the tokenizer")
        tasks, _ = fit_tasks(tasks, tokenizer, config.max_length, config.shots + 2)
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


def fit_tasks(taskset: TaskSet, tokenizer: Any, max_length: int | None, min_examples: int) -> tuple[TaskSet, dict]:
    """Keep the examples whose prompt plus longest option fits ``max_length`` tokens untruncated, and the
    tasks left with at least ``min_examples``; returns the filtered set and a report of what was dropped
    (``dropped_tasks``, ``dropped_examples``, and ``kept``: task name -> (examples kept, examples)).

    This keeps compute per example bounded (CPU presets) without cutting prompts mid-input. In-context
    prompts (with demonstrations) may still be cut from the left to fit."""
    if max_length is None:
        return taskset, {}
    report: dict[str, Any] = {"dropped_tasks": [], "dropped_examples": 0, "kept": {}}

    def fits(ex) -> bool:
        prompt = len(tokenizer(ex.input).input_ids)
        answers = ex.options or (ex.target,)  # a generative example: its target
        return prompt + max(len(tokenizer(" " + o, add_special_tokens=False).input_ids) for o in answers) <= max_length

    splits = {}
    for name in ("train", "dev", "test"):
        kept = []
        for task in taskset[name]:
            examples = [ex for ex in task.examples if fits(ex)]
            report["dropped_examples"] += len(task) - len(examples)
            report["kept"][task.name] = (len(examples), len(task))
            if len(examples) >= min_examples:
                kept.append(replace(task, examples=tuple(examples)))
            else:
                report["dropped_tasks"].append(task.name)
        splits[name] = tuple(kept)
    return TaskSet(**splits, fingerprint=taskset.fingerprint), report


def context_length(lm: nn.Module) -> int | None:
    """The LM's context window in tokens (``max_position_embeddings``, GPT-2's ``n_positions``), if it has one."""
    cfg = getattr(lm, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(config: RunConfig, lm: nn.Module) -> RunConfig:
    """``config`` with ``max_length`` (and the in-context budget ``icl_max_length``) clipped to the LM's
    context window; ``null`` (no limit) becomes the window. One warning when the user asked for more."""
    window = context_length(lm)
    if window is None:
        return config
    changes = {}
    if config.max_length is None or config.max_length > window:
        if config.max_length is not None:
            warnings.warn(f"max_length={config.max_length} exceeds the context of {config.model} ({window} tokens); "
                          f"using max_length={window}")
        changes["max_length"] = window
    if (config.icl_max_length or 0) > window:
        warnings.warn(f"icl_max_length={config.icl_max_length} exceeds the context of {config.model} ({window} "
                      f"tokens); using {window}")
        changes["icl_max_length"] = window
    config = config.updated(**changes) if changes else config
    if config.prompt_length(True) > window:  # the default in-context budget max_length·(shots + 1)
        config = config.updated(icl_max_length=window)
    return config


#: training tasks whose support gradients set the subspace's directions (``subspace_init: gradients``)
SUBSPACE_INIT_TASKS = 16


def _subspace_from_gradients(svi, taskset: TaskSet, config: RunConfig, tokenizer, device) -> None:
    """The subspace's directions from the support sets of the first ``SUBSPACE_INIT_TASKS`` training
    tasks (``shots`` examples each, split with a generator seeded from ``seed``; option tasks only)."""
    from ..data.scoring import OptionBatch
    from ..data.tasks import split_task
    from .episodes import EpisodeEncoder

    encoder = EpisodeEncoder(tokenizer, config.prompt_length(False), config.template, False, device)
    g = torch.Generator().manual_seed(config.seed)
    supports = []
    for task in taskset.train[:SUBSPACE_INIT_TASKS]:
        if len(task) <= config.shots:
            continue
        split = split_task(task, config.shots, 1, g, allow_smaller_query=True)
        batch = encoder.encode(list(split.support), f"{task.name} support")
        if isinstance(batch, OptionBatch):
            supports.append(batch)
    scores = getattr(svi.model.likelihood, "scores", None)
    if supports and scores is not None:
        svi.subspace.init_from_gradients(svi.adapter, scores, supports, generator=g)


@dataclass
class Built:
    lm: nn.Module
    tokenizer: Any
    adapter: BayesLoRA
    method: Method
    config: RunConfig | None = None  # the run's config with lengths fitted to the LM's context


def build(config: RunConfig, device: torch.device | str = "cpu", with_tasks: bool = True) -> tuple[Built, TaskSet]:
    """Seeded: the LM (random tiny models use ``seed``), the tasks, the adapter's initial factors and
    the method (ABMLL weighs log p(θ) by 1/M, M the number of training tasks; that weight enters only
    the training loss, so ``with_tasks=False``, for prediction, loads no tasks and uses M = 1).
    ``Built.config`` is ``config`` with ``max_length`` fitted to the LM (:func:`fit_context`)."""
    seed_everything(config.seed)
    # loaded straight onto the device (an 8B model never passes through host memory); the random
    # tiny and proxy weights are drawn on the CPU first, so they are the same on every device
    lm, tokenizer = load_lm(config.model, dtype=config.dtype, device=device, seed=config.seed)
    config = fit_context(config, lm)
    taskset = load_taskset(config, tokenizer) if with_tasks else TaskSet(())
    seed_everything(config.seed)
    targets = config.target_modules
    if config.last_layers is not None:
        targets = last_layer_targets(lm, targets, config.last_layers)
    adapter = BayesLoRA(lm, config.adapter_config(targets))
    if config.init_from_peft:  # θ's mean factors from an existing PEFT LoRA adapter (σ keeps its start)
        init_from_peft(adapter, config.init_from_peft)
    if config.trunk_cache:  # shared on disk where $ABMLL_TRUNK_DIR says (abmll benchmark, --trunk-dir)
        attach_trunk_cache(lm, TrunkCache(directory=os.environ.get(TRUNK_DIR_ENV) or None))
    method = build_method(config.method, adapter, config, len(taskset.train))
    svi = getattr(method, "svi", None)
    if svi is not None and getattr(svi, "subspace", None) is not None and svi.subspace.init == "gradients" and taskset.train:
        _subspace_from_gradients(svi, taskset, config, tokenizer, device)
    if svi is not None:  # generative (token) episodes beside option episodes, one model
        svi.model.likelihood = with_tokens(svi.model.likelihood)
    return Built(lm, tokenizer, adapter, method, config), taskset
