"""Posterior predictive sampling of free-form answers.

For a task posterior q(φ | support) and a prompt x, each of S draws

    ΔW_s ~ q(φ | support)         (traced through the Pyro guide, one draw per module)
    y_s  ~ p(y | x, W0 + ΔW_s)    (transformers' ``generate``: KV cache, greedy or sampling)

shares one ΔW_s across every token of its continuation and every prompt of the batch, so the S
answers of a prompt are samples of the posterior predictive (the answer-level analogue of
:func:`~abmll_pyro.infer.predictive.posterior_predictive`'s option probabilities).

Generation is a likelihood (:class:`GenerationLikelihood`): the model θ → φ → D with it emits the
generated token ids as the deterministic site ``generated[i]``, so ``pyro.infer.Predictive(model,
guide=guide, num_samples=S, return_sites=["generated[0]"])`` returns them too. :func:`sample_answers`
runs the same guide-trace / model-replay loop as the multiple-choice predictive, one draw at a time.

Per prompt, :func:`summarize_answers` reduces the S answers over their normalised forms (lower case,
whitespace collapsed, surrounding punctuation stripped): the majority answer, the agreement rate
(share of the majority), the entropy (nats) of the empirical distribution, and exact match of the
majority with a reference target when given.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyro
import pyro.poutine as poutine
import torch
from torch import Tensor, nn

from .. import sites
from ..data.encoding import encode_prompt, pad_token_id
from ..data.templates import Template, make_template
from ..models.hierarchical import HierarchicalModel
from ..models.likelihoods import Likelihood, TaskData, data_plate
from .meta import MetaSVI

__all__ = ["GenerationConfig", "PromptBatch", "encode_prompts", "GenerationLikelihood", "generation_model",
           "draw_deltas", "sample_answers", "normalize_answer", "summarize_answers"]

@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``do_sample=False`` is greedy; ``stop_strings`` end a continuation (the
    answer is cut before the first one); ``max_new_tokens`` bounds it."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "use_cache": True}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts for ``generate``: ``input_ids``, ``attention_mask`` ``[n, L]``."""

    input_ids: Tensor
    attention_mask: Tensor
    pad_id: int = 0
    texts: tuple[str, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Tensor | Sequence[int]) -> "PromptBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        texts = tuple(self.texts[i] for i in index.tolist()) if self.texts else ()
        return PromptBatch(self.input_ids[index], self.attention_mask[index], self.pad_id, texts)

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pad_id, self.texts)


