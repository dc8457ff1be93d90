"""Tiny random causal LMs (Llama, Qwen2, GPT-2 shapes) with a byte-level tokenizer built in code.

For tests and smoke runs: nothing is downloaded. The tokenizer maps each UTF-8 byte to one token
(256 byte tokens + ``<pad>``, ``<bos>``, ``<eos>``), so any text round-trips and token counts are
predictable. Weights are random (seeded), so the models' predictions are meaningless but
deterministic.
"""

from __future__ import annotations

from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = ["TINY_KINDS", "byte_tokenizer", "tiny_model"]

SPECIALS = ("<pad>", "<bos>", "<eos>")
# A minimal ChatML-like template so the chat-template path can be tested offline.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer of 259 tokens: ids 0..255 are bytes (GPT-2's byte-to-unicode alphabet,
    in sorted order), then ``<pad>`` (256), ``<bos>`` (257), ``<eos>`` (258). No BOS is added."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for name in SPECIALS:
        vocab[name] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _llama(vocab: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=256, bos_token_id=257, eos_token_id=258, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _qwen2(vocab: int) -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=256, bos_token_id=257, eos_token_id=258, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def _gpt2(vocab: int) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
        bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )
    return GPT2LMHeadModel(config)


TINY_KINDS: dict[str, Callable[[int], PreTrainedModel]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
}


def tiny_model(kind: str = "llama", seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: a 2-layer, 32-wide random ``kind`` model in eval mode, fp32 on CPU.

    ``seed`` fixes the weights (the global torch RNG state is restored afterwards).
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {sorted(TINY_KINDS)}")
    tok = byte_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TINY_KINDS[kind](len(tok))
    finally:
        torch.random.set_rng_state(state)
    return model.eval(), tok
