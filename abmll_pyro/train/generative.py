"""Evaluation on generative test tasks (target-only examples): per-token NLL and exact match.

For each test task (the same seed-fixed support/query split every method sees), the method adapts on
the support set; then, with D draws of the adapted weights (ABMLL: ``num_samples`` draws of ΔW through
the Pyro guide, or its mean with ``predict_mode="mean"``; a deterministic LoRA or the base model: one),

* per-token NLL of the query targets under the posterior predictive,
      NLL = −(1/T) Σ_j log( (1/D) Σ_d p(y_j | x_j; W0 + ΔW_d) ),   T = Σ_j |y_j| tokens,
  the mixture taken per whole target (log-mean-exp over draws, float64);
* exact match: each draw generates an answer per query prompt (greedy, ``GenerationConfig``), the
  majority of the D answers (normalised) is compared with the normalised target; ``agreement`` is the
  mean share of the majority.

Macro averages are over tasks. The result is written as results.json with ``"kind": "generative"``;
``per_task[t]["examples"]`` keeps each query example's target, majority answer, exact match, agreement,
predictive log-probability of the target and its token count (for paired comparisons:
:mod:`abmll_pyro.eval.generative_compare`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.sources import TaskSet
from ..data.tasks import Task
from ..infer.generate import (GenerationConfig, continuations, decode_answers, draw_deltas, encode_prompts,
                              summarize_answers)
from ..methods import ABMLL, InContext, Method, Pretrained, StructuredLoRA
from ..methods.tokens import target_log_probs
from .config import RunConfig
from .episodes import EpisodeEncoder, test_splits, with_demonstrations

__all__ = ["is_generative", "adapted_draws", "evaluate_generative", "generative_result"]


def is_generative(tasks: Sequence[Task] | TaskSet) -> bool:
    """True when every example of every task is target-only; a mix is an error naming a task of each kind."""
    if isinstance(tasks, TaskSet):
        tasks = [*tasks.train, *tasks.dev, *tasks.test]
    kinds = {t.name: all(ex.is_generative for ex in t.examples) for t in tasks}
    mixed = [t.name for t in tasks if not kinds[t.name] and any(ex.is_generative for ex in t.examples)]
    if mixed:
        raise ValueError(f"task(s) {mixed[:3]} mix generative (target-only) and multiple-choice lines")
    if kinds and len(set(kinds.values())) > 1:
        gen = next(n for n, g in kinds.items() if g)
        mc = next(n for n, g in kinds.items() if not g)
        raise ValueError(f"tasks mix generative ({gen!r}) and multiple-choice ({mc!r}) data; use one kind per run")
    return bool(kinds) and all(kinds.values())


def adapted_draws(method: Method, state: Any, prompts, num_samples: int, mode: str) -> list[dict]:
    """The adapted weights as a list of ΔW dicts (one per draw) for ``method``'s ``state``."""
    adapter = getattr(method, "adapter", None) or method.svi.adapter
    if isinstance(method, ABMLL):
        if mode == "mean":
            return [adapter.mean_deltas(state)]
        return [draw_deltas(method.svi, state, prompts) for _ in range(num_samples)]
    if isinstance(method, InContext):
        raise ValueError("generative evaluation does not support the in-context method 'icl'")
    if isinstance(method, Pretrained):
        return [{m: None for m in adapter.module_names}]
    if isinstance(method, StructuredLoRA):
        return [method._deltas(method.shared.params(), state)]
    if isinstance(state, dict):  # a plain LoRA's adapted factors (lora, reptile)
        return [adapter.mean_deltas(state)]
    raise ValueError(f"method {method.name!r} has no generative evaluation")


