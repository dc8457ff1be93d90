"""Shape proxies of Llama-3-8B: its exact layer shapes, 1–2 blocks, random weights, built offline.

``llama3-8b-proxy`` (one block) and ``llama3-8b-proxy-2l`` (two) are ``LlamaForCausalLM`` models with
Meta-Llama-3-8B's configuration (hidden 4096, 32 query heads and 8 KV heads of 128, MLP 14336,
vocabulary 128256, RoPE θ 500000, untied embeddings and head) except the number of blocks. They
exist to run the ``paper`` preset's code path and to measure memory per adapted block at the paper's
shapes on a machine without the weights (``scripts/cost/proxy_memory.py`` projects to 32 blocks).

Predictions are meaningless: the tokenizer is the byte-level one of :mod:`abmll_pyro.lms.tiny`
(259 ids, all < 128256), and the weights are random. Drawing 1.3 billion normal values takes about a
minute on 2 CPU cores, so each weight matrix is a seeded N(0, 0.02²) block (HF's
``initializer_range``) of :data:`BLOCK` values tiled over it (a period prime to every row length, so
rows are shifted copies, not equal); RMSNorm weights are 1. The model is built on the meta device
and materialised once, in ``dtype`` (no float32 copy), so building costs about one pass over its
bytes (2.5 GB in bfloat16 for one block, 2.9 GB for two).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from abmll_pyro.lms.tiny import byte_tokenizer

__all__ = ["LLAMA3_8B", "PROXIES", "BLOCK", "llama3_8b_config", "llama3_8b_proxy"]

# Meta-Llama-3-8B's config.json (the shape-defining keys).
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 hidden_act="silu", attention_bias=False, mlp_bias=False)
# loader name -> number of blocks
PROXIES = {"llama3-8b-proxy": 1, "llama3-8b-proxy-2l": 2}
BLOCK = 1_000_003  # a prime: the tiling period of the random values
INIT_STD = 0.02


def llama3_8b_config(num_layers: int = 32) -> LlamaConfig:
    """Llama-3-8B's configuration with ``num_layers`` blocks and the byte tokenizer's special ids."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
    return LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": num_layers},
                       pad_token_id=256, bos_token_id=257, eos_token_id=258)


@torch.no_grad()
def _fill(model: PreTrainedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    block = torch.empty(BLOCK).normal_(0.0, INIT_STD, generator=gen)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        flat = p.view(-1)
        # drawn on the CPU (the same values on every device), then moved once: a broadcast copy from
        # another device would first materialise all whole·BLOCK values in host memory
        src = block.to(device=p.device, dtype=p.dtype)
        whole, rest = divmod(flat.numel(), BLOCK)
        if whole:  # [whole, BLOCK] view of the first whole·BLOCK values, one broadcast copy
            flat[: whole * BLOCK].view(whole, BLOCK).copy_(src.expand(whole, BLOCK))
        flat[whole * BLOCK:].copy_(src[:rest])


def llama3_8b_proxy(num_layers: int = 1, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``(model in eval mode, byte tokenizer)``: Llama-3-8B's shapes with ``num_layers`` blocks (see the
    module docstring). ``seed`` fixes the weights; the global RNG is not touched."""
    config = llama3_8b_config(num_layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    _fill(model, seed)
    # the rotary frequencies are buffers computed at construction: rebuild them on the real device
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    tokenizer = byte_tokenizer()
    if len(tokenizer) > config.vocab_size:  # pragma: no cover - 259 < 128256
        raise AssertionError("the tokenizer's ids must stay below the vocabulary size")
    return model.eval(), tokenizer
