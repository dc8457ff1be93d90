"""A Hugging Face decoder-only LM taken apart: embed → blocks → final norm → head, run in pieces.

Scoring needs two things the stock ``lm(...)`` call does not give: the final hidden states without
the vocabulary-sized head applied everywhere (the head then runs only where a token is scored), and
the blocks from ``j`` upwards started from hidden states computed earlier (the frozen-trunk cache,
:mod:`abmll_pyro.data.trunk`). :class:`Decoder` exposes exactly those pieces for the families whose
``forward`` it mirrors line for line (transformers 5.24: ``LlamaModel``, ``Qwen2Model``,
``GPT2Model``); the tests check it against ``lm(...).logits`` for each. Other models get ``None``
from :func:`decoder_of` and are scored through ``lm(...)`` as before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Decoder", "decoder_of", "DECODER_FAMILIES"]


class Decoder:
    """``hidden = norm(blocks[stop-1](... blocks[start](h_start)))`` for one HF causal LM.

    ``prepare(h, attention_mask, position_ids)`` builds what every block needs (masks, rotary
    tables) exactly as the model's own ``forward`` does; ``run(h, ctx, start, stop)`` applies blocks
    ``start..stop-1``. Padding positions are computed but never read by the caller.
    """

    def __init__(self, lm: nn.Module, base: nn.Module, blocks: nn.ModuleList, norm: nn.Module):
        self.lm, self.base, self.blocks, self.final_norm = lm, base, blocks, norm
        self.config = base.config

    @property
    def num_blocks(self) -> int:
        return min(len(self.blocks), int(getattr(self.config, "num_hidden_layers", len(self.blocks))))

    def head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def positions(self, input_ids: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is not None:
            return position_ids
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, h: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Any:
        raise NotImplementedError

    def block(self, i: int, h: Tensor, ctx: Any, position_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def run(self, h: Tensor, ctx: Any, position_ids: Tensor, start: int, stop: int) -> Tensor:
        for i in range(start, stop):
            h = self.block(i, h, ctx, position_ids)
        return h

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        """``[n, L, H]`` final (normed) hidden states through the model's own ``forward``."""
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state


class LlamaDecoder(Decoder):
    """``LlamaModel`` / ``Qwen2Model`` (sliding-window layers per ``config.layer_types``)."""

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.base.embed_tokens(input_ids)

    def prepare(self, h: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                      position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if getattr(self.base, "has_sliding_layers", False):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks, self.base.rotary_emb(h, position_ids=position_ids)

    def block(self, i: int, h: Tensor, ctx: Any, position_ids: Tensor) -> Tensor:
        masks, rotary = ctx
        types = getattr(self.config, "layer_types", None)
        mask = masks[types[i]] if types else masks["full_attention"]
        return self.blocks[i](h, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)


class GPT2Decoder(Decoder):
    """``GPT2Model``: learned positions added to the token embedding, then dropout (identity in eval)."""

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.base.drop(self.base.wte(input_ids) + self.base.wpe(position_ids))

    def prepare(self, h: Tensor, attention_mask: Tensor | None, position_ids: Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask

        if attention_mask is not None and attention_mask.ndim < 4:
            attention_mask = attention_mask.view(h.shape[0], -1)
        return create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)

    def block(self, i: int, h: Tensor, ctx: Any, position_ids: Tensor) -> Tensor:
        return self.blocks[i](h, None, ctx, None, encoder_attention_mask=None, use_cache=False,
                              position_ids=position_ids)


def _llama(lm: nn.Module) -> Decoder | None:
    base = getattr(lm, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return None
    return LlamaDecoder(lm, base, base.layers, base.norm)


def _gpt2(lm: nn.Module) -> Decoder | None:
    base = getattr(lm, "transformer", None)
    if base is None or not hasattr(base, "h"):
        return None
    return GPT2Decoder(lm, base, base.h, base.ln_f)


# model_type -> builder; each family is checked against lm(...).logits in tests/data/test_data_trunk.py.
DECODER_FAMILIES: dict[str, Callable[[nn.Module], Decoder | None]] = {
    "llama": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
}


def decoder_of(lm: nn.Module) -> Decoder | None:
    """The :class:`Decoder` of a supported causal LM, or None (then score through ``lm(...).logits``).

    Models whose head does more than a linear map (logit soft-capping or scaling) are not supported."""
    config = getattr(lm, "config", None)
    build = DECODER_FAMILIES.get(getattr(config, "model_type", None))
    if build is None or lm.get_output_embeddings() is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return build(lm)