def encode_prompts(tokenizer: Any, inputs: Sequence[str], template: str | Template = "direct",
                   max_length: int | None = None) -> PromptBatch:
    """Tokenize ``inputs`` through ``template``'s prompt, left-padded (the answer follows the prompt);
    ``max_length`` keeps the right end of a long prompt."""
    if not inputs:
        raise ValueError("no prompts to encode")
    template = make_template(template, tokenizer)
    rows = []
    for i, text in enumerate(inputs):
        ids = encode_prompt(tokenizer, template.prompt(text), f"prompt {i}")
        rows.append(ids[-max_length:] if max_length else ids)
    pad = pad_token_id(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        att[r, width - len(row):] = 1
    return PromptBatch(ids, att, pad, tuple(inputs))


class GenerationLikelihood(Likelihood):
    """Emits ``generated[index]``: the continuations ``[n, max_new_tokens]`` (pad-filled after the end)
    of task ``index``'s prompts under the LM as the model set it (W0 + ΔW of this draw)."""

    def __init__(self, tokenizer: Any, config: GenerationConfig | None = None):
        self.tokenizer, self.config = tokenizer, config or GenerationConfig()

    def __call__(self, lm: nn.Module, task: TaskData, index: int) -> None:
        if not isinstance(task.batch, PromptBatch):
            raise TypeError(f"GenerationLikelihood needs a PromptBatch, got {type(task.batch).__name__}")
        with data_plate(task, index) as batch:
            new = continuations(lm, batch, self.tokenizer, self.config)
            pyro.deterministic(sites.generated(index), new, event_dim=1)


@torch.no_grad()
def continuations(lm: nn.Module, batch: PromptBatch, tokenizer: Any, config: GenerationConfig) -> Tensor:
    """``[n, max_new_tokens]`` new token ids of ``lm.generate`` on ``batch`` (``pad_id`` after the end)."""
    kwargs = config.generate_kwargs()
    if config.stop_strings:
        kwargs.update(stop_strings=list(config.stop_strings), tokenizer=tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = lm.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pad_token_id=batch.pad_id,
                      eos_token_id=eos, **kwargs)
    new = out[:, batch.input_ids.shape[1]:]
    return torch.nn.functional.pad(new, (0, config.max_new_tokens - new.shape[1]), value=batch.pad_id)


def generation_model(svi: MetaSVI, tokenizer: Any, config: GenerationConfig | None = None) -> HierarchicalModel:
    """The run's model θ → φ → D with generation as the observation: same adapter and prior, so the
    run's guide (``svi.guide``) fits it, and ``Predictive`` can return ``generated[i]``."""
    return HierarchicalModel(svi.adapter, svi.model.prior, GenerationLikelihood(tokenizer, config))


def _args(svi: MetaSVI, task_params: Mapping[str, Tensor], prompts: PromptBatch) -> tuple:
    return svi.theta(), [task_params], [TaskData(prompts, subsample_size=None, observed=False)]


def draw_deltas(svi: MetaSVI, task_params: Mapping[str, Tensor], prompts: PromptBatch) -> dict[str, Tensor]:
    """One draw ΔW ~ q(φ | support) per adapted module, traced through the Pyro guide."""
    trace = poutine.trace(svi.guide).get_trace(*_args(svi, task_params, prompts))
    return {m: trace.nodes[sites.phi(0, m)]["value"] for m in svi.adapter.shapes}


def decode_answers(tokenizer: Any, ids: Tensor, pad_id: int, stop_strings: Sequence[str]) -> list[str]:
    """Decoded continuations, cut before the first stop string and stripped of surrounding spaces."""
    texts = []
    for row in ids.tolist():
        text = tokenizer.decode([t for t in row if t != pad_id], skip_special_tokens=True)
        for stop in stop_strings:
            text = text.split(stop, 1)[0]
        texts.append(text.strip())
    return texts


@torch.no_grad()
def sample_answers(svi: MetaSVI, task_params: Mapping[str, Tensor], prompts: PromptBatch, tokenizer: Any,
                   num_samples: int, config: GenerationConfig | None = None, mode: str = "sample") -> list[list[str]]:
    """``answers[p][s]``: prompt p's continuation under draw s (``mode="mean"``: one answer, the
    posterior mean's, in low-rank form). Draws: guide trace, model replay (as the option predictive)."""
    if mode not in ("sample", "mean"):
        raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    config = config or GenerationConfig()
    model = generation_model(svi, tokenizer, config)
    args = _args(svi, task_params, prompts)
    draws = []
    if mode == "mean":
        with svi.adapter.use(svi.adapter.mean_deltas(task_params)):
            draws.append(continuations(svi.adapter.lm, prompts, tokenizer, config))
    else:
        for _ in range(num_samples):
            guide_trace = poutine.trace(svi.guide).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
            draws.append(model_trace.nodes[sites.generated(0)]["value"])
    per_draw = [decode_answers(tokenizer, d, prompts.pad_id, config.stop_strings) for d in draws]
    return [[answers[p] for answers in per_draw] for p in range(len(prompts))]


_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n.,;:!?\"'`()[]{}"


def normalize_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation and spaces stripped."""
    return _SPACE.sub(" ", text.lower()).strip(_EDGE_PUNCT)


def summarize_answers(answers: Sequence[str], target: str | None = None) -> dict[str, Any]:
    """``majority`` (the first answer of the most frequent normalised class), ``agreement`` (that
    class's share), ``entropy`` (nats, of the normalised answers' empirical distribution:
    −Σ_a p̂(a) log p̂(a), 0 when all agree, log S when all differ), ``exact_match`` when ``target``."""
    if not answers:
        raise ValueError("no answers to summarize")
    norm = [normalize_answer(a) for a in answers]
    counts = Counter(norm)
    top = max(counts.values())
    winner = next(n for n in norm if counts[n] == top)  # ties: the earliest draw's class
    n = len(answers)
    out: dict[str, Any] = {
        "majority": answers[norm.index(winner)],
        "agreement": top / n,
        "entropy": 0.0 - sum((c / n) * math.log(c / n) for c in counts.values()),  # 0.0, never -0.0
    }
    if target is not None:
        out["exact_match"] = winner == normalize_answer(target)
    return out
