"""``load_lm(name_or_path, ...)``: one entry point, dispatched by an ordered list (first match wins)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abmll_pyro.lms.hf import load_hf, resolve_dtype
from abmll_pyro.lms.proxy import PROXIES, llama3_8b_proxy
from abmll_pyro.lms.smollm2 import load_smollm2
from abmll_pyro.lms.tiny import TINY_KINDS, tiny_model

__all__ = ["load_lm", "LOADERS"]

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def _smollm2(name: str, dtype: torch.dtype, device, trust_remote_code: bool, seed: int) -> Loaded:
    return load_smollm2(dtype=dtype, device=device)


def _tiny(name: str, dtype: torch.dtype, device, trust_remote_code: bool, seed: int) -> Loaded:
    model, tokenizer = tiny_model(name.removeprefix("tiny-"), seed=seed)
    return model.to(device=device, dtype=dtype), tokenizer


def _proxy(name: str, dtype: torch.dtype, device, trust_remote_code: bool, seed: int) -> Loaded:
    return llama3_8b_proxy(PROXIES[name], dtype=dtype, device=device, seed=seed)


def _hf(name: str, dtype: torch.dtype, device, trust_remote_code: bool, seed: int) -> Loaded:
    """A hub id or local folder; failure is one ``ValueError`` line saying what was tried."""
    local = Path(name).expanduser()
    try:
        return load_hf(str(local) if local.exists() else name, dtype=dtype, device=device,
                       trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, RuntimeError) as err:  # (a refused pickle too)
        cause = " ".join(str(err).split())[:200]
        if local.exists():
            raise ValueError(f"cannot load the model in {local}: {cause}") from None
        from huggingface_hub import constants

        hub = ("no access to the Hugging Face hub (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
               else f"the Hugging Face hub does not provide it ({cause})")
        known = ", ".join(["smollm2-135m"] + [f"tiny-{k}" for k in TINY_KINDS] + list(PROXIES))
        raise ValueError(f"model {name!r} is not a known name ({known}), not a local path, and {hub}") from None


# (predicate, loader): the first predicate that accepts the name loads it; the last accepts anything.
LOADERS: list[tuple[Callable[[str], bool], Callable[..., Loaded]]] = [
    (lambda n: n == "smollm2-135m", _smollm2),
    (lambda n: n in {f"tiny-{k}" for k in TINY_KINDS}, _tiny),
    (lambda n: n in PROXIES, _proxy),
    (lambda n: True, _hf),
]


def load_lm(
    name_or_path: str,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> Loaded:
    """``(model, tokenizer)`` for ``"smollm2-135m"`` (embedded), ``"tiny-llama"``/``"tiny-qwen2"``/
    ``"tiny-gpt2"`` (random, offline; ``seed`` fixes them), ``"llama3-8b-proxy"``/``"llama3-8b-proxy-2l"``
    (Llama-3-8B's shapes with 1/2 blocks, random, offline: :mod:`abmll_pyro.lms.proxy`), or any HF hub
    id / local path."""
    if not name_or_path:
        raise ValueError("load_lm needs a model name or path, got an empty string")
    dtype = resolve_dtype(dtype)
    for accepts, loader in LOADERS:
        if accepts(name_or_path):
            return loader(name_or_path, dtype, device, trust_remote_code, seed)
    raise AssertionError("unreachable: the last loader accepts every name")
