"""Packed option scoring: all options of an example behind one pass over the shared prompt.

Layout of one row (example ``i`` with prompt ``P`` and options ``O_1..O_m``)::

    tokens     P_0 .. P_{p-1} | O_1,0 .. O_1,l1-1 | O_2,0 .. | ... | pad
    segment    0  ..  0       | 1    ..  1        | 2    ..  | ... | -1
    position   0  ..  p-1     | p    ..  p+l1-1   | p    ..  | ... | 0

A query token of segment ``s`` may attend to a key token ``k`` at or before it when ``k`` is in the
prompt (segment 0) or in the same option (segment ``s``): a tree-shaped causal mask passed to the LM
as a 4D additive float mask ``[n, 1, L, L]`` together with ``position_ids`` that restart after the
prompt. Each option then sees exactly the context it sees in its own sequence, so the scores equal
one-row-per-option scoring up to float round-off, for one prompt pass instead of ``m``.

The first token of every option is predicted from the last prompt position; token ``t > 0`` of an
option from its own token ``t - 1``.

Only models whose attention honours a custom 4D mask and explicit ``position_ids`` may use this
(:data:`PACKABLE_MODEL_TYPES`, each checked against per-option scoring in the tests); others fall back
to one row per option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .trunk import scored_logits

__all__ = ["PACKABLE_MODEL_TYPES", "PackedOptions", "packing_supported", "packed_option_log_probs", "log_prob_of"]

# model_type -> verified by tests/data/test_packing.py to match per-option scoring.
PACKABLE_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt2"})
PACKABLE_ATTENTION = frozenset({"eager", "sdpa"})


@dataclass(frozen=True)
class PackedOptions:
    """Packed rows, one per example. Shapes: ``input_ids``, ``position_ids``, ``segment``: ``[n, L]``;
    ``prompt_len``: ``[n]``; ``first_token``: ``[n, M]`` (first token of each option, 0 in unused slots)."""

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    prompt_len: Tensor
    first_token: Tensor

    def select(self, index: Tensor) -> "PackedOptions":
        sub = [getattr(self, f)[index] for f in self.__dataclass_fields__]
        used = int((sub[2] >= 0).sum(-1).max()) if index.numel() else 0
        return PackedOptions(sub[0][:, :used], sub[1][:, :used], sub[2][:, :used], sub[3], sub[4])

    def to(self, device: torch.device | str) -> "PackedOptions":
        return PackedOptions(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @classmethod
    def build(
        cls, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]], pad_id: int = 0
    ) -> "PackedOptions":
        lengths = [len(p) + sum(len(o) for o in opts) for p, opts in zip(prompts, options)]
        n, width = len(prompts), max(lengths)
        max_opts = max(len(opts) for opts in options)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        seg = torch.full((n, width), -1, dtype=torch.long)
        first = torch.zeros((n, max_opts), dtype=torch.long)
        for i, (prompt, opts) in enumerate(zip(prompts, options)):
            p = len(prompt)
            ids[i, :p] = torch.as_tensor(list(prompt))
            pos[i, :p] = torch.arange(p)
            seg[i, :p] = 0
            start = p
            for j, opt in enumerate(opts):
                stop = start + len(opt)
                ids[i, start:stop] = torch.as_tensor(list(opt))
                pos[i, start:stop] = torch.arange(p, p + len(opt))
                seg[i, start:stop] = j + 1
                first[i, j] = opt[0]
                start = stop
        prompt_len = torch.as_tensor([len(p) for p in prompts], dtype=torch.long)
        return cls(ids, pos, seg, prompt_len, first)

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """``[n, 1, L, L]`` additive mask: 0 where query ``q`` may attend key ``k``, dtype-min elsewhere.

        Padding queries attend only to themselves, so no softmax row is empty (no NaN); their
        outputs are never read."""
        seg = self.segment
        length = seg.shape[1]
        idx = torch.arange(length, device=seg.device)
        causal = idx.view(1, length, 1) >= idx.view(1, 1, length)  # [1, q, k]
        key_seg, query_seg = seg.unsqueeze(1), seg.unsqueeze(2)  # [n, 1, k], [n, q, 1]
        visible = (key_seg == 0) | (key_seg == query_seg)
        allowed = causal & visible & (key_seg >= 0) & (query_seg >= 0)
        allowed = allowed | (torch.eye(length, dtype=torch.bool, device=seg.device) & (query_seg < 0))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _model_config(lm: torch.nn.Module):
    """The HF config of ``lm`` or of a module it wraps (``.model``, ``.base_model``, ``.module``)."""
    seen = 0
    while lm is not None and seen < 4:
        config = getattr(lm, "config", None)
        if config is not None and hasattr(config, "model_type"):
            return config
        lm = next((getattr(lm, a) for a in ("model", "base_model", "module") if hasattr(lm, a)), None)
        seen += 1
    return None


def packing_supported(lm: torch.nn.Module) -> bool:
    """Whether ``lm`` is a model type verified to honour a 4D float mask and position ids, with an
    attention implementation that accepts one (eager or sdpa; not flash attention)."""
    config = _model_config(lm)
    if config is None or config.model_type not in PACKABLE_MODEL_TYPES:
        return False
    return getattr(config, "_attn_implementation", "eager") in PACKABLE_ATTENTION


def at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def log_prob_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log_softmax(logits)[..., tokens]`` in float32 (float64 stays float64) without a vocab-sized
    log_softmax copy. ``logits``: ``[..., V]``; ``tokens``: ``[...]`` -> ``[...]``."""
    logits = at_least_float32(logits)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def packed_option_log_probs(lm: torch.nn.Module, packed: PackedOptions, num_options: Tensor) -> tuple[Tensor, Tensor]:
    """``(summed log-prob [n, M], token count [n, M])`` of each option, from one LM pass per example.

    The head runs at the scored positions only: the last prompt position (once per example, shared by
    the first tokens of all its options) and every option position followed by a token of the same
    option (:func:`~abmll_pyro.data.trunk.scored_logits`, which also uses the frozen-trunk cache)."""
    dtype = next(lm.parameters()).dtype
    seg = packed.segment
    at = scored_logits(lm, packed.input_ids, packed.attention_mask(dtype), packed.position_ids, (seg >= 0).sum(-1))
    n, max_opts = packed.first_token.shape
    rows = torch.arange(n, device=seg.device)
    # First option tokens: all predicted from the last prompt position.
    end = at_least_float32(at(rows, packed.prompt_len - 1)).log_softmax(-1)  # [n, V]
    total = end.gather(1, packed.first_token)  # [n, M]
    slots = torch.arange(max_opts, device=seg.device)
    total = total.masked_fill(slots >= num_options.unsqueeze(-1), 0.0)
    # Later option tokens: token t+1 predicted from t when both lie in the same option.
    same = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])  # [n, L-1]
    r, t = same.nonzero(as_tuple=True)
    if r.numel():
        rest = log_prob_of(at(r, t), packed.input_ids[r, t + 1])  # [P]
        total = total.index_put((r, seg[r, t] - 1), rest, accumulate=True)
    counts = torch.zeros((n, max_opts), dtype=torch.float32, device=seg.device)
    counts = counts.scatter_add(1, (seg - 1).clamp_min(0), (seg > 0).float())
    return total, counts
