"""Any Hugging Face causal LM by hub id or local path."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import dtype_name

__all__ = ["load_hf", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch.dtype, or any spelling of :data:`abmll_pyro.config.DTYPE_NAMES` (``bf16``, ``bfloat16``, ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, dtype_name(dtype))


def load_hf(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model in eval mode, tokenizer)`` via ``AutoModelForCausalLM``/``AutoTokenizer``. Remote code
    runs only when ``trust_remote_code=True``. A tokenizer without a pad token gets its EOS as pad."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    ).to(device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