@torch.no_grad()
def _score_task(method: Method, state: Any, episode, tokenizer, config: RunConfig, gen: GenerationConfig) -> dict:
    adapter = getattr(method, "adapter", None) or method.svi.adapter
    query = episode.split.query
    shown = with_demonstrations(query, episode.split.support, leave_one_out=False) if method.in_context else query
    prompts = encode_prompts(tokenizer, [ex.input for ex in shown], config.template,
                             config.prompt_length(method.in_context))
    prompts = prompts.to(episode.query.input_ids.device)
    draws = adapted_draws(method, state, prompts, config.num_samples, config.predict_mode)
    log_probs, answers = [], []
    for deltas in draws:
        total, count = target_log_probs(adapter, deltas, episode.query)
        log_probs.append(total.double())
        with adapter.use(deltas):
            ids = continuations(adapter.lm, prompts, tokenizer, gen)
        answers.append(decode_answers(tokenizer, ids, prompts.pad_id, gen.stop_strings))
    mixture = torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(draws))  # [n]
    summaries = [summarize_answers([a[p] for a in answers], ex.target) for p, ex in enumerate(query)]
    examples = [{"target": ex.target, "majority": sm["majority"], "exact_match": sm["exact_match"],
                 "agreement": sm["agreement"], "log_prob": float(lp), "num_tokens": int(c)}
                for ex, sm, lp, c in zip(query, summaries, mixture.tolist(), count.tolist())]
    return {"token_nll": float(-mixture.sum() / count.sum()), "n": len(query), "num_tokens": int(count.sum()),
            "exact_match": sum(s["exact_match"] for s in summaries) / len(query),
            "agreement": sum(s["agreement"] for s in summaries) / len(query), "num_draws": len(draws),
            "examples": examples}


def evaluate_generative(method: Method, tasks: Sequence[Task], encoder: EpisodeEncoder, tokenizer, config: RunConfig,
                        gen: GenerationConfig | None = None, progress: bool = True,
                        autocast: Callable | None = None) -> dict[str, dict]:
    """Per task: ``token_nll``, ``exact_match``, ``agreement``, ``n``, ``num_tokens``, ``adapt_time_s``."""
    gen = gen or GenerationConfig(max_new_tokens=config_max_new_tokens(tasks, tokenizer))
    torch.manual_seed(config.seed)
    per_task = {}
    for split in tqdm(test_splits(tasks, config.shots, config.eval_query_size, config.seed),
                      desc=f"evaluate {method.name} (generative)", disable=not progress, leave=False):
        episode = encoder(split)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            start = time.perf_counter()
            state = method.adapt(episode)
            seconds = time.perf_counter() - start
            per_task[split.name] = {**_score_task(method, state, episode, tokenizer, config, gen), "adapt_time_s": seconds}
    return per_task


def config_max_new_tokens(tasks: Sequence[Task], tokenizer) -> int:
    """Room for the longest target of ``tasks`` plus 2 tokens (a stop string, a space)."""
    longest = max(len(tokenizer(" " + ex.target_text, add_special_tokens=False).input_ids)
                  for t in tasks for ex in t.examples)
    return longest + 2


def generative_result(config: RunConfig, per_task: dict[str, dict], steps: int) -> dict:
    keys = ("token_nll", "exact_match", "agreement", "adapt_time_s")
    macro = {k: sum(t[k] for t in per_task.values()) / len(per_task) for k in keys}
    macro.update(n=sum(t["n"] for t in per_task.values()), num_tasks=len(per_task))
    return {"kind": "generative", "method": config.method, "model": config.model, "tasks": str(config.tasks),
            "seed": config.seed, "per_task": per_task, "macro": macro, "config": config.to_dict(), "steps": steps,
            "num_draws": max(t["num_draws"] for t in per_task.values())}  # 1: the mean or a deterministic method


def evaluate_generative_run(config: RunConfig, built, tasks: Sequence[Task], accelerator, progress: bool) -> dict:
    """The generative results dict of ``built.method`` on ``tasks`` (train/run.py calls this for
    generative task sets in place of the option evaluation)."""
    method = built.method
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template,
                             method.in_context, accelerator.device)
    per_task = evaluate_generative(method, tasks, encoder, built.tokenizer, config, progress=progress,
                                   autocast=accelerator.autocast)
    return generative_result(config, per_task, config.steps if method.trainable else 0)
