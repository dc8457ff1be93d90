"""Option scoring: each option's log-likelihood under a causal LM, the input of the likelihood.

The contract the core relies on (keep it in this one place):

* :class:`OptionBatch` holds the tokenized examples of one task (any number of options each); it
  has ``len()`` (examples), ``gold`` (``[n]`` long), ``num_options`` (``[n]`` long) and
  ``select(index)`` (a sub-batch of examples, for data-plate subsampling).
* :func:`option_scores` returns ``[n, max_options]`` float32 scores, each option's token log-probs
  given its prompt reduced by :data:`SCORE_REDUCTIONS` (summed, per token, or per character), with
  padded option slots set to ``-inf``.
* :class:`TokenBatch` / :func:`token_log_probs` do the same for token-level (generative) data.

Rows are one sequence per option (prompt + option, right-padded). A batch may also carry a packed
layout (:mod:`abmll_pyro.data.packing`: all options of an example behind one prompt pass); scoring
uses it when the model supports it and falls back to one row per option otherwise. Both give the
same scores (to float round-off) and both are differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from abmll_pyro.data.packing import PackedOptions, log_prob_of, packed_option_log_probs, packing_supported
from abmll_pyro.data.trunk import final_hidden, scored_logits

__all__ = [
    "SCORE_REDUCTIONS", "check_reduction", "OptionBatch", "TokenBatch", "option_scores", "token_log_probs", "masked_fill_options", "packing_supported",
]

NEG_INF = float("-inf")

#: How an option's token log-probs become its score (one setting shared by every method):
#: ``sum`` — Σ_t log p(o_t | ·) (the joint log-likelihood; favours short options);
#: ``mean`` — the sum over the option's token count (MetaICL divides each option's loss by its length);
#: ``char`` — the sum over the option text's character count, the template's separator not counted
#: (lm-eval's ``acc_norm``: ``lls / len(choice)``).
SCORE_REDUCTIONS = ("sum", "mean", "char")


def check_reduction(reduction: str) -> str:
    if reduction not in SCORE_REDUCTIONS:
        raise ValueError(f"score reduction must be one of {list(SCORE_REDUCTIONS)}, got {reduction!r}")
    return reduction


@dataclass(frozen=True)
class OptionBatch:
    """Tokenized options of ``n`` examples, one row per (example, option).

    Shapes: ``input_ids``, ``attention_mask``, ``target_mask``: ``[R, L]``; ``row_example``,
    ``row_option``: ``[R]``; ``gold``, ``num_options``: ``[n]``. ``target_mask[r, t]`` marks the
    tokens of the option in row ``r`` (their log-probs, predicted from position ``t - 1``, are scored).
    ``packed`` is the same data in the packed layout, or None. ``option_chars`` (``[n, max_options]``
    float32, or None) holds each option's length in characters of its own text (without the
    separator a template puts before it: lm-eval's ``len(choice)``), for the ``char`` reduction
    (padded slots 1).
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    row_example: Tensor
    row_option: Tensor
    gold: Tensor
    num_options: Tensor
    packed: PackedOptions | None = None
    option_chars: Tensor | None = None

    def __len__(self) -> int:
        return int(self.gold.shape[0])

    @property
    def max_options(self) -> int:
        return int(self.num_options.max())

    def select(self, index: Tensor | Sequence[int]) -> "OptionBatch":
        """The sub-batch of examples ``index`` (order kept as given)."""
        index = torch.as_tensor(index, dtype=torch.long)
        remap = torch.full((len(self),), -1, dtype=torch.long)
        remap[index] = torch.arange(index.numel())
        keep = remap[self.row_example] >= 0
        rows = keep.nonzero().squeeze(-1)
        new_example = remap[self.row_example[rows]]
        order = torch.argsort(new_example * (self.max_options + 1) + self.row_option[rows], stable=True)
        rows = rows[order]
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            target_mask=self.target_mask[rows],
            row_example=remap[self.row_example[rows]],
            row_option=self.row_option[rows],
            gold=self.gold[index],
            num_options=self.num_options[index],
            packed=None if self.packed is None else self.packed.select(index),
            option_chars=None if self.option_chars is None else self.option_chars[index],
        )

    def to(self, device: torch.device | str) -> "OptionBatch":
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return OptionBatch(**{f: None if v is None else v.to(device) for f, v in fields.items()})

    @classmethod
    def from_token_ids(
        cls,
        prompts: Sequence[Sequence[int]],
        options: Sequence[Sequence[Sequence[int]]],
        gold: Sequence[int],
        pad_id: int = 0,
        pack: bool = True,
        option_chars: Sequence[Sequence[int]] | None = None,
    ) -> "OptionBatch":
        """Build from already-tokenized prompts and options (right padding with ``pad_id``);
        ``pack`` also builds the packed layout; ``option_chars`` gives each option's length in
        characters (needed by the ``char`` reduction)."""
        if not (len(prompts) == len(options) == len(gold)):
            raise ValueError("prompts, options and gold must have the same length")
        rows: list[list[int]] = []
        targets: list[list[bool]] = []
        row_example, row_option, num_options = [], [], []
        for i, (prompt, opts) in enumerate(zip(prompts, options)):
            if len(opts) < 2:
                raise ValueError(f"example {i} has {len(opts)} options; at least 2 are needed")
            if not 0 <= gold[i] < len(opts):
                raise ValueError(f"example {i}: gold index {gold[i]} is not among its {len(opts)} options")
            if len(prompt) == 0:
                raise ValueError(f"example {i}: empty prompt (the first option token needs a context)")
            num_options.append(len(opts))
            for j, opt in enumerate(opts):
                if len(opt) == 0:
                    raise ValueError(f"example {i}, option {j} has no tokens")
                rows.append(list(prompt) + list(opt))
                targets.append([False] * len(prompt) + [True] * len(opt))
                row_example.append(i)
                row_option.append(j)
        ids, att, tgt = pad_rows(rows, targets, pad_id)
        chars = None
        if option_chars is not None:
            chars = torch.ones((len(prompts), max(num_options)), dtype=torch.float32)
            for i, lengths in enumerate(option_chars):
                if len(lengths) != num_options[i] or min(lengths) < 1:
                    raise ValueError(f"example {i}: option_chars {list(lengths)} must give a length >= 1 per option")
                chars[i, : len(lengths)] = torch.as_tensor(list(lengths), dtype=torch.float32)
        return cls(
            ids, att, tgt,
            torch.tensor(row_example), torch.tensor(row_option),
            torch.as_tensor(list(gold), dtype=torch.long), torch.tensor(num_options),
            PackedOptions.build(prompts, options, pad_id) if pack else None,
            chars,
        )


