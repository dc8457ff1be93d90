"""Text to batches: tokenize prompts and options once, reuse the batch for every forward pass.

:func:`encode_options` turns examples into an :class:`~abmll_pyro.data.scoring.OptionBatch`
(per-option rows plus the packed layout); :func:`encode_tokens` turns them into a
:class:`~abmll_pyro.data.scoring.TokenBatch` for token-level likelihoods. The core encodes each
task's support and query sets once and runs many inner steps over the same batches.

Truncation keeps the right end of the prompt (the input closest to the answer; demonstrations go
first) so that prompt + longest option fits ``max_length``; a warning counts truncated examples. An
input far longer than ``max_length`` is cut to a suffix before it is tokenized (:func:`clip_text`).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence


from abmll_pyro.data.scoring import OptionBatch, TokenBatch, pad_rows
from abmll_pyro.data.tasks import Example
from abmll_pyro.data.templates import Template, make_template

__all__ = ["encode_options", "encode_tokens", "encode_prompt", "pad_token_id"]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padded positions are masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def encode_prompt(tokenizer: Any, text: str, where: str) -> list[int]:
    """Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS). An empty prompt gets
    the BOS (else EOS) token as its only context, since the first option token needs one."""
    ids = list(tokenizer(text).input_ids)
    if not ids:
        fallback = getattr(tokenizer, "bos_token_id", None)
        fallback = fallback if fallback is not None else getattr(tokenizer, "eos_token_id", None)
        if fallback is None:
            raise ValueError(f"{where}: empty prompt and the tokenizer has neither BOS nor EOS")
        ids = [int(fallback)]
    return ids


def _continuation_ids(tokenizer: Any, text: str, where: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if not ids:
        raise ValueError(f"{where}: continuation {text!r} has no tokens")
    return ids


CLIP_SLACK = 16  # tokens kept beyond the budget, so the cut's own edge never reaches the kept tokens


def clip_text(tokenizer: Any, text: str, max_tokens: int | None) -> str:
    """The right end of ``text`` long enough to hold its last ``max_tokens`` tokens (plus a slack of
    :data:`CLIP_SLACK`), found by tokenizing growing suffixes (8 characters per token first, doubled
    while too few tokens come out), so a huge input costs about its budget, never its length."""
    if max_tokens is None:
        return text
    want = max_tokens + CLIP_SLACK
    chars = 8 * want
    while chars < len(text):
        suffix = text[-chars:]
        if len(tokenizer(suffix, add_special_tokens=False).input_ids) >= want:
            return suffix
        chars *= 2
    return text


def _fit(prompt: list[int], longest: int, max_length: int | None, where: str) -> tuple[list[int], bool]:
    """Cut ``prompt`` from the left so that ``len(prompt) + longest <= max_length`` (keep >= 1 token)."""
    if max_length is None or len(prompt) + longest <= max_length:
        return prompt, False
    room = max_length - longest
    if room < 1:
        raise ValueError(
            f"{where}: a continuation of {longest} tokens leaves no room for the prompt in max_length={max_length}"
        )
    return prompt[-room:], True


def _warn_truncated(count: int, total: int, max_length: int | None, name: str) -> None:
    if count:
        warnings.warn(
            f"{name}: {count} of {total} examples truncated from the left to fit max_length={max_length}",
            stacklevel=3,
        )


def encode_options(
    tokenizer: Any,
    examples: Sequence[Example],
    template: str | Template = "direct",
    max_length: int | None = None,
    demonstrations: Sequence[Example] = (),
    pack: bool = True,
    name: str = "examples",
) -> OptionBatch:
    """Tokenize ``examples`` into an :class:`OptionBatch`; ``demonstrations`` (e.g. the k support
    examples, for in-context learning) are placed in every prompt. ``name`` labels warnings/errors."""
    if not examples:
        raise ValueError(f"{name}: no examples to encode")
    template = make_template(template, tokenizer)
    prompts, options, chars, truncated = [], [], [], 0
    for i, ex in enumerate(examples):
        where = f"{name} example {i}"
        text = clip_text(tokenizer, ex.input, max_length)
        prompt = encode_prompt(tokenizer, template.prompt(text, demonstrations), where)
        texts = [template.continuation(o) for o in ex.options]
        opts = [_continuation_ids(tokenizer, t, f"{where} option {j}") for j, t in enumerate(texts)]
        # lm-eval's acc_norm divides by len(choice): the option's own text, not the separator before it
        chars.append([max(len(o), 1) for o in ex.options])
        prompt, cut = _fit(prompt, max(len(o) for o in opts), max_length, where)
        truncated += cut
        prompts.append(prompt)
        options.append(opts)
    _warn_truncated(truncated, len(examples), max_length, name)
    return OptionBatch.from_token_ids(prompts, options, [ex.gold for ex in examples], pad_token_id(tokenizer), pack,
                                      option_chars=chars)


def encode_tokens(
    tokenizer: Any,
    examples: Sequence[Example],
    template: str | Template = "direct",
    max_length: int | None = None,
    demonstrations: Sequence[Example] = (),
    name: str = "examples",
) -> TokenBatch:
    """Tokenize ``examples`` into a :class:`TokenBatch` whose target tokens are each example's
    ``target_text`` (the gold option unless a generative target is given), right-padded."""
    if not examples:
        raise ValueError(f"{name}: no examples to encode")
    template = make_template(template, tokenizer)
    rows, targets, truncated = [], [], 0
    for i, ex in enumerate(examples):
        where = f"{name} example {i}"
        text = clip_text(tokenizer, ex.input, max_length)
        prompt = encode_prompt(tokenizer, template.prompt(text, demonstrations), where)
        target = _continuation_ids(tokenizer, template.continuation(ex.target_text), f"{where} target")
        prompt, cut = _fit(prompt, len(target), max_length, where)
        truncated += cut
        rows.append(prompt + target)
        targets.append([False] * len(prompt) + [True] * len(target))
    _warn_truncated(truncated, len(examples), max_length, name)
    ids, att, tgt = pad_rows(rows, targets, pad_token_id(tokenizer))
    return TokenBatch(ids, att, tgt)