def pad_rows(rows: Sequence[Sequence[int]], targets: Sequence[Sequence[bool]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad token rows: ``(input_ids, attention_mask, target_mask)``, each ``[len(rows), longest]``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    tgt = torch.zeros((len(rows), length), dtype=torch.bool)
    for r, (row, t) in enumerate(zip(rows, targets)):
        ids[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        att[r, : len(row)] = 1
        tgt[r, : len(row)] = torch.as_tensor(t, dtype=torch.bool)
    return ids, att, tgt


def _per_row_option_log_probs(lm: torch.nn.Module, batch: OptionBatch) -> tuple[Tensor, Tensor]:
    """``(summed log-prob [R], token count [R])`` of each row's option: one sequence per option.

    The head runs only at positions whose next token is an option token (``target_mask[:, t + 1]``)."""
    at = scored_logits(lm, batch.input_ids, batch.attention_mask, None, batch.attention_mask.sum(-1))
    mask = batch.target_mask[:, 1:]  # [R, L-1]: token t+1 given <= t
    r, t = mask.nonzero(as_tuple=True)
    picked = log_prob_of(at(r, t), batch.input_ids[r, t + 1])  # [P]
    per_row = picked.new_zeros(mask.shape[0]).index_put((r,), picked, accumulate=True)
    return per_row, mask.sum(-1).float()


def option_scores(
    lm: torch.nn.Module, batch: OptionBatch, reduction: str = "sum", packed: bool | None = None
) -> Tensor:
    """``[n, max_options]`` float32: each option's token log-probs, reduced (:data:`SCORE_REDUCTIONS`).

    score[i, j] = sum_t log p(o_ij,t | prompt_i, o_ij,<t), divided by the option's token count
    (``"mean"``) or character count (``"char"``, from ``batch.option_chars``); slots ``j >= num_options[i]`` are ``-inf``. ``packed=None`` uses the packed layout when the batch
    has one and :func:`packing_supported` says the model honours it; True uses it regardless;
    False forces one row per option.
    """
    check_reduction(reduction)
    if reduction == "char" and batch.option_chars is None:
        raise ValueError("score reduction 'char' needs option_chars in the batch (encode it with encode_options)")
    if packed and batch.packed is None:
        raise ValueError("packed=True but the batch has no packed layout (build it with pack=True)")
    use_packed = batch.packed is not None and packing_supported(lm) if packed is None else packed
    if use_packed:
        totals, counts = packed_option_log_probs(lm, batch.packed, batch.num_options)
        totals, counts = totals[:, : batch.max_options], counts[:, : batch.max_options]
    else:
        per_row, per_count = _per_row_option_log_probs(lm, batch)
        shape = (len(batch), batch.max_options)
        totals = per_row.new_zeros(shape).index_put((batch.row_example, batch.row_option), per_row)
        counts = per_count.new_ones(shape).index_put((batch.row_example, batch.row_option), per_count)
    if reduction == "mean":
        totals = totals / counts.clamp_min(1.0)
    elif reduction == "char":
        totals = totals / batch.option_chars[:, : batch.max_options].to(totals.device).clamp_min(1.0)
    return masked_fill_options(totals, batch.num_options)


def masked_fill_options(scores: Tensor, num_options: Tensor) -> Tensor:
    """Set option slots ``>= num_options`` to ``-inf`` (for scores produced elsewhere)."""
    slots = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(slots >= num_options.unsqueeze(-1), NEG_INF)


@dataclass(frozen=True)
class TokenBatch:
    """Token-level (generative) data: ``target_mask`` marks the tokens whose likelihood counts."""

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Tensor | Sequence[int]) -> "TokenBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.target_mask[index])


def token_log_probs(lm: torch.nn.Module, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits [n, L-1, V] float32, targets [n, L-1], mask [n, L-1])`` for next-token prediction,
    so a likelihood can observe one Categorical per target token."""
    hidden = final_hidden(lm, batch.input_ids, batch.attention_mask, None, batch.attention_mask.sum(-1))
    if hidden is None:
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    else:  # the last position predicts nothing: the head skips it
        logits = lm.get_output_embeddings()(hidden[:, :-1])
    return logits.float(), batch.input_ids[:, 1:], batch.target_mask[:, 1:]
